"""BentoML's OpenTelemetry middleware runs on cnnloop's routes only when CNNLOOP_TRACE_REQUESTS asks.

Real `bentoml serve` processes: BentoML's access log names a request's trace and span only when the
middleware ran for it, so the log shows which way the service was started.
"""
from __future__ import annotations

import re

import pytest

from tests.service_server import published_model, serve, service_env  # noqa: F401  (fixture)

ACCESS_LINE = re.compile(r"path=/predict,.*\(status=200")


@pytest.mark.parametrize("trace", [False, True], ids=["default", "trace_requests"])
def test_requests_are_traced_only_when_trace_requests_is_on(trace, published_model, tmp_path):
    env = service_env(published_model.registry, tmp_path / "data", poll_interval_s=0, trace_requests=str(trace).lower())
    image = sorted((published_model.data_dir / "0").iterdir())[0]
    log = tmp_path / "server.log"
    with serve(env, log) as running, running.client() as c:
        for _ in range(3):
            assert c.post("/predict", files=[("images", (image.name, image.read_bytes()))]).status_code == 200
        assert c.get("/info").json()["settings"]["trace_requests"] is trace
    lines = [line for line in log.read_text().splitlines() if ACCESS_LINE.search(line)]
    assert len(lines) == 3, log.read_text()[-2000:]
    assert all(("(trace=" in line) is trace for line in lines), lines
