"""The BentoML service: `bentoml serve` (bentofile.yaml points here) or `cnnloop serve`.

Thin on purpose: settings are loaded and validated when the worker starts, `ServingRuntime` does
the work, `http_app` owns the routes. BentoML contributes the process model, /livez, /readyz
(through `__is_ready__`: true once a model is loaded and warmed up), /metrics (its own + cnnloop_*)
and lifecycle hooks. Imports no torch.
"""
from __future__ import annotations

import logging

import bentoml

from service.http_app import build_http_app

http_app = build_http_app()


def _tracing_config() -> dict:
    """BentoML's tracing config for this service: every route left out of its OpenTelemetry middleware
    unless CNNLOOP_TRACE_REQUESTS is on. Settings are read here, at import, because the decorator
    needs them; bad ones fall back to the default and `_validate_settings` then stops the server."""
    from service.errors import ConfigError
    from service.settings import load_service_settings

    try:
        trace = load_service_settings().trace_requests
    except ConfigError:
        trace = False
    # OpenTelemetry's exclude list is regexes searched in the URL: "." matches every one.
    return {} if trace else {"excluded_urls": "."}


@bentoml.service(
    name="cnnloop",
    # One worker per process group: ONNX Runtime already uses every core inside a call; scale out
    # with replicas (k8s HPA), each polling the registry on its own.
    workers=1,
    traffic={"timeout": 120},
    tracing=_tracing_config(),
)
@bentoml.asgi_app(http_app, path="/")
class CnnloopService:
    def __init__(self) -> None:
        from service.runtime import ServingRuntime
        from service.settings import load_service_settings

        # BentoML's server logging config leaves the root at WARNING; model loads and swaps are INFO.
        for name in ("cnnloop", "cnnloop.service"):
            logging.getLogger(name).disabled = False
        logging.getLogger("cnnloop").setLevel(logging.INFO)
        self.runtime = ServingRuntime(load_service_settings())

    @bentoml.on_deployment
    def _validate_settings() -> None:
        # Runs once in `bentoml serve` before any worker starts: bad settings stop the server with
        # one clear error instead of a worker crash loop.
        from service.settings import load_service_settings

        load_service_settings()

    @bentoml.on_startup
    async def _load_model(self) -> None:
        await self.runtime.start()
        http_app.state.runtime = self.runtime

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        await self.runtime.stop()

    def __is_ready__(self) -> bool:
        return self.runtime.ready
