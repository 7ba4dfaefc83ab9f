"""Hot swap: promoting a new version while requests stream in fails none of them; a bad bundle
is refused, counted, and the serving model stays."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.service_server import published_model, serve, service_env  # noqa: F401


def republish(registry_dir: Path, version: str, work: Path, tamper=None) -> str:
    """Publish version's bundle again as a new version (optionally after `tamper(bundle_dir)`)."""
    from exporters.model_store.registry import Registry

    registry = Registry.open(str(registry_dir))
    bundle = registry.fetch(version, work / f"fetch-{time.time_ns()}")
    metadata = {k: v for k, v in registry.show(version).items() if k not in ("version", "files", "created_at")}
    if tamper:
        tamper(bundle)
    time.sleep(1.1)  # version ids carry the second they were minted in
    return registry.publish(bundle, metadata)


@pytest.fixture(scope="module")
def setup(published_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service_swap")
    registry = tmp / "registry"
    shutil.copytree(published_model.registry, registry)  # promotions here leave the shared registry alone
    v2 = republish(registry, published_model.version, tmp)
    env = service_env(registry, tmp / "data", poll_interval_s=0.5)
    with serve(env, tmp / "server.log") as running:
        yield {"server": running, "registry": registry, "v1": published_model.version, "v2": v2, "tmp": tmp}


def _image(model) -> tuple[str, bytes]:
    p = Path(json.loads((model.run_dir / "splits.json").read_text())["train"][0])
    return p.name, p.read_bytes()


def test_swap_during_a_stream_of_concurrent_requests_fails_none(setup, published_model):
    from exporters.model_store.registry import Registry

    server, name_bytes = setup["server"], _image(published_model)
    results: list[list[tuple[int, str | None]]] = [[] for _ in range(6)]
    stop = threading.Event()

    def stream(out):
        with server.client() as c:
            while not stop.is_set():
                try:
                    r = c.post("/predict", files=[("images", name_bytes)])
                    out.append((r.status_code, r.json()["predictions"][0]["model_version"] if r.status_code == 200 else None))
                except Exception as e:  # a dropped connection is a failed request too
                    out.append((0, repr(e)))

    threads = [threading.Thread(target=stream, args=(out,)) for out in results]
    for t in threads:
        t.start()
    time.sleep(2)
    Registry.open(str(setup["registry"])).promote(setup["v2"], "production")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(out and out[-1][1] == setup["v2"] for out in results):
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=60)

    flat = [r for out in results for r in out]
    assert flat and all(status == 200 for status, _ in flat), [r for r in flat if r[0] != 200][:5]
    assert {v for _, v in flat} == {setup["v1"], setup["v2"]}
    for out in results:  # per client: once the new version answered, the old one never does again
        versions = [v for _, v in out]
        first_new = versions.index(setup["v2"])
        assert all(v == setup["v2"] for v in versions[first_new:])
    with server.client() as c:
        metrics = c.get("/metrics").text
    assert f'cnnloop_model_info{{model_version="{setup["v2"]}"' in metrics


def _corrupt_registry_copy(registry: Path, version: str) -> None:
    target = next(p for p in (registry / "versions" / version).iterdir() if p.suffix == ".onnx")
    target.write_bytes(b"tampered" + target.read_bytes()[8:])


def _garbage_graphs(bundle: Path) -> None:
    for p in bundle.glob("*.onnx"):
        p.write_bytes(b"this is not an onnx graph")


@pytest.mark.parametrize("how", ["fails_checksum", "fails_to_load"])
def test_a_bad_bundle_is_refused_counted_and_the_old_model_keeps_serving(setup, published_model, how):
    from exporters.model_store.registry import Registry

    server, registry = setup["server"], setup["registry"]
    with server.client() as c:
        serving = c.get("/info").json()["model"]["version"]
        if how == "fails_checksum":
            bad = republish(registry, serving, setup["tmp"])
            _corrupt_registry_copy(registry, bad)
        else:
            bad = republish(registry, serving, setup["tmp"], tamper=_garbage_graphs)
        Registry.open(str(registry)).promote(bad, "production")
        outcome = c.post("/admin/reload").json()
        info = c.get("/info").json()
        predict = c.post("/predict", files=[("images", _image(published_model))])
        metrics = c.get("/metrics").text
    assert outcome["outcome"] == "failed" and outcome["version"] == bad and outcome["error"]
    assert info["model"]["version"] == serving and info["registry"]["last_error"]
    assert predict.status_code == 200 and predict.json()["model_version"] == serving
    assert 'cnnloop_model_loads_total{outcome="failed"}' in metrics
    Registry.open(str(registry)).promote(serving, "production")  # leave the alias on a good version
