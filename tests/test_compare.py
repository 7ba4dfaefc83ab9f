"""`cnnloop compare`: the same recipe and folds for every backbone, then accuracy vs ONNX Runtime speed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.training_data import make_digits
from training.cli import app
from training.compare import held_out_fingerprint, pareto_front

CNNLOOP = Path(sys.executable).parent / "cnnloop"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1")
RECIPE = ["--epochs", "1", "--image-size", "32", "--batch-size", "16", "--no-hflip", "--num-threads", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits(tmp_path_factory.mktemp("digits") / "images", per_class=12)


@pytest.fixture(scope="module")
def compared(digits, tmp_path_factory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """One real run of the CLI, as a user types it: 2 backbones, 2 folds, 1 epoch at 32 px."""
    out = tmp_path_factory.mktemp("compare")
    proc = subprocess.run([str(CNNLOOP), "compare", str(digits), "--backbones", ",".join(BACKBONES), "--folds", "2",
                           "--out", str(out), "--bench-seconds", "0.3", "--rounds", "2", "--json", "-", "--quiet", *RECIPE],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout), out, proc


def test_every_backbone_is_scored_on_the_same_held_out_files(compared):
    result, _, _ = compared
    fingerprints = [r["held_out_sha256"] for r in result["backbones"]]
    assert [r["backbone"] for r in result["backbones"]] == list(BACKBONES)
    assert len(fingerprints[0]) == 2 and len(set(fingerprints[0])) == 2  # two folds, different files
    assert fingerprints[0] == fingerprints[1] == result["folds"]["held_out_sha256"]
    assert [sum(f["n_test"] for f in r["folds"]) for r in result["backbones"]] == [36, 36]


def test_the_json_holds_sane_scores_sizes_and_speeds_for_every_backbone(compared):
    result, out, _ = compared
    assert json.loads((out / "compare.json").read_text()) == result
    for r in result["backbones"]:
        for metric in (r["accuracy"], r["macro_f1"], r["linear_probe"]["accuracy"]):
            assert 0.0 <= metric["mean"] <= 1.0 and metric["std"] >= 0.0
        assert r["beats_linear_probe"] == (r["accuracy"]["mean"] > r["linear_probe"]["accuracy"]["mean"])
        assert r["image_size"] == 32 and r["train_seconds"]["folds_total"] > 0
        assert r["train_seconds"]["per_fold_mean"] == pytest.approx(r["train_seconds"]["folds_total"] / 2)
        export = r["export"]
        assert Path(export["path"]).stat().st_size == export["onnx_fp32_bytes"] > 1_000_000
        assert "last fold" in export["model"] and export["parity_vs_torch"]["top1_agreement"] == 1.0
        for batch in ("batch_1", "batch_32"):
            t = r["onnxruntime"][batch]
            assert t["images_per_s"] > 0 and t["p50_ms"] > 0 and t["calls"] >= 2  # >= 1 call per round
    # Lite1 is the bigger network: more bytes (throughput is too noisy on a shared CI core to assert).
    sizes = [r["export"]["onnx_fp32_bytes"] for r in result["backbones"]]
    assert sizes[0] < sizes[1]
    assert result["pareto_front"] == [r["backbone"] for r in result["backbones"] if r["pareto"]] and result["pareto_front"]
    assert result["timing"]["intra_op_threads"] >= 1


def test_the_pareto_plot_is_written(compared):
    _, out, _ = compared
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_table_flags_each_backbone_against_its_linear_probe(compared):
    result, _, proc = compared
    for r in result["backbones"]:
        assert r["backbone"] in proc.stderr
    if not all(r["beats_linear_probe"] for r in result["backbones"]):
        assert "NO" in proc.stderr and "not above the linear probe" in proc.stderr


def test_an_unknown_backbone_exits_2_before_any_training(digits, tmp_path):
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["compare", str(digits), "--backbones", "efficientnet_lite0,efficientnet_lit2",
                                      "--out", str(tmp_path / "out"), "--quiet", *RECIPE])
    assert result.exit_code == 2, result.output
    assert "unknown backbone 'efficientnet_lit2'" in result.output and "efficientnet_lite2" in result.output  # suggested
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 30


def test_a_single_backbone_exits_2(digits, tmp_path):
    result = CliRunner().invoke(app, ["compare", str(digits), "--backbones", "efficientnet_lite0", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 2 and "at least 2 backbones" in result.output


@pytest.mark.parametrize("args,message", [
    (["--backbones", "efficientnet_lite0,efficientnet_lite0"], "more than once"),
    (["--backbones", "efficientnet_lite0,efficientnet_lite1", "--folds", "1"], "at least 2"),
    (["--backbones", "efficientnet_lite0,resnet18"], "no weights that ship offline"),
], ids=["duplicate", "one-fold", "no-weights"])
def test_bad_requests_exit_2(digits, tmp_path, args, message):
    result = CliRunner().invoke(app, ["compare", str(digits), *args, "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_the_pareto_front_keeps_points_no_other_beats_on_both_axes():
    # (accuracy, images/s): c is beaten by a on both; b and d trade one for the other; e ties a.
    points = [(0.9, 100.0), (0.8, 300.0), (0.85, 90.0), (0.95, 50.0), (0.9, 100.0)]
    assert pareto_front(points) == [True, True, False, True, True]


def test_the_held_out_fingerprint_ignores_order_but_not_membership():
    assert held_out_fingerprint(["b.png", "a.png"]) == held_out_fingerprint([Path("a.png"), Path("b.png")])
    assert held_out_fingerprint(["a.png", "b.png"]) != held_out_fingerprint(["a.png", "c.png"])
