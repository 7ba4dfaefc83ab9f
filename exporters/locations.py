"""Where models and predictions live: the settings the service and the retrain job share.

One ConfigMap (CNNLOOP_REGISTRY, CNNLOOP_DATA_DIR, CNNLOOP_S3_ENDPOINT_URL) configures both rooms,
so the names, defaults and checks are defined once, here, and each room's settings extend them.
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from exporters.storage import check_store_uri


class StoreLocations(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CNNLOOP_", extra="ignore")

    registry: str = Field("./registry", description="registry URI: a local path or s3://bucket/prefix")
    data_dir: str = Field("./data/service", description="prediction/feedback log and stored inputs: a local path or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, moto...); None = AWS")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Each room's loader merges its YAML file and the environment itself (env over YAML); the
        # constructor takes only what it is given.
        return (init_settings,)

    @field_validator("registry", "data_dir")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        return check_store_uri(v)

    @model_validator(mode="after")
    def _endpoint_is_http(self):
        if self.s3_endpoint_url and not self.s3_endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"s3_endpoint_url '{self.s3_endpoint_url}' must start with http:// or https://")
        return self

    @property
    def data_is_s3(self) -> bool:
        return self.data_dir.startswith("s3://")
