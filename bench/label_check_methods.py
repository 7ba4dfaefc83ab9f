"""Which out-of-sample probabilities the label check should give cleanlab, measured on a real log.

Reads the labeled predictions of a service's prediction log (e.g. the demo's
runs/demo/loop-*/service-data, labeled through the review queue by a reviewer who gives the true
label), flips a share of the labels to a random wrong class, and runs cleanlab's
find_label_issues on three sources of probabilities:

- probe:  what the retrain job uses, cross-validated logistic regression on the logged embeddings
          and log-probabilities (training/retrain/label_check.py);
- logged: the serving model's own logged probabilities (out of sample too: it predicted before the
          label existed), the obvious alternative;
- both:   flag only what both flag.

Reports the flags' precision and recall against the flipped set, median over seeds, as JSON and a
Markdown table. No training: a few seconds.

    .venv/bin/python bench/label_check_methods.py runs/demo/loop-*/service-data --out bench/results/label_check_methods.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import warnings

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.prediction_log.sql import open_prediction_log  # noqa: E402
from training.retrain import label_check  # noqa: E402


def flip_labels(records, classes: list[str], share: float, rng: np.random.Generator):
    out, flipped = [], np.zeros(len(records), dtype=bool)
    for i, rec in enumerate(records):
        if rng.random() < share:
            flipped[i] = True
            rec = dataclasses.replace(rec, feedback_label=str(rng.choice([c for c in classes if c != rec.feedback_label])))
        out.append(rec)
    return out, flipped


def measure(records, classes: list[str], share: float, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    noisy, flipped = flip_labels(records, classes, share, rng)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r.feedback_label] for r in noisy])
    judged = label_check.judged_mask(labels, len(classes))  # as the job does: classes with too few labels unchecked
    noisy, labels, flipped = [r for r, j in zip(noisy, judged) if j], labels[judged], flipped[judged]
    logged = label_check.logged_probabilities(noisy, len(classes))
    probe, method = label_check._out_of_sample(noisy, labels, logged, seed)
    if probe is None:
        sys.exit(f"the probe cannot run on this log: {method}")
    flags = {"probe": label_check._find_issues(labels, probe), "logged": label_check._find_issues(labels, logged)}
    flags["both"] = flags["probe"] & flags["logged"]
    out = {}
    for name, f in flags.items():
        hits = int((f & flipped).sum())
        out[name] = {"flagged": int(f.sum()), "flipped": int(flipped.sum()),
                     "precision": hits / f.sum() if f.sum() else float("nan"),
                     "recall": hits / flipped.sum() if flipped.sum() else float("nan"),
                     "correct_labels_flagged": int((f & ~flipped).sum())}
    out["probe"]["method_used"] = method
    return out


def main() -> None:
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # nanmedian of precision when nothing is flipped
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", help="a service data dir holding the prediction log (log.db)")
    ap.add_argument("--flips", default="0,0.1,0.2", help="shares of labels flipped, comma-separated")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()
    log = open_prediction_log(args.data_dir)
    try:
        records = log.labeled_predictions()
    finally:
        log.close()
    if len(records) < 20:
        sys.exit(f"{args.data_dir}: {len(records)} labeled predictions; label some first (cnnloop demo does)")
    width = max(len(r.probabilities) for r in records)
    classes = sorted({r.label for r in records} | {r.feedback_label for r in records})
    if len(classes) != width:  # the log keeps labels, not the class list: digits' 0-9 when all appear
        classes = [str(i) for i in range(width)]
    results = {}
    for share in (float(x) for x in args.flips.split(",")):
        runs = [measure(records, classes, share, seed) for seed in range(args.seeds)]
        results[f"{share:.2f}"] = {name: {k: float(np.nanmedian([r[name][k] for r in runs]))
                                          for k in ("flagged", "flipped", "precision", "recall", "correct_labels_flagged")}
                                   for name in runs[0]}
    doc = {"data_dir": args.data_dir, "labels": len(records), "seeds": args.seeds, "results": results}
    print(f"{len(records)} labeled predictions in {args.data_dir}; median over {args.seeds} seeds\n")
    print("| flipped | probabilities | flagged | precision | recall | correct labels flagged |")
    print("|---|---|---|---|---|---|")
    for share, by in results.items():
        for name, m in by.items():
            print(f"| {float(share):.0%} | {name} | {m['flagged']:.0f} | {m['precision']:.2f} | {m['recall']:.2f} | "
                  f"{m['correct_labels_flagged']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
