"""Where models and predictions live: the settings the service and the retrain job share.

One ConfigMap (CNNLOOP_REGISTRY, CNNLOOP_DATA_DIR, CNNLOOP_S3_ENDPOINT_URL) configures both rooms,
so the names, defaults and checks are defined once, here, and each room's settings extend them.
"""
from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from exporters.settings_loader import load_settings
from exporters.storage import check_store_uri


class StoreLocations(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CNNLOOP_", extra="ignore")

    registry: str = Field("./registry", description="registry URI: a local path or s3://bucket/prefix")
    data_dir: str = Field("./data/service", description="prediction/feedback log and stored inputs: a local path or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, moto...); None = AWS")

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

    @property
    def data_is_s3(self) -> bool:
        return self.data_dir.startswith("s3://")


def load_store_locations(overrides: Mapping[str, Any], error: type[Exception],
                         environ: Mapping[str, str] | None = None) -> StoreLocations:
    """The locations a command that needs no other settings (export, registry) uses: env CNNLOOP_* < `overrides`."""
    return load_settings(StoreLocations, error, "store settings", overrides=overrides, environ=environ)
