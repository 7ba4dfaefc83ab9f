"""Does pruning pay? The same trials, run with cnnloop tune's median pruner and without.

The trials are drawn once (Optuna's RandomSampler, seeded) from tune's default space and enqueued, in
the same order, into a study run through `training.tune.run.tune` with `pruner="median"`. Without a
pruner the same trials cost what the completed ones cost plus the pruned ones trained to the end: a
second study, `pruner="none"`, runs every pruned trial and one completed trial, in this same process.
Training is seeded and deterministic on the CPU (tests/test_tune.py shows a trial's score is
reproduced exactly), and the completed trial re-run here is checked to give the same value and
epochs, so the unpruned totals are measured, not modelled. Reported: epochs trained, trial wall
time, the best value found, and the ratios pruned/unpruned; the best values are compared with the
standard error of an accuracy on the val split, sqrt(p(1-p)/n).

  python bench/tune_pruning.py ../shared/datasets/hymenoptera/train --trials 8 --json bench/results/tune_pruning.json

The pruner is tune's default (`training.tune.run.median_pruner_settings`), so the figures follow it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Cheap enough to run 2 x N trials on a 2-core CPU: one backbone at 160 px (--epochs adds the schedule).
FIXED = {"backbone": "efficientnet_lite0", "image_size": 160, "batch_size": 32}


def draw_trials(n: int, seed: int, base) -> list[dict]:
    import optuna

    from training.tune.space import load_space

    space = load_space(None, base, fixed_by_user=set(FIXED))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    drawn = []
    for _ in range(n):
        trial = study.ask()
        drawn.append(space.sample(trial))
        study.tell(trial, 0.0)
    return drawn


def run(data: Path, mode: str, trials: list[dict], base, root: Path) -> list[dict]:
    """Rows of trials.json after a study that runs `trials` in order under pruner `mode`."""
    import optuna

    from training.tune.run import TuneOptions, tune

    out = root / mode
    url = f"sqlite:///{out / 'study.db'}"
    out.mkdir(parents=True)
    study = optuna.create_study(study_name="bench", storage=url, direction="maximize")
    for params in trials:
        study.enqueue_trial(params, user_attrs={"enqueued": "bench"})
    tune(data, out, base, TuneOptions(trials=len(trials), storage=url, study="bench", pruner=mode),
         fixed_by_user=set(FIXED), show_progress=False)
    return json.loads((out / "trials.json").read_text())


def totals(rows: list[dict]) -> dict:
    done = [r for r in rows if r["state"] == "COMPLETE"]
    return {"epochs_trained": sum(r["epochs_trained"] for r in rows), "trial_seconds": sum(r["duration_s"] or 0 for r in rows),
            "best_value": max(r["value"] for r in done), "states": {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=12, help="the schedule of every trial (12: the default recipe's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from training.config import load_train_config

    FIXED["epochs"] = args.epochs
    base = load_train_config(None, FIXED)
    trials = draw_trials(args.trials, args.seed, base)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        pruned_rows = run(args.data, "median", trials, base, Path(tmp))
        unfinished = [f'trial {r["number"]}: {r["state"]}' for r in pruned_rows if r["state"] not in ("COMPLETE", "PRUNED")]
        if unfinished or not any(r["state"] == "COMPLETE" for r in pruned_rows):
            # A comparison needs every trial either finished or pruned, and one finished to re-run as a check.
            print(f"bench stopped before its trials finished ({', '.join(unfinished) or 'no trial completed'}); nothing is reported",
                  file=sys.stderr)
            return 1
        rerun_idx = [r["number"] for r in pruned_rows if r["state"] == "PRUNED"]
        check_idx = next(r["number"] for r in pruned_rows if r["state"] == "COMPLETE")
        full_rows = run(args.data, "none", [trials[i] for i in rerun_idx + [check_idx]], base, Path(tmp))
    check = full_rows[-1]
    original = pruned_rows[check_idx]
    reproduced = check["value"] == original["value"] and check["epochs_trained"] == original["epochs_trained"]
    # Unpruned study = the completed trials as they ran + the pruned ones trained to the end.
    unpruned_rows = [r for r in pruned_rows if r["state"] == "COMPLETE"] + full_rows[:-1]
    pruned, full = totals(pruned_rows), totals(unpruned_rows)
    from training.data.sources import discover

    # The val split tune scores on holds about val_fraction of the images (test is carved beside it).
    n_val = round(len(discover(args.data).train.paths) * base.val_fraction)
    p = full["best_value"]
    se = math.sqrt(p * (1 - p) / max(1, n_val))
    report = {"data": str(args.data), "fixed": FIXED, "trials": trials, "pruned_study": pruned_rows,
              "unpruned_reruns": full_rows, "completed_trial_reproduced": reproduced,
              "median": pruned, "none": full,
              "epochs_ratio": pruned["epochs_trained"] / full["epochs_trained"],
              "trial_seconds_ratio": pruned["trial_seconds"] / full["trial_seconds"],
              "best_gap": pruned["best_value"] - full["best_value"], "val_standard_error": se, "n_val_approx": n_val,
              "load_before": load_before}
    print(f"{'pruner':<8} {'epochs':>7} {'trial s':>8} {'best':>7}  states")
    for name, r in (("median", pruned), ("none", full)):
        print(f"{name:<8} {r['epochs_trained']:>7} {r['trial_seconds']:>8.0f} {r['best_value']:>7.4f}  {r['states']}")
    print(f"pruned/unpruned: epochs {report['epochs_ratio']:.2f}x, trial time {report['trial_seconds_ratio']:.2f}x; "
          f"best {report['best_gap']:+.4f} (val standard error {se:.4f}); "
          f"completed trial {check_idx} re-run {'reproduced exactly' if reproduced else 'DIFFERED'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
