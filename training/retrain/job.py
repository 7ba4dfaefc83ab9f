"""`cnnloop retrain`: one guarded pass of check -> decide -> (retrain -> export -> judge -> promote).

Order matters for safety: the production alias is moved last, by one conditional write, after the
challenger is published, fetched back with verified checksums and judged. A crash anywhere before
leaves production untouched (and the lock expires if the process died without releasing it).
Every pass, whatever its outcome, appends one record to the audit log.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from rich.console import Console

from exporters.model_store.bundle import read_bundle
from exporters.errors import AliasMoved
from exporters.prediction_log.records import PredictionLog
from exporters.prediction_log.review_queue import ReviewQueue
from exporters.prediction_log.sql import open_prediction_log
from exporters.model_store.registry import Registry
from exporters.storage import Store, open_store
from exporters.export.variants import parse_variants
from training.devices import resolve_device
from training.drift.report import LiveWindow, ReferenceSet, build_report, load_reference_set, window_from_records
from training.errors import TrainingError
from training.retrain import audit
from training.retrain.challenger import train_challenger, warm_start_config
from training.retrain.dataset import FeedbackShares, build_retrain_data, latest_labels, read_original_splits
from training.retrain.label_check import LabelCheck, check_labels
from training.retrain.gate import holdout_from, promotion_verdict, score_bundle
from training.retrain.lock import StoreLock
from training.retrain.policy import PolicyThresholds, decide, state_from_history
from training.retrain.settings import LoopSettings
from training.run.publish import publish_run


def open_log(settings: LoopSettings) -> PredictionLog:
    """The service's prediction log; a local data dir that does not exist is a mistake, not an empty log."""
    if not settings.data_is_s3 and not Path(settings.data_dir).is_dir():
        raise TrainingError(f"data dir {settings.data_dir} does not exist; point --data-dir (CNNLOOP_DATA_DIR) at the "
                            "service's data dir, where it logs predictions and feedback")
    return open_prediction_log(settings.data_dir, settings.s3_endpoint_url, settings.log_url)


@dataclass(frozen=True)
class DriftCheck:
    """One look at the production model's newest predictions: the report and what it compared."""

    report: dict
    reference: ReferenceSet  # from the production bundle; its version is the champion's
    window: LiveWindow
    champion_dir: Path  # the production bundle, fetched


@dataclass(frozen=True)
class RetrainPass:
    """What every step of one pass works with: opened once, under the lock, by `retrain_once`."""

    settings: LoopSettings
    store: Store  # the data dir: the lock and the audit log
    registry: Registry
    log: PredictionLog
    console: Console
    show_progress: bool
    started: float  # time.perf_counter() at the start: the audit record's "seconds"


def drift_check(settings: LoopSettings, registry: Registry, log: PredictionLog, since: float | None = None,
                last: int | None = None) -> DriftCheck:
    """The drift report on the production model's newest predictions."""
    champion = registry.resolve("production")
    if champion is None:
        raise TrainingError(f"the registry {registry.describe()} has no production version; "
                            "publish one with `cnnloop export RUN --promote production`")
    bundle_dir = registry.fetch(champion, Path(settings.work_dir) / "bundles")
    reference = load_reference_set(bundle_dir)
    records = log.predictions(since=since, last=last or (None if since else settings.window), model_version=champion)
    window = window_from_records(records, reference, log.label_changes(r.prediction_id for r in records))
    report = build_report(reference, window, alpha=settings.alpha, min_samples=settings.min_samples,
                          min_feedback=settings.min_feedback, accuracy_margin=settings.accuracy_margin,
                          permutations=settings.permutations)
    return DriftCheck(report, reference, window, bundle_dir)


def report_summary(report: dict) -> dict:
    keep = ("status", "drift_detected", "combined_p_value", "severity", "model_version")
    out = {k: report.get(k) for k in keep}
    out["n"] = report["window"]["n"]
    out["feedback"] = {k: report["feedback"][k] for k in ("n", "accuracy", "below_validation")}
    return out


def retrain_once(settings: LoopSettings, console: Console, force: bool = False, show_progress: bool = True) -> dict:
    """One pass under the lock; returns the record it appended to the audit log."""
    started = time.perf_counter()
    resolve_device(settings.device)  # a device this machine lacks fails now, not after the drift check and data
    store = open_store(settings.data_dir, endpoint_url=settings.s3_endpoint_url)
    registry = Registry.open(settings.registry, endpoint_url=settings.s3_endpoint_url)
    with StoreLock(store, settings.lock_ttl_s):
        log = open_log(settings)
        try:
            return _pass(RetrainPass(settings, store, registry, log, console, show_progress, started), force)
        finally:
            log.close()


def _pass(run: RetrainPass, force: bool) -> dict:
    settings, console = run.settings, run.console
    check = drift_check(settings, run.registry, run.log)
    report, champion = check.report, check.reference.version
    history = audit.read_decisions(run.store)
    state = state_from_history(history, champion)
    labels = latest_labels(run.log, check.reference.labels)
    new_labels = sum(1 for at, _ in labels.values() if state.last_retrain_at is None or at > state.last_retrain_at)
    thresholds = PolicyThresholds(settings.min_new_labels, settings.cooldown_s, settings.severity_increase)
    decision = decide(report, state, new_labels, time.time(), thresholds, force)
    record = {"model_version": champion, "severity": report["severity"],
              "report": report_summary(report), "new_labels": new_labels, "decision": decision.to_json()}
    for reason in decision.reasons:
        console.print(f"  - {reason}", highlight=False, soft_wrap=True)
    if not decision.retrain:
        record["outcome"] = {"status": "skipped", "production": champion}
        return _finish(run, record)
    try:
        record["outcome"] = _retrain(run, check)
    except BaseException as e:
        record["outcome"] = {"status": "failed", "production": run.registry.resolve("production"), "error": f"{type(e).__name__}: {e}"}
        _finish(run, record)
        raise
    return _finish(run, record)


def _check_labels(run: RetrainPass, classes: list[str]) -> LabelCheck:
    """Confident learning on the labeled predictions; flagged ones go back to the review queue whatever the policy."""
    queue = ReviewQueue(run.log)
    result = check_labels(run.log.labeled_predictions(), classes, run.settings.label_check, trusted=queue.second_looks())
    queue.send_back(result.flagged_ids)
    run.console.print(f"  {result.summary()}", highlight=False, soft_wrap=True)
    for f in result.to_json()["examples"][:5]:
        run.console.print(f"    {f['prediction_id']}: labeled {f['label']!r}, looks like {f['suggested']!r} "
                          f"(p(label) {f['label_probability']:.2f})", highlight=False)
    return result


def _finish(run: RetrainPass, record: dict) -> dict:
    record["seconds"] = round(time.perf_counter() - run.started, 1)
    return audit.append_decision(run.store, record)


def _retrain(run: RetrainPass, check: DriftCheck) -> dict:
    settings, console, registry = run.settings, run.console, run.registry
    champion, champion_dir = check.reference.version, check.champion_dir
    bundle = read_bundle(champion_dir)
    work = Path(settings.work_dir)
    original = read_original_splits(bundle.retrain.original_splits, check.reference.labels, settings.original_data)
    cfg = warm_start_config(bundle, settings.epochs, settings.lr_scale, settings.patience, settings.device)
    console.print(f"retraining {champion}: original data + labeled feedback, warm start, at most {cfg.epochs} epochs")
    labels_checked = _check_labels(run, check.reference.labels)
    shares = FeedbackShares(settings.feedback_holdout, settings.feedback_val, settings.feedback_weight)
    data = build_retrain_data(original, run.log, check.reference.labels, bundle.policy.resize_size, work / "feedback-images", shares,
                              suspect=labels_checked.flagged_images, suspect_policy=settings.label_check)
    console.print(f"  data: {data.counts}", highlight=False)
    run_dir = work / "runs" / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}-{champion}"
    metrics = train_challenger(bundle, data, cfg, run_dir, console, run.show_progress)
    challenger, _ = publish_run(run_dir, registry, parse_variants(settings.variants), 1.0, champion,
                                original_splits=bundle.retrain.original_splits,
                                log=lambda m: console.print(f"  {m}", highlight=False, soft_wrap=True))
    registry.promote(challenger, "candidate")
    challenger_dir = registry.fetch(challenger, work / "bundles")
    # The challenger keeps the champion's preprocessing (warm start), so the holdout is decoded once for both.
    holdout = holdout_from(data.splits.test, data.holdout_feedback, bundle.policy)
    scores = {"champion": score_bundle(champion_dir, holdout), "challenger": score_bundle(challenger_dir, holdout)}
    promote, reasons = promotion_verdict(scores["champion"], scores["challenger"], settings.promote_margin, settings.test_tolerance)
    for reason in reasons:
        console.print(f"  - {reason}", highlight=False)
    outcome = {"challenger": challenger, "run_dir": str(run_dir), "data": data.counts, "evaluation": scores,
               "verdict": reasons, "best_epoch": metrics["best_epoch"], "label_check": labels_checked.to_json()}
    if not promote:
        console.print(f"[yellow]kept champion {champion}[/]: the challenger {challenger} is not better enough")
        return {**outcome, "status": "kept_champion", "production": champion}
    try:
        registry.promote(challenger, "production", only_if=champion)
    except AliasMoved as e:
        # Someone moved production while we trained: their choice stands; ours was judged against another model.
        console.print(f"[yellow]{e}; {challenger} stays candidate[/]", highlight=False)
        return {**outcome, "status": "kept_champion", "production": registry.resolve("production"),
                "verdict": reasons + ["production moved during the retrain"]}
    console.print(f"[green]promoted {challenger}[/] to production (was {champion})")
    return {**outcome, "status": "promoted", "production": challenger, "previous_production": champion}
