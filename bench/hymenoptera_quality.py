"""Quality, measured honestly: train on hymenoptera/train (validation carved from it for early
stopping), score on the hymenoptera val/ folder used as the held-out TEST split, over several seeds.

The test folder never influences training, early stopping or the recipe: the recipe was chosen by
5-fold cross-validation on hymenoptera/train (`cnnloop cv`), see BENCHMARKS.md.

    python bench/hymenoptera_quality.py [--seeds 0 1 2] [extra cnnloop train flags...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYM = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=HYM)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hymenoptera_quality.json")
    args, extra = ap.parse_known_args()
    cnnloop = Path(sys.executable).parent / "cnnloop"
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([str(cnnloop), "train", str(args.data / "train"), "--test-dir", str(args.data / "val"),
                            "--out", f"{tmp}/run", "--seed", str(seed), "--quiet", "--json", f"{tmp}/m.json", *extra], check=True)
            m = json.loads(Path(f"{tmp}/m.json").read_text())
            rows.append({"seed": seed, "test_accuracy": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"],
                         "val_accuracy": m["val"]["accuracy"], "best_epoch": m["best_epoch"], "epochs_run": len(m["history"]),
                         "seconds": time.perf_counter() - t0, "test_n": m["test"]["n"]})
            print(f"seed {seed}: test accuracy {rows[-1]['test_accuracy']:.4f}", file=sys.stderr)
    acc = [r["test_accuracy"] for r in rows]
    summary = {"mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "min": min(acc), "max": max(acc)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"extra_flags": extra, "rows": rows, "test_accuracy": summary}, indent=2))
    print("| seed | test accuracy | test macro-F1 | carved-val accuracy | best epoch | epochs run | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | {r['val_accuracy']:.4f} | {r['best_epoch']} | {r['epochs_run']} | {r['seconds']:.0f} |")
    print(f"| mean ± std | {summary['mean']:.4f} ± {summary['std']:.4f} | | | | | |")


if __name__ == "__main__":
    main()
