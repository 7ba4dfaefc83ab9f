"""The per-request CPU accounting (service/cpu_stages.py) behind bench/request_cost.py: thread roles
read each thread's own CPU clock, stages add up thread CPU between boundaries, and it is off (no
"cpu" in GET /info, no clock reads per request) unless `cpu_stages` is on."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from service.cpu_stages import CpuStages
from service.metrics import ServiceMetrics
from service.predictions import lossless_image_bytes
from service.request_validation import PixelImage, Upload
from service.runtime import ServingRuntime
from service.settings import load_service_settings
from tests.service_server import published_model  # noqa: F401


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_registered_threads_cpu_is_counted_under_its_role_and_an_idle_one_is_not():
    stages = CpuStages()
    done = threading.Event()

    def busy():
        stages.register_thread("busy")
        _burn(0.3)
        done.wait(10)

    def idle():
        stages.register_thread("idle")
        done.wait(10)

    threads = [threading.Thread(target=busy), threading.Thread(target=idle)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    while threads[0].is_alive() and stages.thread_seconds().get("busy", 0) < 0.3:
        time.sleep(0.02)
    seconds = stages.thread_seconds()
    done.set()
    for t in threads:
        t.join()
    assert seconds["busy"] >= 0.3 and seconds["idle"] < 0.05, seconds
    assert stages.thread_seconds() == {}  # exited threads are no longer read


def test_laps_add_this_threads_cpu_per_stage_and_a_disabled_clock_adds_nothing():
    stages = CpuStages(enabled=True)
    for _ in range(3):
        clock = stages.clock()
        _burn(0.02)
        clock.lap("work")
        time.sleep(0.05)  # waiting is not CPU
        clock.lap("wait")
    got = stages.snapshot()["stages"]
    assert got["work"]["calls"] == 3 and 0.06 <= got["work"]["seconds"] < 0.2, got
    assert got["wait"]["seconds"] < 0.02, got
    off = CpuStages()
    clock = off.clock()
    _burn(0.01)
    clock.lap("work")
    assert off.snapshot()["stages"] == {}


def _photo(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 40, 3), dtype=np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _run(settings, work):
    async def go():
        runtime = ServingRuntime(settings, ServiceMetrics(CollectorRegistry()))
        await runtime.start()
        try:
            await runtime.predict([Upload(f"{i}.jpg", _jpeg(_photo(i))) for i in range(3)])
            await runtime.classify([PixelImage("pixels[0]", _photo(9))])
            return await asyncio.to_thread(work, runtime)
        finally:
            await runtime.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("on", [True, False], ids=["cpu_stages on", "off (the default)"])
def test_the_runtime_times_its_stages_and_shows_them_in_info_only_when_asked(on, published_model, tmp_path, monkeypatch):
    import service.runtime

    encoded_on = []

    def recording(pixels):
        encoded_on.append(threading.current_thread().name)
        return lossless_image_bytes(pixels)

    monkeypatch.setattr(service.runtime, "lossless_image_bytes", recording)
    settings = load_service_settings(overrides={
        "registry": str(published_model.registry), "data_dir": str(tmp_path / "data"), "poll_interval_s": 0,
        "bundle_cache_dir": str(tmp_path / "bundles"), "prefer_gpu": False, **({"cpu_stages": True} if on else {})})

    def info(runtime):
        runtime.writer.flush(10)
        return runtime.info()

    got = _run(settings, info)
    if not on:
        assert "cpu" not in got
        return
    cpu = got["cpu"]
    stages = cpu["stages"]
    for name in ("decode.image", "decode.sha256", "loop.calibrate", "loop.embedding", "loop.records", "loop.log_submit",
                 "loop.metrics", "loop.live_drift"):
        assert stages[name]["calls"] >= 1 and stages[name]["seconds"] >= 0, (name, stages)
    assert stages["decode.image"]["calls"] == 4 and stages["loop.answer"]["calls"] == 1, stages
    # Pixels are encoded for the store by the log writer's threads, never on the request's.
    assert len(encoded_on) == 1 and encoded_on[0].startswith("cnnloop-log-images"), encoded_on
    assert {"event_loop", "decode", "inference", "log_writer", "log_images"} <= set(cpu["threads"]), cpu["threads"]
    assert sum(cpu["threads"].values()) <= cpu["process_seconds"]

