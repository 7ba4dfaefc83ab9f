"""Training end to end on small real data (scikit-learn digits) at 64 px on the CPU."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.fit as fit_module
from training.backbones import get_backbone_spec
from training.cv import cross_validate
from training.errors import TrainingError
from training.evaluate import evaluate_run
from training.fit import train
from training.model import build_classifier
from training.run_dir import load_run
from tests.training_data import fast_config, make_digits, write_png


@pytest.fixture(scope="module")
def digits3(tmp_path_factory):
    return make_digits(tmp_path_factory.mktemp("digits3"), digits=(0, 1, 7), per_class=30)


@pytest.fixture(scope="module")
def trained(digits3, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train(digits3, out, fast_config(epochs=4, strategy="finetune", lr=3e-3), show_progress=False)
    return out, metrics


def test_training_on_tiny_digits_learns_far_above_chance(trained):
    _, metrics = trained
    assert metrics["test"]["accuracy"] >= 0.8  # chance is 0.33
    assert metrics["val"]["accuracy"] >= 0.8


def test_run_dir_holds_weights_metrics_plots_and_class_list(trained):
    out, _ = trained
    for name in ("model.safetensors", "model.json", "config.yaml", "classes.json", "metrics.json",
                 "curves.png", "confusion_val.png", "confusion_test.png", "splits.json", "skipped_images.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {"accuracy", "macro_f1", "macro_precision", "macro_recall", "per_class", "confusion_matrix"} <= set(metrics[split])
    assert len(metrics["history"]) == 4 and {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(metrics["history"][0])
    assert json.loads((out / "classes.json").read_text()) == ["0", "1", "7"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_splits_are_disjoint_and_test_is_stratified(trained):
    out, _ = trained
    splits = json.loads((out / "splits.json").read_text())
    sets = [set(splits[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 90
    assert len(sets[2]) == 15  # 15% of 30 per class, rounded: 5 x 3


def test_weights_load_with_safetensors_and_rebuild_the_same_predictions(trained, digits3):
    out, metrics = trained
    state = load_file(str(out / "model.safetensors"))
    assert "head.weight" in state and state["head.weight"].shape[0] == 3
    scores = evaluate_run(out, digits3)
    assert scores["n"] == 90 and scores["accuracy"] >= 0.8


def test_evaluate_writes_scores_and_confusion_png(trained, digits3, tmp_path):
    out, _ = trained
    evaluate_run(out, digits3, tmp_path / "eval")
    assert (tmp_path / "eval" / "confusion.png").is_file()
    assert json.loads((tmp_path / "eval" / "scores.json").read_text())["classes"] == ["0", "1", "7"]


def test_frozen_backbone_weights_do_not_change_while_the_head_learns(digits3, tmp_path):
    spec = get_backbone_spec("efficientnet_lite0")
    before, _ = build_classifier(spec, 3)
    train(digits3, tmp_path / "run", fast_config(epochs=1, strategy="freeze", lr=1e-2, bn="train"), show_progress=False)
    after = load_run(tmp_path / "run").model
    for (name, a), b in zip(before.stages.state_dict().items(), after.stages.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed although the backbone was frozen"
    assert not torch.allclose(before.head.weight, after.head.weight)


def test_early_stopping_restores_the_weights_of_the_best_epoch(digits3, tmp_path, monkeypatch):
    scripted = iter([0.9, 0.4, 0.6, 0.7, 0.8, 0.95])
    snapshots = []
    real_score = fit_module.score_split

    def scripted_score(model, data, policy, device, cfg):
        scores, probs, embs = real_score(model, data, policy, device, cfg)
        snapshots.append(model.head.weight.detach().clone())
        return {**scores, "loss": next(scripted)}, probs, embs

    monkeypatch.setattr(fit_module, "score_split", scripted_score)
    metrics = train(digits3, tmp_path / "run", fast_config(epochs=6, patience=2, strategy="freeze", lr=1e-2), show_progress=False)
    assert metrics["best_epoch"] == 1
    assert len(metrics["history"]) == 4  # epochs 2 and 3 did not improve: stop after epoch 3
    assert torch.equal(load_run(tmp_path / "run").model.head.weight, snapshots[1])


def test_corrupt_and_zero_byte_images_are_skipped_and_listed(tmp_path):
    data = make_digits(tmp_path / "d", digits=(3, 4), per_class=12)
    (data / "3" / "empty.png").write_bytes(b"")
    (data / "4" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    metrics = train(data, tmp_path / "run", fast_config(epochs=1), show_progress=False)
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert sorted(p["path"].rsplit("/", 1)[-1] for p in skipped) == ["broken.jpg", "empty.png"]
    assert metrics["skipped_images"] == 2
    assert "0 bytes" in next(p["reason"] for p in skipped if p["path"].endswith("empty.png"))


def test_csv_manifest_with_split_column_is_read(tmp_path):
    rows = ["path,label,split"]
    for cls, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(10):
            split = "val" if i >= 8 else "train"
            write_png(tmp_path / "img" / f"{cls}{i}.png", rgb, seed=i)
            rows.append(f"img/{cls}{i}.png,{cls},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    metrics = train(tmp_path / "m.csv", tmp_path / "run", fast_config(epochs=2, test_fraction=0.0, lr=1e-2), show_progress=False)
    assert metrics["class_counts"]["val"] == {"blue": 2, "red": 2}
    assert metrics["val"]["accuracy"] == 1.0


def test_balance_sampler_and_loss_both_train(tmp_path):
    data = make_digits(tmp_path / "d", digits=(5, 6), per_class=12)
    for mode in ("sampler", "loss"):
        m = train(data, tmp_path / mode, fast_config(epochs=1, balance=mode), show_progress=False)
        assert m["class_counts"]["train"]


def test_cross_validation_reports_mean_and_std_over_folds(digits3):
    result = cross_validate(digits3, fast_config(epochs=2, strategy="finetune", lr=3e-3), folds=3, show_progress=False)
    assert len(result["folds"]) == 3 and sum(f["n_test"] for f in result["folds"]) == 90
    s = result["summary"]["accuracy"]
    assert 0.6 <= s["mean"] <= 1.0 and s["std"] >= 0


def test_a_second_run_into_the_same_directory_is_refused(trained, digits3):
    out, _ = trained
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(digits3, out, fast_config(epochs=1), show_progress=False)
