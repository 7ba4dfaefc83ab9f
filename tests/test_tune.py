"""`cnnloop tune`: real Optuna studies over real (tiny) fine-tuning runs on the digits images.

What is shown: the space is checked before any trial; no trial reads the test split; each pruner
(median, hyperband) stops a bad trial; Ctrl-C or SIGTERM stops cleanly and the same command resumes;
the best config trains to the same score through `cnnloop train --config`; two worker processes
share one PostgreSQL study exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.terminal import ctrl_c_live
from tests.training_data import make_digits

CLI = [str(Path(sys.executable).parent / "cnnloop"), "tune"]
# A recipe small enough for a CPU test: 32 px, 2-3 epochs, one backbone and batch size (fixed by flag,
# so they leave the search space).
FAST = ["--image-size", "32", "--epochs", "3", "--batch-size", "16", "--no-hflip", "--num-threads", "2",
        "--patience", "10", "--backbone", "efficientnet_lite0"]


def tune(*args, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits(tmp_path_factory.mktemp("digits") / "train", per_class=12)


@pytest.fixture(scope="module")
def digits_with_test(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    make_digits(root / "train", per_class=12)
    make_digits(root / "test_src", per_class=16)
    # The test split: the last 4 images of each class (distinct from train's first 12).
    for cls in sorted(p.name for p in (root / "test_src").iterdir()):
        (root / "test" / cls).mkdir(parents=True)
        for f in sorted((root / "test_src" / cls).iterdir())[12:]:
            shutil.copy(f, root / "test" / cls / f.name)
    shutil.rmtree(root / "test_src")
    return root


def trials(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())


def load(out: Path, name: str = "cnnloop") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


# --- the space is checked before any trial ---------------------------------------------------------

@pytest.mark.parametrize("space, message", [
    ({"lrr": {"low": 1e-4, "high": 1e-2}}, "unknown key 'lrr'; did you mean 'lr'?"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "lr needs low < high"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "log: true, which needs low > 0"),
    ({"dropout": {"low": 0.0, "high": 1.5}}, "dropout=1.5 is not a valid value"),
    ({"head_epochs": {"low": 0.5, "high": 3}}, "integer setting"),
    ({"strategy": {"choices": ["freeze", "thaw"]}}, "strategy='thaw' is not a valid value"),
    ({"strategy": {"choices": []}}, "non-empty list"),
    ({"lr": {"low": 1e-4}}, "must be a value, {choices"),
    ({"backbone": {"choices": ["efficientnet_lite0", "resnet18"]}}, "'resnet18' has no offline weights"),
    (["lr"], "must be a YAML mapping"),
])
def test_a_bad_space_fails_before_any_trial(digits, tmp_path, space, message):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    proc = tune(digits, "--trials", 2, "--space", tmp_path / "space.yaml", "--out", tmp_path / "out", *FAST, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert not (tmp_path / "out" / "study.db").exists(), "a study was opened before the space was checked"


@pytest.mark.parametrize("flags, message", [
    (["--trials", "0"], "--trials must be at least 1"),
    (["--folds", "1"], "--folds must be at least 2"),
    (["--pruner", "asha"], "--pruner must be one of median, hyperband, none"),
    (["--timeout", "soon"], "is not a duration"),
    (["--storage", "mysql://u@h/db"], "is not a storage cnnloop tune can share"),
])
def test_bad_flags_exit_2_with_the_reason(digits, tmp_path, flags, message):
    proc = tune(digits, "--out", tmp_path / "out", *FAST, *flags, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split())


def test_an_empty_storage_secret_is_refused(digits, tmp_path):
    proc = tune(digits, "--trials", 1, "--out", tmp_path / "out", *FAST, check=False, env={"CNNLOOP_TUNE_STORAGE": ""})
    assert proc.returncode == 2 and "CNNLOOP_TUNE_STORAGE is set but empty" in proc.stderr


# --- validation data only --------------------------------------------------------------------------

def test_no_trial_changes_when_the_test_split_is_poisoned(digits_with_test, tmp_path):
    """Same study twice: once with the real test/ split, once with its labels swapped and half of its
    files corrupted. A search that read the test split in any way would score some trial differently."""
    args = ["--trials", 3, "--pruner", "none", *FAST]
    tune(digits_with_test, "--out", tmp_path / "clean", *args)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(digits_with_test, poisoned)
    test = poisoned / "test"
    classes = sorted(p.name for p in test.iterdir())
    for a, b in zip(classes, classes[1:] + classes[:1]):  # rotate the labels
        (test / a).rename(test / f"{b}.tmp")
    for d in test.iterdir():
        d.rename(test / d.name.removesuffix(".tmp"))
    for i, f in enumerate(sorted(test.rglob("*.png"))):
        if i % 2:
            f.write_bytes(b"not an image")
    tune(poisoned, "--out", tmp_path / "dirty", *args)
    clean, dirty = trials(tmp_path / "clean"), trials(tmp_path / "dirty")
    assert [(t["params"], t["value"], t["state"]) for t in clean] == [(t["params"], t["value"], t["state"]) for t in dirty]
    assert len({json.dumps(t["params"], sort_keys=True) for t in clean}) == 3, "the trials did not search"


# --- pruning ---------------------------------------------------------------------------------------

def test_the_pruner_stops_a_scripted_bad_trial(digits, tmp_path):
    out = tmp_path / "out"
    recipe = [*FAST, "--epochs", 4, "--image-size", 64]  # at 64 px the base recipe learns digits within 2 epochs
    tune(digits, "--trials", 2, "--out", out, *recipe)  # the median pruner judges no trial before two have finished
    study = load(out)
    good = study.trials[0]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 and good.user_attrs["epochs_trained"] == 4
    # The script: the next trial is the base recipe with a learning rate that wrecks the weights.
    study.enqueue_trial({**good.params, "lr": 10.0, "optimizer": "adamw", "strategy": "finetune", "backbone_lr_ratio": 1.0})
    proc = tune(digits, "--trials", 3, "--out", out, *recipe)
    bad = load(out).trials[2]
    assert bad.params["lr"] == 10.0
    assert bad.state == TrialState.PRUNED, proc.stderr[-2000:]
    assert 2 <= bad.user_attrs["epochs_trained"] < 4  # 4 epochs: the first one is never judged
    assert "PRUNED" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"] == {"COMPLETE": 2, "PRUNED": 1}


def test_the_hyperband_pruner_stops_a_scripted_bad_trial(digits, tmp_path):
    out = tmp_path / "out"
    # 4 epochs: max_resource 4, so two brackets; the first judges at step 1 (epoch 2) and 3. Optuna
    # places a trial by crc32 of the study name and trial number: in study "cnnloop" trials 0 and 1
    # share the first bracket, where the judge compares them (a trial alone in its bracket always passes).
    recipe = [*FAST, "--epochs", 4, "--image-size", 64, "--pruner", "hyperband"]
    tune(digits, "--trials", 1, "--out", out, *recipe)  # hyperband needs one rival, not two finished trials
    study = load(out)
    good = study.trials[0]
    assert good.state == TrialState.COMPLETE and good.user_attrs["epochs_trained"] == 4
    study.enqueue_trial({**good.params, "lr": 10.0, "optimizer": "adamw", "strategy": "finetune", "backbone_lr_ratio": 1.0})
    proc = tune(digits, "--trials", 2, "--out", out, *recipe)
    bad = load(out).trials[1]
    assert bad.params["lr"] == 10.0
    assert bad.state == TrialState.PRUNED, proc.stderr[-2000:]
    assert bad.user_attrs["epochs_trained"] == 2, "not stopped at the first rung (epoch 2 of 4)"
    assert "PRUNED" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"] == {"COMPLETE": 1, "PRUNED": 1}


# --- Ctrl-C, SIGTERM and resume --------------------------------------------------------------------

def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _trial_states(out: Path) -> list[tuple[str, int]] | None:
    """(state, epochs reported) of each trial, read from the study's SQLite read-only; None before it has trials.

    Read-only on purpose: optuna.load_study on a database that does not exist yet creates it and its
    tables, racing the tune process that is creating them (a full-suite run once lost that race and
    the tune never started its study)."""
    import sqlite3

    db = out / "study.db"
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("SELECT t.state, (SELECT count(*) FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id) "
                               "FROM trials t ORDER BY t.number").fetchall()
    except sqlite3.Error:  # tables not created yet, or the writer holds the lock
        return None


def _mid_trial(out: Path) -> bool:
    """True once some trial after the first is running and has reported an epoch: the signal then lands mid-training."""
    rows = _trial_states(out) or []
    return (len(rows) >= 2 and rows[-1][0] == "RUNNING" and rows[-1][1] > 0
            and all(state == "COMPLETE" for state, _ in rows[:-1]))


# SIGTERM is how Kubernetes stops a tuning worker's pod: it must leave the study as resumable as Ctrl-C does.
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_signal_stops_cleanly_and_the_same_command_resumes(digits, tmp_path, stop):
    out = tmp_path / "out"
    # 12 epochs: each trial runs for seconds, so the poll (which opens the study's SQLite, sometimes
    # locked by the writer) cannot miss every trial's running window; with 6 a full-suite run did once.
    args = [*CLI, digits, "--trials", 3, "--pruner", "none", "--out", out, *FAST, "--epochs", 12]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_live)
    try:
        try:
            _wait_for(lambda: _mid_trial(out), 300, "a trial after the first to report an epoch")
        except AssertionError as e:  # say what the tune was doing: finished, failed, or stuck
            proc.kill()
            _, err = proc.communicate(timeout=60)
            raise AssertionError(f"{e}; tune exit {proc.returncode}, trials {_trial_states(out)}; "
                                 f"stderr tail: {err[-1500:]}") from None
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to resume" in err
    study = load(out)
    states = [t.state for t in study.trials]
    # The trial may finish between the poll and the signal; then the next one is the interrupted one.
    done = states.index(TrialState.FAIL)
    assert 1 <= done <= 2 and states == [TrialState.COMPLETE] * done + [TrialState.FAIL], states
    assert study.trials[done].user_attrs["interrupted"] is True
    finished = [(t.params, t.value) for t in study.trials[:done]]

    tune(*args[len(CLI):])
    rows = trials(out)
    assert [r["state"] for r in rows] == ["COMPLETE"] * done + ["FAIL"] + ["COMPLETE"] * (3 - done)
    assert [(r["params"], r["value"]) for r in rows[:done]] == finished, "resuming changed a finished trial"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counted_trials"] == 3 and summary["stopped_by"] == "budget"


# --- outputs and the best config -------------------------------------------------------------------

def test_best_config_round_trips_through_cnnloop_train(digits_with_test, tmp_path):
    out = tmp_path / "tune"
    proc = tune(digits_with_test, "--trials", 3, "--out", out, "--json", "-", "--test-dir", tmp_path / "nowhere", *FAST, check=False)
    assert proc.returncode == 2 and "already has a test split" in proc.stderr  # checked before any trial
    summary = json.loads(tune(digits_with_test, "--trials", 3, "--out", out, "--json", "-", *FAST).stdout)
    for name in ("best_config.yaml", "trials.json", "summary.json", "optimization_history.png", "slice.png"):
        assert (out / name).stat().st_size > 0, name
    best = summary["best"]
    assert summary["base_recipe"]["number"] == 0 and summary["linear_probe"]["value"] > 0
    run = tmp_path / "run"
    subprocess.run([CLI[0], "train", str(digits_with_test), "--config", str(out / "best_config.yaml"), "--out", str(run),
                    "--quiet"], check=True, capture_output=True, timeout=600)
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: trained[k] for k in best["params"]} == best["params"]
    metrics = json.loads((run / "metrics.json").read_text())
    # The same recipe on the same val split, seeded: train scores exactly what the trial scored.
    assert metrics["val"]["accuracy"] == pytest.approx(best["value"], abs=1e-9)


def test_folds_score_the_mean_over_held_out_folds_and_the_test_dir_once(digits, tmp_path):
    test_dir = make_digits(tmp_path / "test", per_class=4)
    out = tmp_path / "out"
    summary = json.loads(tune(digits, "--trials", 2, "--folds", 2, "--out", out, "--json", "-", "--test-dir", test_dir,
                              *FAST, "--epochs", 2).stdout)
    assert summary["objective"] == "mean held-out-fold accuracy over 2 folds"
    assert len(summary["linear_probe"]["scores"]) == 2
    rows = [r for r in trials(out) if r["state"] == "COMPLETE"]
    assert rows and all(r["epochs_trained"] == 4 and r["fold_std"] >= 0 for r in rows)  # 2 folds x 2 epochs
    test = summary["test"]
    assert test["n"] == 12 and 0 <= test["accuracy"] <= 1
    assert (Path(test["run_dir"]) / "metrics.json").exists()


# --- many workers, one study -----------------------------------------------------------------------

def test_two_workers_share_one_postgresql_study(digits, tmp_path, postgres_url):
    budget = 4
    workers = [subprocess.Popen(list(map(str, [*CLI, digits, "--trials", budget, "--study", "shared", "--pruner", "none",
                                               "--out", tmp_path / f"w{i}", "--quiet", *FAST])),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "CNNLOOP_TUNE_STORAGE": postgres_url, "JOB_COMPLETION_INDEX": str(i)})
               for i in range(2)]
    errs = []
    for w in workers:
        _, err = w.communicate(timeout=900)
        errs.append(err)
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage="postgresql+psycopg:" + postgres_url.split(":", 1)[1])
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(budget)), "the workers ran more or fewer trials than the budget"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == budget, "two trials drew the same recipe"
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}, "one worker did every trial"
    views = [yaml.safe_load((tmp_path / f"w{i}" / "best_config.yaml").read_text()) for i in range(2)]
    assert views[0] == views[1]
    bests = [json.loads((tmp_path / f"w{i}" / "summary.json").read_text())["best"] for i in range(2)]
    assert bests[0] == bests[1] and bests[0]["number"] == study.best_trial.number
    assert np.isclose(bests[0]["value"], study.best_value)
