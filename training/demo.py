"""`cnnloop demo`: the whole product on data every machine has (scikit-learn digits).

Today: digits -> fine-tune -> report. Later stages of the loop (export, serve, drift, retrain)
join here as they land, so the README's one command always shows everything that works.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from training.config import load_train_config
from training.digits import write_digits
from training.fit import train

# 64 px keeps the demo to about a minute on two CPU cores; flips would turn digits into other glyphs.
DEMO_RECIPE = {"image_size": 64, "hflip": False, "strategy": "finetune", "epochs": 4, "lr": 3e-3, "patience": 3}


def run_demo(work_dir: Path, console: Console, show_progress: bool = True) -> dict:
    work_dir = Path(work_dir)
    data = work_dir / "digits"
    if not (data / "9").is_dir():
        counts = write_digits(data, size=32, overwrite=True)
        console.print(f"wrote {sum(counts.values())} scikit-learn digits to {data}")
    run = work_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    metrics = train(data, run, load_train_config(None, DEMO_RECIPE), console=console, show_progress=show_progress)
    return {
        "data": str(data),
        "run_dir": str(run),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "val": {k: metrics["val"][k] for k in ("n", "accuracy", "macro_f1")},
        "test": {k: metrics["test"][k] for k in ("n", "accuracy", "macro_f1")},
        "best_epoch": metrics["best_epoch"],
    }
