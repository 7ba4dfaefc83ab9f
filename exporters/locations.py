"""Where models and predictions live: the settings the service and the retrain job share.

One ConfigMap (CNNLOOP_REGISTRY, CNNLOOP_DATA_DIR, CNNLOOP_S3_ENDPOINT_URL) configures both rooms,
so the names, defaults and checks are defined once, here, and each room's settings extend them.
"""
from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from exporters.settings_loader import load_settings
from exporters.storage import check_store_uri


class StoreLocations(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CNNLOOP_", extra="ignore")

    registry: str = Field("./registry", description="registry URI: a local path or s3://bucket/prefix")
    data_dir: str = Field("./data/service", description="prediction/feedback log and stored inputs: a local path or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, moto...); None = AWS")
    log_url: str | None = Field(None, description="database of the prediction log: postgresql://user:password@host:5432/db "
                                "(replicas share it) or sqlite:///path; None = a SQLite file in a local data dir")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # exporters.settings_loader.load_settings merges the YAML file and the environment (env over
        # YAML) for every room; the constructor takes only what it is given.
        return (init_settings,)

    @field_validator("registry", "data_dir")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        return check_store_uri(v)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, v: str | None) -> str | None:
        v = (v or "").strip()
        if not v:  # a ConfigMap's empty CNNLOOP_S3_ENDPOINT_URL= means AWS, as unset does
            return None
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. http://minio:9000")
        return v

    @field_validator("log_url")
    @classmethod
    def _log_url_is_a_database(cls, v: str | None) -> str | None:
        from exporters.prediction_log.sql import database_url

        v = (v or "").strip()
        if not v:  # an empty Secret value means the default, as unset does
            return None
        database_url("", v)  # raises LogUrlError (a ValueError) naming what is wrong
        return v

    @property
    def data_is_s3(self) -> bool:
        return self.data_dir.startswith("s3://")


class LogLocations(StoreLocations):
    """The locations of a room that reads or writes the prediction log (the service, drift, retrain):
    an s3:// data dir holds images only, so it needs a log URL, checked when the settings load."""

    @model_validator(mode="after")
    def _log_has_a_database(self) -> "LogLocations":
        from exporters.prediction_log.sql import database_url

        database_url(self.data_dir, self.log_url)  # LogUrlError (a ValueError) naming the fix
        return self


def load_store_locations(overrides: Mapping[str, Any], error: type[Exception],
                         environ: Mapping[str, str] | None = None, with_log: bool = False) -> StoreLocations:
    """The locations a command that needs no other settings (export, registry, log) uses: env CNNLOOP_* < `overrides`.
    `with_log`: the command opens the prediction log, so an s3:// data dir needs a log URL."""
    return load_settings(LogLocations if with_log else StoreLocations, error, "store settings", overrides=overrides,
                         environ=environ)
