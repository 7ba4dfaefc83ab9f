"""The prediction log on each backend a deployment can choose: the embedded SQLite file and PostgreSQL.

`sql_log` is parametrized over both, so every test that takes it runs on both; `log_url_for`
gives the CNNLOOP_LOG_URL of a backend (None for SQLite: the default file in the data dir).
"""
from __future__ import annotations

import pytest

from exporters.prediction_log.sql import open_prediction_log

BACKENDS = ("sqlite", "postgresql")


def log_url_for(request, backend: str) -> str | None:
    return request.getfixturevalue("postgres_url") if backend == "postgresql" else None


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def sql_log(request, backend, tmp_path):
    log = open_prediction_log(str(tmp_path / "data"), log_url=log_url_for(request, backend))
    yield log
    log.close()
