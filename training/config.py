"""The training room's one settings object: defaults < YAML file < CNNLOOP_TRAIN_* env < CLI flags."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from exporters.settings_loader import load_settings
from training.devices import DEVICE_CHOICES, Device
from training.errors import TrainingError


class TrainConfig(BaseSettings):
    """Every knob of a fine-tuning run. Defaults are the recipe tuned on carved validation splits."""

    model_config = SettingsConfigDict(env_prefix="CNNLOOP_TRAIN_", extra="forbid", validate_assignment=True)

    # model
    backbone: str = "efficientnet_lite0"
    weights: str = Field("default", description="'default' (offline weights of the backbone), a path, s3://..., or 'none'")
    image_size: int | None = Field(None, ge=32, le=1024, description="crop size; default: the backbone's")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)

    # schedule of what trains
    strategy: Literal["freeze", "finetune", "gradual"] = "gradual"
    head_epochs: int = Field(2, ge=0, description="gradual: epochs training only the head")
    unfreeze_every: int = Field(1, ge=1, description="gradual: epochs between opening the next block")
    unfreeze_blocks: int | None = Field(4, ge=0, description="gradual: most blocks opened from the top (None = all)")
    bn: Literal["train", "frozen"] = Field("frozen", description="frozen keeps pretrained BatchNorm statistics")

    # optimisation
    epochs: int = Field(12, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0, le=10)
    backbone_lr_ratio: float = Field(0.1, gt=0, le=1, description="backbone LR = head LR x ratio")
    weight_decay: float = Field(0.01, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="exponential moving average of weights")
    grad_clip: float | None = Field(None, gt=0)

    # data
    augment: Literal["none", "light", "strong"] = "light"
    hflip: bool = Field(True, description="random horizontal flips (turn off for digits, text...)")
    balance: Literal["none", "sampler", "loss"] = "none"
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)

    # early stopping
    monitor: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    patience: int = Field(4, ge=1)
    min_delta: float = Field(0.0, ge=0)

    # confidence: fitted after training on the val split (training.scoring.confidence)
    coverage: float = Field(0.9, ge=0.5, lt=1, description="prediction sets hold the true class with at least this "
                            "probability (split conformal, exchangeable traffic)")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="abstain under the calibrated confidence whose "
                                          "answers reach this accuracy on the calibration data (default: never abstain)")
    max_set_size: int | None = Field(None, ge=1, description="abstain when an answer's prediction set has more classes")

    # hardware and reproducibility
    device: Device = Field("auto", description=DEVICE_CHOICES)
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    seed: int = 0

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # load_train_config merges YAML and env (env over YAML); the constructor takes only what it is given.
        return (init_settings,)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "TrainConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) + test_fraction ({self.test_fraction}) "
                "leaves under 10% for training; lower them"
            )
        return self


def load_train_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Resolve the config: defaults < YAML `path` < env CNNLOOP_TRAIN_* < `overrides` (CLI flags, None = not given)."""
    return load_settings(TrainConfig, TrainingError, "training config", path, overrides, environ)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True))
