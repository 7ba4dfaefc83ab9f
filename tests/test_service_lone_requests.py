"""A request alone on the service is not held to one core or to the batcher's thread hand-offs: it
decodes and runs in one trip to a decode thread, on a second session with one ORT thread per core;
concurrent requests still share batches on the single-threaded sessions side by side."""
from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from exporters.cpus import available_cpus
from service.metrics import ServiceMetrics
from service.request_validation import Upload
from service.runtime import ServingRuntime
from service.settings import load_service_settings
from tests.service_server import published_model  # noqa: F401


def _upload(i: int) -> Upload:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return Upload(f"{i}.jpg", buf.getvalue())


def _settings(published_model, tmp_path):
    return load_service_settings(overrides={
        "registry": str(published_model.registry), "data_dir": str(tmp_path / "data"), "poll_interval_s": 0,
        "bundle_cache_dir": str(tmp_path / "bundles"), "prefer_gpu": False})


def _serve(settings, work):
    async def go():
        runtime = ServingRuntime(settings, ServiceMetrics(CollectorRegistry()))
        await runtime.start()
        try:
            return await work(runtime)
        finally:
            await runtime.stop()

    return asyncio.run(go())


def test_a_lone_request_runs_in_one_trip_and_concurrent_ones_share_batches(published_model, tmp_path):
    calls: list[tuple[str, str, int]] = []  # (entry point, thread, images)

    async def work(runtime):
        model = runtime.models.current
        run, run_alone = model.run, model.run_alone

        def recording(name, fn):
            def wrapped(images):
                calls.append((name, threading.current_thread().name, len(images)))
                return fn(images)
            return wrapped

        model.run, model.run_alone = recording("run", run), recording("run_alone", run_alone)
        lone = [await runtime.predict([_upload(i)]) for i in range(3)]
        lone_calls = list(calls)
        calls.clear()
        together = await asyncio.gather(*(runtime.predict([_upload(10 + i)]) for i in range(12)))
        return lone, lone_calls, together

    lone, lone_calls, together = _serve(_settings(published_model, tmp_path), work)
    assert [(name, thread.split("_")[0], n) for name, thread, n in lone_calls] == [("run_alone", "cnnloop-decode", 1)] * 3
    assert all(len(a["predictions"]) == 1 and a["predictions"][0]["label"] in published_model.classes for a in lone + together)
    batched = [c for c in calls if c[1].startswith("cnnloop-infer")]
    assert sum(n for _, _, n in batched) >= 11 and max(n for _, _, n in batched) > 1, calls  # the first may run alone


def test_on_a_multicore_cpu_the_model_has_a_second_session_for_lone_batches(published_model, tmp_path):
    if available_cpus() < 2:
        pytest.skip("one core: a lone batch has no other core to use")

    async def sessions(runtime):
        model = runtime.models.current
        return (model.classifier.session.get_session_options().intra_op_num_threads,
                model.lone_classifier.session.get_session_options().intra_op_num_threads, runtime.info()["threads"])

    usual, lone, threads = _serve(_settings(published_model, tmp_path), sessions)
    assert (usual, lone) == (1, available_cpus())
    assert threads["ort_intra_op"] == 1 and threads["ort_intra_op_lone_batch"] == available_cpus()
