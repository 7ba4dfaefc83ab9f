"""The learning-rate range test (`cnnloop lr-find`) on real digits at 32 px, and its suggestion rules on arrays."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from exporters.preprocess import ResizePolicy
from training.model.backbones import get_backbone_spec
from training.cli import app
from training.config import load_train_config
from training.data.splits import prepare_splits
from training.data.sources import discover
from training.errors import TrainingError
from training.lr_find import (SmoothedLoss, apply_lr, find_lr, range_test, suggest_minimum, suggest_steepest,
                              suggest_valley)
from training.model.classifier import build_classifier
from training.loop.batches import make_criterion, make_train_loader
from tests.training_data import fast_config, make_digits

SMALL = ["--image-size", "32", "--batch-size", "16", "--no-hflip", "--num-threads", "2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits(tmp_path_factory.mktemp("digits"), digits=(0, 1, 2), per_class=20)


@pytest.fixture(scope="module")
def sweep(digits):
    """A 10-step sweep with the top two stages open and their BatchNorm layers updating running stats."""
    cfg = fast_config(image_size=32, bn="train", backbone_lr_ratio=0.1)
    spec = get_backbone_spec(cfg.backbone)
    policy = ResizePolicy.for_crop(cfg.image_size)
    torch.manual_seed(0)
    splits = prepare_splits(discover(digits), cfg, policy, None)
    model, _ = build_classifier(spec, 3, cfg.weights, cfg.dropout)
    model.set_trainable(2)  # all stages open is 4x slower on a CPU and tests nothing more
    bn = next(m for m in model.stages[-1].modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    seen = []
    cpu = torch.device("cpu")
    result = range_test(model, make_train_loader(splits.train, cfg, policy, cpu), make_criterion(splits.train, cfg, cpu),
                        cfg, cpu, start_lr=1e-5, end_lr=1e-1, steps=10,
                        on_step=lambda p: seen.append((model.head.weight.sum().item(), bn.running_mean.sum().item())))
    return {"result": result, "model": model, "before": before, "rng_before": rng_before, "seen": seen}


def test_the_sweep_trains_yet_every_weight_and_batchnorm_stat_comes_back_bit_identical(sweep):
    head, running_mean = zip(*sweep["seen"])
    assert len(set(head)) > 1 and len(set(running_mean)) > 1  # weights and BatchNorm stats did move
    after = sweep["model"].state_dict()
    assert after.keys() == sweep["before"].keys()
    changed = [k for k, v in sweep["before"].items() if not torch.equal(v, after[k])]
    assert not changed, changed
    assert torch.equal(torch.get_rng_state(), sweep["rng_before"])
    assert sweep["model"].frozen_stages == len(sweep["model"].stages) - 2


def test_the_head_lr_grows_exponentially_from_start_to_end(sweep):
    lrs = np.array([p["lr_head"] for p in sweep["result"]["points"]])
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-1)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e4) ** (1 / 9), rtol=1e-9)


def test_every_step_keeps_the_backbone_at_its_ratio_of_the_head_lr(sweep):
    for p in sweep["result"]["points"]:
        for name, lr in p["lrs"].items():
            assert lr == pytest.approx(p["lr_head"] * (0.1 if name.startswith("backbone") else 1.0))


def test_a_huge_end_lr_diverges_and_stops_early_with_bars_drawn(digits):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    result = find_lr(digits, fast_config(image_size=32), start_lr=1e-2, end_lr=1e6, steps=40, console=console,
                     show_progress=True)
    assert result["diverged"] and result["stopped_early"] and len(result["points"]) < 40
    assert "lr range test" in screen.getvalue() and "━" in screen.getvalue()
    lrs = [p["lr_head"] for p in result["points"]]
    for s in result["suggestions"].values():
        assert min(lrs) / 10 <= s["head_lr"] <= max(lrs)
        assert s["backbone_lr"] == pytest.approx(s["head_lr"] * 0.1)
    assert result["open_stages"] == 1  # gradual: the first stage opened after the head-only epochs


def _synthetic_curve():
    """Flat at 2 up to 1e-4, falling to 0.5 at 1e-2 (the minimum), then blowing up."""
    lrs = np.logspace(-7, 1, 100)
    x = np.log10(lrs)
    return lrs, np.where(x < -4, 2.0, np.where(x < -2, 2.0 - 0.75 * (x + 4), 0.5 + 3 * (x + 2) ** 2))


def test_valley_and_steepest_land_on_the_descent_of_a_known_curve():
    lrs, loss = _synthetic_curve()
    smoother = SmoothedLoss(0.9)
    noisy = np.array([smoother.add(v) for v in loss + np.random.default_rng(0).normal(0, 0.02, len(loss))])
    for curve in (loss, noisy):
        for pick in (suggest_valley, suggest_steepest):
            assert 1e-4 < lrs[pick(lrs, curve)] < 1e-2, pick.__name__


def test_valley_picks_two_thirds_down_the_descent():
    lrs, loss = _synthetic_curve()
    assert lrs[suggest_valley(lrs, loss)] == pytest.approx(10 ** (-4 + 2 * 2 / 3), rel=0.25)


def test_minimum_suggestion_is_a_tenth_of_the_lowest_loss_lr():
    lrs, loss = _synthetic_curve()
    assert suggest_minimum(lrs, loss) == pytest.approx(1e-3, rel=0.25)


def test_smoothing_is_bias_corrected():
    smoother = SmoothedLoss(0.98)
    np.testing.assert_allclose([smoother.add(3.0) for _ in range(20)], 3.0)


def test_apply_writes_the_lr_and_keeps_the_other_keys_and_comments(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 3\n# tuned by hand\nlr: 0.1\n")
    assert apply_lr(config, 1.23e-05) == (0.1, 1.23e-05)
    cfg = load_train_config(config)
    assert cfg.lr == 1.23e-05 and cfg.epochs == 3 and "# tuned by hand" in config.read_text()


def test_apply_creates_a_missing_config(tmp_path):
    config = tmp_path / "new.yaml"
    assert apply_lr(config, 0.003) == (None, 0.003)
    assert load_train_config(config).lr == 0.003


def test_apply_to_a_yaml_list_is_an_error_and_leaves_the_file_alone(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- lr\n- 0.1\n")
    with pytest.raises(TrainingError, match="not a mapping"):
        apply_lr(config, 0.003)
    assert config.read_text() == "- lr\n- 0.1\n"


def test_the_cli_prints_json_writes_the_png_and_applies_the_lr(digits, tmp_path):
    out, recipe = tmp_path / "lrf", tmp_path / "recipe.yaml"
    result = CliRunner().invoke(app, ["lr-find", str(digits), "--out", str(out), "--json", "-", "--steps", "10",
                                      "--end-lr", "1", "--apply", str(recipe), "--quiet", *SMALL])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["recommended"] == "valley" and len(printed["points"]) <= 10
    assert (out / "lr_find.png").stat().st_size > 0
    assert json.loads((out / "lr_find.json").read_text())["lr"] == printed["lr"]
    assert load_train_config(recipe).lr == printed["lr"]
    assert "lr unset (recipe default) ->" in result.stderr


@pytest.mark.parametrize("flags,message", [(["--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
                                           (["--steps", "5"], "at least 10")])
def test_a_bad_sweep_exits_2_with_a_message(digits, flags, message):
    result = CliRunner().invoke(app, ["lr-find", str(digits), *flags, "--quiet"])
    assert result.exit_code == 2 and message in result.stderr, result.output
