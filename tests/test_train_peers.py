"""bench/train_peers.py: the report's arithmetic and verdicts, its resume rule, and BENCHMARKS.md quoting
the measured report (the peers themselves are a bench-only extra, so the training runs are not run here)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_peers", ROOT / "bench" / "train_peers.py")
train_peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_peers)


def a_run(train_s: float, n_train: int = 100, accuracy: float = 0.9, rss: float = 1000.0, epochs: int = 4, best: int = 2,
          lr_find: dict | None = None) -> dict:
    t0 = 1000.0
    rows = [{"train_s": train_s, "val_s": 1.0, "end": t0 + 5 + (i + 1) * (train_s + 1.0)} for i in range(epochs)]
    run = {"n_train": n_train, "epochs": rows, "best_epoch": best, "t_spawn": t0, "total_wall_s": 60.0, "peak_rss_mib": rss,
           "peak_tree_pss_mib": rss * 1.2, "test": {"n": 50, "accuracy": accuracy, "macro_f1": accuracy - 0.01}}
    if lr_find:
        run["lr_find"] = lr_find
    return run


def test_summary_rates_are_train_images_over_train_seconds_and_scores_are_mean_and_std():
    s = train_peers.summarise([a_run(10.0, accuracy=0.90), a_run(5.0, accuracy=0.94), {"failed": "exit code 1"}])
    assert s["seeds"] == 2
    assert s["images_per_s"]["mean"] == pytest.approx((10 + 20) / 2)
    assert s["s_per_epoch"]["mean"] == pytest.approx((11 + 6) / 2)
    assert s["test_accuracy"]["mean"] == pytest.approx(0.92) and s["test_accuracy"]["std"] == pytest.approx(0.0283, abs=1e-4)
    # The end of the best (0-based) epoch, from process start.
    assert s["wall_to_best_s"]["mean"] == pytest.approx(((5 + 3 * 11) + (5 + 3 * 6)) / 2)


def test_a_seed_that_reused_lr_find_is_charged_its_seconds():
    own = a_run(10.0, lr_find={"valley": 1e-3, "seconds": 30.0})
    reused = a_run(10.0, lr_find={"valley": 1e-3, "seconds": 30.0, "seed": 0, "reused_from_seed": 0})
    assert train_peers.summarise([reused])["wall_to_best_s"]["mean"] == train_peers.summarise([own])["wall_to_best_s"]["mean"] + 30.0


def test_the_verdicts_follow_the_targets():
    summary = {"cnnloop": train_peers.summarise([a_run(4.0, accuracy=0.90, rss=900), a_run(4.0, accuracy=0.92, rss=900)]),
               "fastai": train_peers.summarise([a_run(10.0, accuracy=0.95, rss=2000), a_run(10.0, accuracy=0.93, rss=2000)]),
               "lightning": train_peers.summarise([a_run(5.0, accuracy=0.91, rss=800), a_run(5.0, accuracy=0.91, rss=800)])}
    c = train_peers.compare(summary)
    assert c["faster_peer"] == "lightning" and c["images_per_s_ratio"] == pytest.approx(1.25)
    assert c["most_accurate_peer"] == "fastai" and c["accuracy_gap"] == pytest.approx(-0.03)
    assert c["targets"] == {"images_per_s >= 1.2x": True, "peak RSS <= faster peer's": False, "accuracy within one seed-std": False}
    summary["cnnloop"] = train_peers.summarise([a_run(4.5, accuracy=0.93, rss=700), a_run(4.5, accuracy=0.93, rss=700)])
    assert train_peers.compare(summary)["targets"] == {"images_per_s >= 1.2x": False, "peak RSS <= faster peer's": True,
                                                       "accuracy within one seed-std": True}


def test_a_finished_run_is_read_back_only_when_its_inputs_are_the_same(tmp_path):
    spec = {"framework": "cnnloop", "seed": 1, "epochs": 12, "batch": 32, "image_size": 288, "threads": 2, "workers": 2,
            "lr_find_iters": 100, "train": [["a.jpg", "ants"]], "val": [["b.jpg", "bees"]], "test": [], "lr_found": None,
            "t_spawn": 5.0, "run_dir": "/somewhere"}
    done = tmp_path / "run.done.json"
    assert train_peers.resumed(spec, done) is None
    done.write_text(json.dumps({"key": train_peers.run_key(spec), "result": {"epochs": []}}))
    assert train_peers.resumed({**spec, "t_spawn": 9.0, "run_dir": "/elsewhere"}, done) == {"epochs": []}
    for changed in ({"seed": 2}, {"epochs": 6}, {"image_size": 64}, {"val": [["c.jpg", "bees"]]}):
        assert train_peers.resumed({**spec, **changed}, done) is None, changed


def test_benchmarks_md_quotes_the_measured_report():
    """BENCHMARKS.md's peer tables are markdown() of bench/results/train_peers.json, line for line."""
    report = json.loads(ROOT.joinpath("bench/results/train_peers.json").read_text())
    assert set(report["datasets"]) == {"hymenoptera", "digits"}
    for name, d in report["datasets"].items():
        assert d["config"]["seeds"] == [0, 1, 2] and not d["config"]["smoke"], name
        assert all(d["summary"][fw].get("seeds") == 3 for fw in train_peers.FRAMEWORKS), name
    benchmarks = ROOT.joinpath("BENCHMARKS.md").read_text()
    missing = [line for line in train_peers.markdown(report).splitlines() if line.strip() and line not in benchmarks]
    assert not missing, f"BENCHMARKS.md does not quote these lines of the report: {missing}"
