"""The bundle format read back (exporters/model_store/bundle.py): typed fields, the retrain files of old and new
bundles, the reference statistics, and refusals that say what to do."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporters.model_store.bundle import (BUNDLE_JSON, ORIGINAL_SPLITS_FILE, WEIGHTS_FILE, WEIGHTS_INFO_FILE, read_bundle,
                              read_reference_stats, retrain_metadata)
from exporters.errors import ExportError
from exporters.onnx_runtime import pick_variant
from exporters.preprocess import ResizePolicy
from exporters.reference_stats import save_reference

# The "retrain" entry bundles carried before their weights took the run directory's names.
OLD_RETRAIN_ENTRY = {"weights": "weights.safetensors", "weights_info": "weights.json", "original_splits": "original_splits.json"}


def write_bundle(folder: Path, **overrides) -> Path:
    """A bundle.json as export_bundle + publish_run + the registry write it (no graphs needed to read it)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": 1, "version": "v20260101-000000-abcdef", "created_at": "2026-01-01T00:00:00+00:00",
        "parent_version": None, "labels": ["ant", "bee"],
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": [None, 64, 64, 3]},
        "outputs": {"probabilities": "probabilities", "embedding": "embedding", "embed_dim": 8},
        "preprocess": {"crop_size": 64, "resize_size": 73, "function": "exporters.preprocess.load_model_input"},
        "backbone": {"name": "efficientnet_lite0"}, "metrics": {"val": {"accuracy": 0.9}},
        "training": {"config": {"epochs": 2, "lr": 0.003}, "source_run": "/runs/one"},
        "dataset_fingerprint": {"sha256": "0" * 64, "n_files": 10},
        "variants": {"fp32": {"file": "model.onnx", "refused": False, "accuracy": 0.9, "accuracy_delta_points": 0.0},
                     "int8": {"file": None, "refused": True, "refusal_reason": "loses 2 points", "accuracy": 0.88,
                              "accuracy_delta_points": -2.0}},
        "reference": {"class_prior": [0.25, 0.75], "val_accuracy": 0.9, "temperature": 1.5, "file": "reference.npz"},
        "retrain": retrain_metadata(),
        **overrides,
    }
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))
    return folder


def test_bundle_json_reads_into_typed_fields(tmp_path):
    b = read_bundle(write_bundle(tmp_path / "b"))
    assert b.version == "v20260101-000000-abcdef" and b.labels == ("ant", "bee")
    assert b.policy == ResizePolicy(crop_size=64, resize_size=73)
    assert b.input["layout"] == "NHWC" and b.outputs["embed_dim"] == 8 and b.backbone["name"] == "efficientnet_lite0"
    assert b.training_config == {"epochs": 2, "lr": 0.003} and b.source_run == "/runs/one"
    assert b.metrics["val"]["accuracy"] == 0.9 and b.dataset_fingerprint["n_files"] == 10


def test_refused_variants_are_listed_and_cannot_be_opened(tmp_path):
    b = read_bundle(write_bundle(tmp_path / "b"))
    assert b.kept_variants == ["fp32"] and b.refused_variants == ["int8"]
    assert b.variants["int8"].refusal_reason == "loses 2 points" and b.variants["int8"].file is None
    assert b.variant_path("fp32") == tmp_path / "b" / "model.onnx"
    assert pick_variant(b, prefer_gpu=False) == "fp32"
    with pytest.raises(ExportError, match=r"no 'int8' variant \(kept: fp32\)"):
        b.variant_path("int8")


def test_new_bundles_carry_the_weights_under_the_run_directory_names(tmp_path):
    files = read_bundle(write_bundle(tmp_path / "b")).retrain
    assert (files.weights.name, files.weights_info.name) == ("model.safetensors", "model.json") == (WEIGHTS_FILE, WEIGHTS_INFO_FILE)
    assert files.original_splits == tmp_path / "b" / ORIGINAL_SPLITS_FILE


def test_an_old_bundle_names_its_weights_files_and_the_reader_follows_them(tmp_path):
    files = read_bundle(write_bundle(tmp_path / "b", retrain=OLD_RETRAIN_ENTRY)).retrain
    assert files.weights == tmp_path / "b" / "weights.safetensors"
    assert files.weights_info == tmp_path / "b" / "weights.json"


def test_a_folder_without_bundle_json_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ExportError, match="is not a model bundle: bundle.json is missing"):
        read_bundle(tmp_path)


def test_a_bundle_json_missing_what_readers_need_is_refused(tmp_path):
    folder = write_bundle(tmp_path / "b")
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    del meta["preprocess"]
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="lacks preprocess.*re-export"):
        read_bundle(folder)


def test_a_file_name_that_leaves_the_bundle_is_refused(tmp_path):
    folder = write_bundle(tmp_path / "b", retrain={**OLD_RETRAIN_ENTRY, "weights": "../../elsewhere.safetensors"})
    with pytest.raises(ExportError, match="plain names"):
        read_bundle(folder)


def test_reference_stats_hold_the_npz_arrays_and_bundle_json_figures(tmp_path):
    folder = write_bundle(tmp_path / "b")
    arrays = {"class_prior": np.array([0.5, 0.5], np.float32), "probs_sample": np.array([[0.9, 0.1]], np.float32),
              "labels_sample": np.array([0]), "pca_mean": np.zeros(8, np.float32), "pca_components": np.eye(2, 8, dtype=np.float32),
              "embeddings_pca_sample": np.zeros((1, 2), np.float32)}
    save_reference(folder / "reference.npz", arrays)
    ref = read_reference_stats(read_bundle(folder))
    assert ref.has_arrays and ref.val_accuracy == 0.9 and ref.temperature == 1.5
    np.testing.assert_array_equal(ref.class_prior, [0.25, 0.75])  # bundle.json's prior wins over the array's
    np.testing.assert_array_equal(ref.probs_sample, arrays["probs_sample"])
    assert ref.pca_components.shape == (2, 8)


def test_reference_stats_without_the_npz_keep_the_figures_and_no_arrays(tmp_path):
    ref = read_reference_stats(read_bundle(write_bundle(tmp_path / "b")))
    assert not ref.has_arrays and ref.pca_mean is None and ref.path.name == "reference.npz"
    np.testing.assert_array_equal(ref.class_prior, [0.25, 0.75])


def test_an_old_layout_bundle_rebuilds_the_classifier_that_was_saved(tmp_path):
    """One loader for run dirs and bundles: the warm start of an old bundle gets the very weights saved."""
    import torch

    from training.model.backbones import get_backbone_spec
    from training.model.classifier import build_classifier
    from training.retrain.challenger import load_champion_model
    from training.run.files import load_run, save_model

    spec = get_backbone_spec("efficientnet_lite0")
    model, _ = build_classifier(spec, num_classes=2, weights="none", dropout=0.0)
    run = tmp_path / "run"
    run.mkdir()
    save_model(run, model, {"backbone": spec.describe(), "classes": ["ant", "bee"], "dropout": 0.0,
                            "policy": ResizePolicy(crop_size=64, resize_size=73).as_dict()})
    folder = write_bundle(tmp_path / "bundle", retrain=OLD_RETRAIN_ENTRY)
    shutil.copyfile(run / "model.safetensors", folder / "weights.safetensors")
    shutil.copyfile(run / "model.json", folder / "weights.json")

    champion, info = load_champion_model(read_bundle(folder))
    assert info["classes"] == ["ant", "bee"]
    saved, rebuilt = model.state_dict(), champion.state_dict()
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    assert all(torch.equal(t, saved[k]) for k, t in load_run(run).model.state_dict().items())  # the run dir, same loader


def test_a_bundle_without_torch_weights_cannot_warm_start(tmp_path):
    from training.errors import TrainingError
    from training.retrain.challenger import load_champion_model

    with pytest.raises(TrainingError, match=r"carries no torch weights \(model.safetensors\)"):
        load_champion_model(read_bundle(write_bundle(tmp_path / "b")))


def _with_reference_npz(folder: Path, k: int = 2, d: int = 8, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    save_reference(folder / "reference.npz", {
        "class_prior": np.full(k, 1 / k, np.float32), "probs_sample": rng.dirichlet(np.ones(k), n).astype(np.float32),
        "labels_sample": np.arange(n) % k, "pca_mean": np.zeros(d, np.float32), "pca_components": np.eye(2, d, dtype=np.float32),
        "embeddings_pca_sample": rng.normal(size=(n, 2)).astype(np.float32)})
    return folder


def test_the_drift_report_reads_its_reference_set_through_the_bundle(tmp_path):
    from training.drift.report import load_reference_set

    folder = _with_reference_npz(write_bundle(tmp_path / "b"))
    ref = load_reference_set(folder)
    assert ref.version == "v20260101-000000-abcdef" and ref.labels == ["ant", "bee"]
    assert ref.probs.dtype == np.float64 and ref.probs.shape == (4, 2) and ref.embeddings.shape == (4, 2)
    assert ref.val_accuracy == 0.9 and ref.temperature == 1.5


def test_the_drift_report_refuses_a_bundle_without_reference_arrays(tmp_path):
    from training.drift.report import load_reference_set
    from training.errors import TrainingError

    with pytest.raises(TrainingError, match=r"has no reference statistics \(reference.npz\); re-export"):
        load_reference_set(write_bundle(tmp_path / "b"))


def test_the_service_reference_normalises_the_prior_and_falls_back_to_uniform(tmp_path):
    from service.model_session import read_reference

    served = read_reference(read_bundle(_with_reference_npz(write_bundle(tmp_path / "b"))))
    np.testing.assert_allclose(served.class_prior, [0.25, 0.75])
    assert served.mean_confidence is not None and served.project(np.ones((3, 8), np.float32)).shape == (3, 2)
    bare = read_reference(read_bundle(write_bundle(tmp_path / "c", reference={"class_prior": [1.0, 2.0, 3.0]})))
    np.testing.assert_allclose(bare.class_prior, [0.5, 0.5])  # a prior of the wrong length is not this model's
    assert bare.mean_confidence is None and bare.project(np.ones((1, 8))) is None
