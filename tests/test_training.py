"""Training end to end on small real data (scikit-learn digits) at 64 px on the CPU."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.loop.fit as fit_module
import training.train as train_module
from exporters.preprocess import ResizePolicy
from training.data.augment import eval_crop
from training.model.backbones import get_backbone_spec
from training.cv import cross_validate
from training.data.sources import labeled_folder
from training.loop.steps import predict
from training.errors import TrainingError
from training.evaluate import evaluate_run
from training.data.decode import DecodedImages, decode_files
from training.model.classifier import build_classifier
from training.run.files import load_run
from training.train import train
from training.loop.batches import make_criterion, make_train_loader
from tests.training_data import fast_config, make_digits, write_png


@pytest.fixture(scope="module")
def digits3(tmp_path_factory):
    return make_digits(tmp_path_factory.mktemp("digits3"), digits=(0, 1, 7), per_class=30)


@pytest.fixture(scope="module")
def trained_and_fitted(digits3, tmp_path_factory):
    """The run directory, its metrics, and the in-memory model the run saved (recorded, not replaced)."""
    out = tmp_path_factory.mktemp("run")
    fitted = []

    def recording_fit_model(*args, **kwargs):
        fitted.append(fit_module.fit_model(*args, **kwargs))
        return fitted[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "fit_model", recording_fit_model)
        metrics = train(digits3, out, fast_config(epochs=4, strategy="finetune", lr=3e-3), show_progress=False)
    return out, metrics, fitted[0].model


@pytest.fixture(scope="module")
def trained(trained_and_fitted):
    out, metrics, _ = trained_and_fitted
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


def test_the_run_fits_its_calibration_on_val_and_reports_it_on_test(trained):
    out, metrics = trained
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["temperature"] > 0 and calibration["coverage"] == 0.9
    assert calibration["n_calibration"] == metrics["val"]["n"]
    assert metrics["calibration"]["fitted_on"] == "val" and metrics["calibration"]["temperature"] == calibration["temperature"]
    # The temperature minimises NLL on val, so val NLL cannot rise (the golden-section search includes T near 1).
    assert metrics["calibration"]["val"]["after"]["nll"] <= metrics["calibration"]["val"]["before"]["nll"] + 1e-6
    for key in ("ece", "nll", "brier"):
        assert key in metrics["calibration_test"]["before"] and key in metrics["calibration_test"]["after"]
    assert metrics["prediction_sets"]["n"] == sum(metrics["class_counts"]["test"].values())
    assert set(metrics["risk_coverage"]["at_coverage"]) == {"0.80", "0.90", "1.00"}
    for png in ("reliability.png", "risk_coverage.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_splits_are_disjoint_and_test_is_stratified(trained):
    out, _ = trained
    splits = json.loads((out / "splits.json").read_text())
    sets = [set(splits[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 90
    assert len(sets[2]) == 15  # 15% of 30 per class, rounded: 5 x 3


def test_weights_load_with_safetensors_and_rebuild_the_same_predictions(trained_and_fitted, digits3):
    out, metrics, trained_model = trained_and_fitted
    state = load_file(str(out / "model.safetensors"))
    assert "head.weight" in state and state["head.weight"].shape[0] == 3
    scores = evaluate_run(out, digits3)
    assert scores["n"] == 90 and scores["accuracy"] >= 0.8

    rebuilt = load_run(out)
    decoded, _ = decode_files(labeled_folder(digits3, rebuilt.classes), rebuilt.policy.resize_size)
    images, cpu = eval_crop(decoded.images, rebuilt.policy), torch.device("cpu")
    trained_probs, _ = predict(trained_model.cpu(), images, cpu)
    rebuilt_probs, _ = predict(rebuilt.model, images, cpu)
    np.testing.assert_allclose(rebuilt_probs, trained_probs, rtol=1e-5, atol=1e-6)
    assert np.array_equal(rebuilt_probs.argmax(1), trained_probs.argmax(1))
    assert scores["accuracy"] == pytest.approx(np.mean(trained_probs.argmax(1) == decoded.labels.numpy()))


def test_evaluate_writes_scores_and_confusion_png(trained, digits3, tmp_path):
    out, _ = trained
    evaluate_run(out, digits3, tmp_path / "eval")
    assert (tmp_path / "eval" / "confusion.png").is_file()
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["classes"] == ["0", "1", "7"]
    # With the run's calibration: its sets and accuracy against coverage on this folder, and the PNGs.
    assert scores["prediction_sets"]["n"] == 90 and scores["calibration"]["temperature"] > 0
    assert scores["risk_coverage"]["at_coverage"]["1.00"]["accuracy"] == pytest.approx(scores["accuracy"])
    assert (tmp_path / "eval" / "reliability.png").is_file() and (tmp_path / "eval" / "risk_coverage.png").is_file()


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


def _imbalanced(counts=(40, 10), size=20) -> DecodedImages:
    labels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)])
    images = torch.randint(0, 256, (len(labels), 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return DecodedImages(images, labels, [Path(f"{i}.png") for i in range(len(labels))], ["many", "few"])


def test_balance_sampler_draws_both_classes_equally_often_from_a_four_to_one_set():
    data, policy = _imbalanced((40, 10)), ResizePolicy(crop_size=16, resize_size=20)

    def share_of_few(balance: str) -> float:
        loader = make_train_loader(data, fast_config(balance=balance, augment="none"), policy, torch.device("cpu"))
        drawn = torch.cat([labels for _ in range(40) for _, labels in loader])
        return float((drawn == 1).float().mean())

    assert share_of_few("none") == pytest.approx(0.2, abs=0.02)  # shuffled, not balanced: 10 of 50
    assert share_of_few("sampler") == pytest.approx(0.5, abs=0.05)  # ~1900 seeded draws


def test_balance_loss_weighs_each_class_by_its_inverse_frequency():
    data, cpu = _imbalanced((40, 10)), torch.device("cpu")
    weight = make_criterion(data, fast_config(balance="loss"), cpu).weight
    assert torch.allclose(weight, torch.tensor([50 / (2 * 40), 50 / (2 * 10)]))  # N / (K * count_k)
    assert make_criterion(data, fast_config(balance="sampler"), cpu).weight is None  # never both at once
    assert make_criterion(data, fast_config(balance="none"), cpu).weight is None


def test_cross_validation_reports_mean_and_std_over_folds(digits3):
    result = cross_validate(digits3, fast_config(epochs=2, strategy="finetune", lr=3e-3), folds=3, show_progress=False)
    assert len(result["folds"]) == 3 and sum(f["n_test"] for f in result["folds"]) == 90
    s = result["summary"]["accuracy"]
    assert 0.6 <= s["mean"] <= 1.0 and s["std"] >= 0
    # The floor, on the same folds: a probe per fold, scored on as many images as the recipe.
    probe = result["linear_probe"]
    assert [f["fold"] for f in probe["folds"]] == [0, 1, 2]
    assert all(f["C"] > 0 and f["inner_folds"] >= 2 for f in probe["folds"])
    assert 0.0 <= probe["summary"]["accuracy"]["mean"] <= 1.0
    assert result["beats_linear_probe"] == (s["mean"] > probe["summary"]["accuracy"]["mean"])


def test_the_linear_probe_learns_separable_features_and_chooses_c_from_training_data_only():
    from training.linear_probe import C_GRID, probe_scores

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 64)) * 3
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.standard_normal((120, 64))
    train, test = np.arange(120) % 4 != 0, np.arange(120) % 4 == 0
    clean = probe_scores(x[train], y[train], x[test], y[test], ["a", "b", "c"], seed=0)
    assert clean["accuracy"] == 1.0 and clean["C"] in C_GRID
    # Poisoned test labels change the score, never the C: the inner CV sees training data only.
    poisoned = probe_scores(x[train], y[train], x[test], (y[test] + 1) % 3, ["a", "b", "c"], seed=0)
    assert poisoned["C"] == clean["C"] and poisoned["accuracy"] == 0.0
    shuffled = rng.permutation(y)  # labels that have nothing to do with the features: about chance
    noise = probe_scores(x[:90], shuffled[:90], x[90:], shuffled[90:], ["a", "b", "c"], seed=0)
    assert noise["accuracy"] < 0.7


def test_a_second_run_into_the_same_directory_is_refused(trained, digits3):
    out, _ = trained
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(digits3, out, fast_config(epochs=1), show_progress=False)
