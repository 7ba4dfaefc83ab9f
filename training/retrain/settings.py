"""The drift report's and retrain job's one settings object: defaults < YAML (--config) < CNNLOOP_* env < flags.

It shares CNNLOOP_REGISTRY, CNNLOOP_DATA_DIR and CNNLOOP_S3_ENDPOINT_URL with the service, so one
ConfigMap configures both; the rest are the drift thresholds and the retrain policy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from exporters.locations import LogLocations
from exporters.settings_loader import load_settings
from training.devices import DEVICE_CHOICES, Device
from training.errors import TrainingError


class LoopSettings(LogLocations):
    """registry, data_dir and s3_endpoint_url come from StoreLocations, shared with the service."""

    work_dir: Path = Field(Path("./data/retrain"), description="local scratch: fetched bundles, feedback images, challenger runs")
    original_data: Path | None = Field(None, description="folder holding the original training data, when it moved since "
                                       "the first training run (paths are rebased from the recorded data root)")

    # drift report
    window: int = Field(500, ge=10, le=1_000_000, description="newest predictions of the production model a check covers")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the combined drift verdict")
    min_samples: int = Field(100, ge=10, description="fewer predictions in the window: 'insufficient data', no verdict")
    min_feedback: int = Field(30, ge=1, description="fewer labeled predictions: no feedback-accuracy verdict")
    permutations: int = Field(500, ge=50, le=100_000, description="MMD permutation test resamples")

    # decision policy
    min_new_labels: int = Field(50, ge=0, description="labels that arrived since the last retrain needed to retrain")
    cooldown_s: float = Field(3600.0, ge=0, description="seconds after a retrain before the next may start")
    severity_increase: float = Field(0.0, ge=0, description="drift must exceed the last check's severity by this much")
    accuracy_margin: float = Field(0.05, ge=0, le=1, description="retrain when feedback accuracy < validation accuracy - this")

    # retrain
    epochs: int = Field(8, ge=1, le=10_000, description="most fine-tuning epochs of a retrain (early stopping ends it sooner)")
    lr_scale: float = Field(0.5, gt=0, le=10, description="warm start: the training run's head LR x this")
    patience: int = Field(3, ge=1)
    feedback_holdout: float = Field(0.3, ge=0.05, le=0.9, description="fraction of labeled feedback held out to judge the models")
    feedback_val: float = Field(0.2, ge=0.0, le=0.9, description="fraction of the remaining feedback used for early stopping")
    feedback_weight: float = Field(0.5, ge=0, le=0.95, description="share of each epoch's training images drawn from feedback "
                                   "(feedback repeated up to it; the original data is always replayed in full)")
    label_check: Literal["exclude", "keep", "downweight"] = Field(
        "exclude", description="labels the check before a retrain flags as likely wrong (cleanlab): exclude (out of training "
        "and the holdout), keep, or downweight (trained on once, not repeated; out of the holdout). All policies send "
        "them back to the review queue and list them in the audit log")
    promote_margin: float = Field(0.01, ge=0, le=1, description="challenger must beat the champion on the holdout by this (accuracy)")
    test_tolerance: float = Field(0.02, ge=0, le=1, description="and may lose at most this on the original test split")
    device: Device = Field("auto", description=f"{DEVICE_CHOICES}; also the challenger's training device")
    lock_ttl_s: float = Field(6 * 3600.0, ge=60, description="a lock older than this is stale (its holder died) and is taken over")
    variants: str = Field("int8", description="extra bundle variants the challenger gets: fp16, int8, or none")


def load_loop_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None,
                       environ: dict[str, str] | None = None) -> LoopSettings:
    """defaults < YAML `config_file` < CNNLOOP_* env < `overrides` (CLI flags, None = not given)."""
    return load_settings(LoopSettings, TrainingError, "drift/retrain settings", config_file, overrides, environ)
