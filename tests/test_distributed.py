"""`cnnloop train` under a real torchrun: two CPU workers over gloo train one model; rank 0 writes it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.loop.distributed import DistributedWeightedSampler, state_fingerprint
from tests.training_data import make_digits

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

# Imported at start-up by every Python process of the job (it is first on PYTHONPATH). Each torchrun
# worker records the files it opens for writing and the folders it makes under the run directory,
# seen from outside the code under test. Only safetensors' own (Rust) writes escape it.
WRITE_RECORDER = """
import atexit, json, os, sys
if "RANK" in os.environ:
    watched, seen = os.environ["WATCHED_DIR"], []
    def record(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and args[2] & (os.O_WRONLY | os.O_RDWR):
            path = os.fspath(args[0])
        elif event == "os.mkdir":
            path = os.fspath(args[0])
        else:
            return
        if str(path).startswith(watched):
            seen.append(os.path.relpath(path, watched))
    sys.addaudithook(record)
    out = os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.json")
    atexit.register(lambda: open(out, "w").write(json.dumps(seen)))
"""

# 64 px, 3 epochs with one head-only epoch: the job opens a new stage at epochs 1 and 2, so the DDP
# wrapper is rebuilt twice; --bn train makes every worker's BatchNorm statistics drift apart between syncs.
RECIPE = ["--image-size", "64", "--epochs", "3", "--batch-size", "8", "--no-hflip", "--num-threads", "1",
          "--strategy", "gradual", "--head-epochs", "1", "--unfreeze-every", "1", "--bn", "train", "--quiet"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_digits(root / "digits", digits=(0, 1, 7), per_class=20)
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(WRITE_RECORDER)
    (root / "writes").mkdir()
    out = root / "run"
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root), "PYTHONPATH": f"{root / 'site'}:{ROOT}",
           "WATCHED_DIR": str(out), "RECORD_DIR": str(root / "writes"), "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--log-dir", str(root / "logs"), "--redirects", "3",
           "--no-python", str(BIN / "cnnloop"), "train", str(data), "--out", str(out), *RECIPE]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    logs = {r: "".join(p.read_text() for p in sorted((root / "logs").glob(f"*/attempt_0/{r}/*.log"))) for r in (0, 1)}
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nrank 0:\n{logs[0][-3000:]}\nrank 1:\n{logs[1][-3000:]}"
    writes = {r: json.loads((root / "writes" / f"rank{r}.json").read_text()) for r in (0, 1)}
    return {"out": out, "logs": logs, "writes": writes, "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.mark.slow
def test_both_workers_end_with_the_saved_weights_bit_for_bit_across_unfreezing_steps(job):
    assert [row["open_stages"] for row in job["metrics"]["history"]] == [0, 1, 2]
    saved = state_fingerprint(load_file(str(job["out"] / "model.safetensors")))
    assert job["metrics"]["distributed"] == {"world_size": 2, "weights_sha256": [saved, saved]}


@pytest.mark.slow
def test_only_rank_0_writes_the_run_directory(job):
    assert job["writes"][1] == []
    assert job["writes"][0].count("metrics.json") == 1
    assert sorted(p.name for p in job["out"].iterdir()) == sorted([
        "calibration.json", "classes.json", "config.yaml", "confusion_test.png", "confusion_val.png", "curves.png",
        "metrics.json", "model.json", "model.safetensors", "reliability.png", "risk_coverage.png", "skipped_images.json",
        "splits.json"])


@pytest.mark.slow
def test_only_rank_0_prints_the_log_and_the_scores(job):
    for line in ("class counts:", "best epoch"):
        assert line in job["logs"][0]
        assert line not in job["logs"][1]


def _shards(weights, epoch: int = 0) -> list[list[int]]:
    samplers = [DistributedWeightedSampler(weights, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


def test_distributed_weighted_sampler_gives_equal_shards_that_together_are_class_balanced():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = (1.0 / torch.bincount(labels).float())[labels]
    shards = _shards(weights)
    assert [len(s) for s in shards] == [50, 50]
    minority = sum(int(labels[i]) for s in shards for i in s) / 100
    assert 0.35 <= minority <= 0.65  # 0.10 without the weights


def test_distributed_weighted_sampler_draws_a_new_epoch_after_set_epoch():
    weights = torch.ones(40)
    assert _shards(weights, epoch=0) == _shards(weights, epoch=0)
    assert _shards(weights, epoch=0) != _shards(weights, epoch=1)
