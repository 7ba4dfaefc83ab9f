"""The model bundle format: the files one registry version holds, and a bundle folder read back.

Layout of a bundle directory:
    bundle.json           metadata (what export_bundle records, plus the retrain files), and once
                          published the registry's version id and the sha256/size of every file
    model.onnx            fp32 graph, uint8 NHWC input, (probabilities, embedding) outputs
    model_fp16.onnx       optional, GPU variant, kept only within the accuracy margin
    model_int8.onnx       optional, CPU variant (static QDQ), same rule
    reference.npz         arrays the drift checks compare live traffic against
    model.safetensors     torch weights and their description (backbone, classes, policy), named as
    model.json            in the run directory: training.run.files.rebuild_classifier reads both folders
    original_splits.json  the training splits every retrain replays

Writing one is `exporters.export.bundle_writer` (graphs, reference) and `training.run.publish` (weights,
splits). Reading one needs neither torch nor onnxruntime: the service imports this module.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.errors import ExportError
from exporters.preprocess import ResizePolicy
from exporters.reference_stats import load_reference

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INFO_FILE = "model.json"
ORIGINAL_SPLITS_FILE = "original_splits.json"


def variant_file(name: str) -> str:
    return MODEL_FILE if name == "fp32" else f"model_{name}.onnx"


def retrain_metadata() -> dict:
    """bundle.json's "retrain" entry. Readers follow the names it records, not these constants:
    bundles published before the weights took the run directory's names call them
    weights.safetensors and weights.json, and still warm-start a retrain."""
    return {"weights": WEIGHTS_FILE, "weights_info": WEIGHTS_INFO_FILE, "original_splits": ORIGINAL_SPLITS_FILE}


@dataclass(frozen=True)
class Variant:
    """One graph of the bundle (fp32, fp16, int8) and how it fared on the validation images."""

    name: str
    file: str | None  # None when refused: the file was deleted
    refused: bool
    refusal_reason: str | None
    accuracy: float | None
    accuracy_delta_points: float | None


@dataclass(frozen=True)
class RetrainFiles:
    """What the next retrain warm-starts from and replays; the files may be absent (checked where used)."""

    weights: Path
    weights_info: Path
    original_splits: Path


@dataclass(frozen=True)
class ReferenceStats:
    """What live traffic is compared with: bundle.json's reference figures and the reference.npz arrays
    (exporters.reference_stats). The arrays are None when the bundle has no reference.npz."""

    path: Path
    class_prior: np.ndarray | None  # float64; bundle.json's, else the array's
    val_accuracy: float
    temperature: float
    probs_sample: np.ndarray | None = None  # validation softmax outputs, N x K
    labels_sample: np.ndarray | None = None  # their true classes
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    embeddings_pca_sample: np.ndarray | None = None  # validation embeddings, PCA-projected

    @property
    def has_arrays(self) -> bool:
        return self.probs_sample is not None


@dataclass(frozen=True)
class Bundle:
    """One bundle folder as its bundle.json describes it (`read_bundle`)."""

    path: Path
    version: str | None  # None until the registry publishes it
    format_version: int | None
    created_at: str | None
    parent_version: str | None
    labels: tuple[str, ...]
    policy: ResizePolicy
    input: dict  # the graph input: name, dtype, layout, shape, color, value_range
    outputs: dict  # output names of probabilities and embedding, embed_dim
    backbone: dict | None
    variants: dict[str, Variant]
    reference: dict  # the small figures; the arrays are read_reference_stats(bundle)
    metrics: dict  # val/test summaries of the training run
    calibration: dict | None  # exporters.calibration.Calibration as JSON; None: exported before calibration
    training_config: dict
    source_run: str | None
    dataset_fingerprint: dict | None
    retrain: RetrainFiles

    @property
    def kept_variants(self) -> list[str]:
        return [name for name, v in self.variants.items() if v.file]

    @property
    def refused_variants(self) -> list[str]:
        return [name for name, v in self.variants.items() if v.refused]

    def variant_path(self, name: str) -> Path:
        entry = self.variants.get(name)
        if entry is None or not entry.file:
            raise ExportError(f"bundle {self.path} has no '{name}' variant (kept: {', '.join(self.kept_variants)}); pick one of those")
        return self.path / _plain_name(entry.file)


def _plain_name(name) -> str:
    # bundle.json names files inside its own folder; a path in it would read outside the bundle.
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ExportError(f"{BUNDLE_JSON} names the file {name!r}; bundle files are plain names: re-export the bundle")
    return name


def _variant(name: str, entry: dict) -> Variant:
    return Variant(name=name, file=entry.get("file"), refused=bool(entry.get("refused")),
                   refusal_reason=entry.get("refusal_reason"), accuracy=entry.get("accuracy"),
                   accuracy_delta_points=entry.get("accuracy_delta_points"))


def _retrain_files(path: Path, meta: dict) -> RetrainFiles:
    names = {**retrain_metadata(), **(meta.get("retrain") or {})}
    return RetrainFiles(*(path / _plain_name(names[k]) for k in ("weights", "weights_info", "original_splits")))


def read_bundle(bundle_dir: Path | str) -> Bundle:
    """A fetched bundle folder's bundle.json, typed; the files it names are not opened."""
    path = Path(bundle_dir)
    if not (path / BUNDLE_JSON).is_file():
        raise ExportError(f"{bundle_dir} is not a model bundle: {BUNDLE_JSON} is missing (fetch it with the registry)")
    meta = json.loads((path / BUNDLE_JSON).read_text())
    missing = [k for k in ("labels", "preprocess", "variants") if k not in meta]
    if missing:
        raise ExportError(f"{path / BUNDLE_JSON} lacks {', '.join(missing)}; it was not written by `cnnloop export`: re-export the run")
    training = meta.get("training") or {}
    return Bundle(
        path=path, version=meta.get("version"), format_version=meta.get("format_version"),
        created_at=meta.get("created_at"), parent_version=meta.get("parent_version"),
        labels=tuple(meta["labels"]), policy=ResizePolicy.from_bundle(meta),
        input=dict(meta.get("input") or {}), outputs=dict(meta.get("outputs") or {}), backbone=meta.get("backbone"),
        variants={name: _variant(name, entry) for name, entry in meta["variants"].items()},
        reference=dict(meta.get("reference") or {}), metrics=dict(meta.get("metrics") or {}),
        calibration=meta.get("calibration"), training_config=dict(training.get("config") or {}), source_run=training.get("source_run"),
        dataset_fingerprint=meta.get("dataset_fingerprint"), retrain=_retrain_files(path, meta),
    )


def read_reference_stats(bundle: Bundle) -> ReferenceStats:
    summary = bundle.reference
    path = bundle.path / _plain_name(summary.get("file", REFERENCE_FILE))
    arrays = load_reference(path) if path.is_file() else {}
    prior = summary.get("class_prior")
    if prior is None:
        prior = arrays.get("class_prior")
    return ReferenceStats(
        path=path, class_prior=None if prior is None else np.asarray(prior, dtype=np.float64),
        val_accuracy=float(summary.get("val_accuracy", math.nan)), temperature=float(summary.get("temperature", 1.0)),
        probs_sample=arrays.get("probs_sample"), labels_sample=arrays.get("labels_sample"),
        pca_mean=arrays.get("pca_mean"), pca_components=arrays.get("pca_components"),
        embeddings_pca_sample=arrays.get("embeddings_pca_sample"),
    )
