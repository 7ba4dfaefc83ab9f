"""The demo's loop, on data every machine has (scikit-learn's real handwritten digits).

digits -> fine-tune -> export -> serve (real `bentoml serve`) -> predictions -> a reviewer labels a
budget of them through the review queue -> shifted traffic (inverted digits), labeled the same way
-> drift report -> retrain -> promote -> the service swaps -> accuracy on the shifted traffic
recovers. 40% of the digits never reach training: they are the traffic, split into streams that
the reviewer may label and evaluation sets that never are, so "after" is measured on images no
model was trained on. The reviewer labels each stream right after it is served, before the
evaluation images are sent; evaluation images the queue offers later are skipped.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from exporters.model_store.registry import Registry
from training.config import load_train_config
from training.data.sources import discover
from training.demo.service_process import start_service
from training.demo.traffic import review_labels, send_images, split_pool, wait_for_version, wait_until_logged
from training.data.digits import write_digits
from training.run.publish import publish_run
from training.retrain.job import drift_check, report_summary, retrain_once
from training.retrain.settings import LoopSettings
from training.data.stratify import stratified_split
from training.train import train

# 64 px keeps training to about a minute on two CPU cores; flips would turn digits into other glyphs.
DEMO_RECIPE = {"image_size": 64, "hflip": False, "strategy": "finetune", "epochs": 4, "lr": 3e-3, "patience": 3}
TRAFFIC_SHARE = 0.4
# Shares of the traffic pool. Streams may be labeled (and so become training data); eval sets never are.
POOL = {"clean_stream": 0.2, "clean_eval": 0.15, "shifted_stream": 0.4, "shifted_eval": 0.25}
# Share of each stream a reviewer labels through the review queue (`cnnloop demo --label-budget`).
LABEL_BUDGET = 0.25


def prepare_digits(work_dir: Path, console: Console) -> tuple[Path, object]:
    """Write the digits once; copy 60% into a training ImageFolder and return (that folder, the traffic pool)."""
    everything = work_dir / "digits"
    if not (everything / "9").is_dir():
        counts = write_digits(everything, size=32, overwrite=True)
        console.print(f"wrote {sum(counts.values())} scikit-learn digits to {everything}")
    files = discover(everything).train
    keep, held = stratified_split(files.labels, TRAFFIC_SHARE, seed=0)
    train_dir = work_dir / "digits-train"
    if not (train_dir / "9").is_dir():
        for i in keep:
            dest = train_dir / files.classes[files.labels[i]] / files.paths[i].name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files.paths[i], dest)
    return train_dir, files.subset(held)


def run_demo(work_dir: Path, console: Console, show_progress: bool = True, label_budget: float = LABEL_BUDGET) -> dict:
    work_dir = Path(work_dir)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    train_dir, pool = prepare_digits(work_dir, console)
    session = work_dir / f"loop-{time.strftime('%Y%m%d-%H%M%S')}"
    registry_dir, data_dir = session / "registry", session / "service-data"

    console.rule("1. fine-tune on 60% of the digits")
    t = time.perf_counter()
    metrics = train(train_dir, session / "run", load_train_config(None, DEMO_RECIPE), console=console, show_progress=show_progress)
    timings["train_s"] = time.perf_counter() - t

    console.rule("2. export to ONNX and publish as production")
    t = time.perf_counter()
    registry = Registry.open(str(registry_dir))
    before, _ = publish_run(session / "run", registry, ("int8",), 1.0, None, log=lambda m: console.print(f"  {m}", highlight=False))
    registry.promote(before, "production")
    timings["export_s"] = time.perf_counter() - t

    console.rule("3. serve it (bentoml serve) and send traffic")
    t = time.perf_counter()
    # review_refill_s 0: the reviewer's first call after a stream queues it, however fast the demo moves.
    service = start_service({"registry": registry_dir.resolve(), "data_dir": data_dir.resolve(), "poll_interval_s": 2,
                             "review_refill_s": 0}, session / "service.log")
    timings["service_start_s"] = time.perf_counter() - t
    try:
        summary = _loop(session, service, registry, before, pool, metrics, timings, t_all, console, show_progress, label_budget)
    finally:
        service.stop()
    # Always on disk, so a script (or CI) can check the loop closed without asking for --json.
    (session / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def _loop(session, service, registry, before, pool, train_metrics, timings, t_all, console, show_progress, label_budget) -> dict:
    parts = split_pool(len(pool), POOL, seed=1)
    subset = {name: ([pool.paths[i] for i in idx], [pool.classes[pool.labels[i]] for i in idx]) for name, idx in parts.items()}
    truth = {f"{Path(p).stem}.png": label for paths, labels in subset.values() for p, label in zip(paths, labels)}
    reserved = {f"{Path(p).stem}.png" for name in ("clean_eval", "shifted_eval") for p in subset[name][0]}
    # A window the size of one check's traffic, so each check sees only what came since the last.
    window = len(parts["clean_stream"]) + len(parts["clean_eval"])
    settings = LoopSettings(registry=str(session / "registry"), data_dir=str(session / "service-data"),
                            work_dir=session / "retrain", window=window, min_samples=100, min_new_labels=50,
                            cooldown_s=0, permutations=300, epochs=6, variants="int8")
    labels: dict[str, dict] = {}
    with service.client() as client:

        def review(stream: str, served) -> None:
            wait_until_logged(client)  # the queue is filled from the log
            budget = max(1, round(label_budget * served.n))
            done = review_labels(client, truth, budget, reserved)
            labels[stream] = {"budget": budget, "labeled": done.labeled, "of": served.n, "skipped_eval": done.skipped,
                              "model_was_right": done.correct_before}
            console.print(f"reviewer: {done.labeled} of {served.n} {stream} images labeled through the review queue "
                          f"(the model had {done.correct_before} of them right; queue strategy "
                          f"{client.get('/review/state').json()['strategy']})", highlight=False)

        clean_stream = send_images(client, *subset["clean_stream"], invert=False, feedback=False)
        review("clean", clean_stream)
        clean_before = send_images(client, *subset["clean_eval"], invert=False, feedback=False)
        console.print(f"clean traffic: {clean_stream.n} predictions (accuracy {clean_stream.accuracy:.3f}), "
                      f"{clean_before.n} evaluation images (accuracy {clean_before.accuracy:.3f})")

        wait_until_logged(client)
        console.rule("4. retrain check on clean traffic (expect: no drift, no retrain)")
        first = retrain_once(settings, console, show_progress=show_progress)

        console.rule(f"5. the traffic shifts: inverted digits; a reviewer labels {label_budget:.0%} of it through the review queue")
        shifted_stream = send_images(client, *subset["shifted_stream"], invert=True, feedback=False)
        review("shifted", shifted_stream)
        shifted_before = send_images(client, *subset["shifted_eval"], invert=True, feedback=False)
        console.print(f"shifted traffic: {shifted_stream.n} predictions (accuracy {shifted_stream.accuracy:.3f}), "
                      f"{shifted_before.n} evaluation images (accuracy {shifted_before.accuracy:.3f})")

        wait_until_logged(client)
        console.rule("6. drift report")
        from exporters.prediction_log.sql import open_prediction_log
        from training.drift.render import plot_report, print_report

        log = open_prediction_log(settings.data_dir)
        try:
            check = drift_check(settings, registry, log)
        finally:
            log.close()
        report = check.report
        print_report(report, console)
        plot_report(report, check.reference, check.window, session / "drift.png")

        console.rule("7. retrain: warm start, early stopping, champion vs challenger")
        t = time.perf_counter()
        second = retrain_once(settings, console, show_progress=show_progress)
        timings["retrain_s"] = time.perf_counter() - t
        outcome = second["outcome"]
        after = registry.resolve("production")
        promoted = outcome["status"] == "promoted"

        console.rule("8. the service swaps to the new production model; the same evaluation traffic again")
        swap_s = wait_for_version(client, after) if promoted else 0.0
        shifted_after = send_images(client, *subset["shifted_eval"], invert=True, feedback=False)
        clean_after = send_images(client, *subset["clean_eval"], invert=False, feedback=False)

    timings["swap_s"] = swap_s
    timings["total_s"] = time.perf_counter() - t_all
    return {
        "versions": {"before": before, "after": after},
        "drift_detected": bool(report["drift_detected"]),
        "promoted": promoted,
        "shifted_accuracy": {"before": shifted_before.accuracy, "after": shifted_after.accuracy, "n": shifted_before.n},
        "clean_accuracy": {"before": clean_before.accuracy, "after": clean_after.accuracy, "n": clean_before.n},
        "served_by": {"before": shifted_before.versions, "after": shifted_after.versions},
        "drift": report_summary(report) | {"tests": {k: v["p_value"] for k, v in report.get("tests", {}).items()}},
        "labels": {"budget": label_budget, **labels},
        "checks": [{"decision": c["decision"], "outcome": c["outcome"]["status"]} for c in (first, second)],
        "retrain": {k: outcome.get(k) for k in ("status", "challenger", "evaluation", "verdict", "data", "best_epoch")},
        "train": {s: {k: train_metrics[s][k] for k in ("n", "accuracy", "macro_f1")} for s in ("val", "test")},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paths": {"session": str(session), "drift_png": str(session / "drift.png"), "service_log": str(session / "service.log"),
                  "audit_log": str(session / "service-data" / "audit"),
                  "summary": str(session / "summary.json")},
    }
