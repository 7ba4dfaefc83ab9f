"""`cnnloop tune`: an Optuna study over the training recipe, scored on validation data only.

Read top to bottom: check everything (space, backbones, storage, test dir) before any trial; open or
resume the study; claim trials within the shared budget, train each with the pruner watching its
epochs; wait for other workers' running trials; then the best config, the linear-probe floor beside
it, and the test dir scored once with the best config, after the search.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from training.model.backbones import get_backbone_spec
from training.config import TrainConfig
from training.data.sources import discover
from training.loop.steps import resolve_device
from training.errors import TrainingError
from training.progress import make_progress
from training.tune import report, study as studies
from training.tune.objective import METRICS, Objective, TrialPrunedSignal
from training.tune.space import SearchSpace, check_backbones, load_space

PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuneOptions:
    trials: int
    folds: int | None = None
    storage: str | None = None
    study: str = "cnnloop"
    space_file: Path | None = None
    pruner: str = "median"
    metric: str = "accuracy"
    timeout_s: float | None = None
    worker: int = 0
    stale_after_s: float = 3600.0
    test_dir: Path | None = None


def _check(opts: TuneOptions, data: Path) -> None:
    if opts.trials < 1:
        raise TrainingError(f"--trials must be at least 1, got {opts.trials}")
    if opts.folds is not None and opts.folds < 2:
        raise TrainingError(f"--folds must be at least 2, got {opts.folds} (leave it out to tune on the val split)")
    if opts.pruner not in PRUNERS:
        raise TrainingError(f"--pruner must be one of {', '.join(PRUNERS)}, got {opts.pruner!r}")
    if opts.metric not in METRICS:
        raise TrainingError(f"--metric must be one of {', '.join(METRICS)}, got {opts.metric!r}")
    if opts.timeout_s is not None and opts.timeout_s <= 0:
        raise TrainingError(f"--timeout must be positive, got {opts.timeout_s}")
    if opts.test_dir is not None:
        discover(data, opts.test_dir)  # its classes must be the training classes; it is not decoded here


def _pruner(opts: TuneOptions, base: TrainConfig):
    import optuna

    if opts.pruner == "none":
        return optuna.pruners.NopPruner()
    if opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=base.epochs * (opts.folds or 1), reduction_factor=3)
    return optuna.pruners.MedianPruner(**median_pruner_settings(opts.trials, base.epochs))


def median_pruner_settings(trials: int, epochs: int) -> dict:
    """A trial is compared with the median of earlier trials at the same fold and epoch.

    Measured on hymenoptera (BENCHMARKS.md): against one startup trial and from epoch 1 on, the median
    pruner cut a trial that tied the best when trained to the end; val accuracy on a few dozen photos
    moves in 2-3 point steps in the first epochs. So at least two finished trials set the median, and
    the first third of the epochs (of the first fold; later folds are compared from their first epoch)
    are never judged.
    """
    return {"n_startup_trials": min(5, max(2, trials // 5)), "n_warmup_steps": max(1, epochs // 3)}


def _base_params(space: SearchSpace, base: TrainConfig) -> dict:
    """The base recipe's value of each searched key, where the space holds it: trial 0 runs the default."""
    values = base.model_dump()
    if values.get("image_size") is None:
        values["image_size"] = get_backbone_spec(values["backbone"]).default_crop
    return {k: values[k] for k, p in space.params.items() if p.contains(values[k])}


def tune(data: Path, out: Path, base: TrainConfig, opts: TuneOptions, fixed_by_user: set[str] = frozenset(),
         console: Console | None = None, show_progress: bool = True, pruner=None) -> dict:
    import optuna

    console = console or Console(stderr=True)
    out = Path(out)
    _check(opts, data)
    space = load_space(opts.space_file, base, fixed_by_user)
    check_backbones(space, base)
    url = studies.storage_url(opts.storage, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = studies.open_study(url, opts.study, None, pruner or _pruner(opts, base))
    # Each worker and each resumption draws its own random start; TPE then learns from every finished trial.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + 7919 * opts.worker + len(study.trials),
                                               n_startup_trials=min(10, max(2, opts.trials // 4)), multivariate=True,
                                               constant_liar=True)
    device = resolve_device(base.device)
    if base.num_threads:
        import torch

        torch.set_num_threads(base.num_threads)
    started, stopped_by = time.time(), "budget"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with make_progress(console, show_progress) as progress:
            objective = Objective(data, base, space, opts.folds, opts.metric, device, progress, console)
            bar = progress.add_task("trials", total=opts.trials, info=f"study {opts.study}")
            first = _base_params(space, base)
            while True:
                counted = sum(studies.counts_against_budget(t) for t in study.get_trials(deepcopy=False))
                progress.update(bar, completed=min(counted, opts.trials))
                if opts.timeout_s is not None and time.time() - started > opts.timeout_s:
                    stopped_by = "timeout"
                    break
                trial = studies.claim_trial(study, url, opts.trials, opts.stale_after_s, first)
                if trial is None:
                    break
                if _run_trial(study, trial, objective, space, opts, progress) == "interrupted":
                    stopped_by = "interrupt"
                    break
                for task in list(progress.task_ids):
                    if task != bar:
                        progress.remove_task(task)
            if stopped_by == "budget":
                _wait_for_other_workers(study, opts, progress, bar)
            progress.update(bar, completed=min(opts.trials, sum(studies.counts_against_budget(t) for t in study.get_trials(deepcopy=False))))
            summary = _summarise(study, objective, opts, base, space, url, stopped_by, time.time() - started)
    finally:
        signal.signal(signal.SIGTERM, previous)
    best_cfg = objective.config_for(study.best_trial.params) if summary["best"] else None
    if best_cfg is not None and opts.test_dir is not None and stopped_by != "interrupt":
        summary["test"] = _score_test_once(data, out, best_cfg, opts.test_dir, console, show_progress)
    summary["plots"] = report.write_outputs(study, out, best_cfg, summary)
    return summary


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a pod being stopped) ends the trial as Ctrl-C does: resumable


def _run_trial(study, trial, objective: Objective, space: SearchSpace, opts: TuneOptions, progress) -> str:
    from optuna.trial import TrialState

    trial.set_user_attr("worker", opts.worker)
    params = space.sample(trial)
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    try:
        value, details = objective.evaluate(objective.config_for(params), trial)
    except TrialPrunedSignal as e:
        trial.set_user_attr("pruned_at", str(e))
        study.tell(trial, state=TrialState.PRUNED)
        progress.console.print(f"trial {trial.number:>3} [yellow]PRUNED[/]   {e}   {shown}", highlight=False)
        return "pruned"
    except KeyboardInterrupt:
        trial.set_user_attr(studies.INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
        progress.console.print(f"trial {trial.number:>3} interrupted; run the same command again to resume the study",
                               highlight=False)
        return "interrupted"
    except (TrainingError, ValidationError, RuntimeError, ValueError) as e:
        # One recipe that cannot train (a bad combination, out of memory) costs its trial, not the study.
        trial.set_user_attr(studies.ERROR, str(e).splitlines()[0][:500])
        study.tell(trial, state=TrialState.FAIL)
        progress.console.print(f"trial {trial.number:>3} [red]FAILED[/]   {str(e).splitlines()[0][:200]}", highlight=False)
        return "failed"
    if "fold_std" in details:
        trial.set_user_attr("fold_std", details["fold_std"])
    study.tell(trial, value)
    best = study.best_trial.number == trial.number
    progress.console.print(f"trial {trial.number:>3} [green]COMPLETE[/] {opts.metric} {value:.4f}"
                           f"{' (best so far)' if best else ''}   epochs {details['epochs_trained']}   {shown}", highlight=False)
    return "complete"


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _wait_for_other_workers(study, opts: TuneOptions, progress, bar) -> None:
    """Every worker reports the same best: the last trials of the budget may still run elsewhere."""
    from optuna.trial import TrialState

    while True:
        studies.fail_stale(study, opts.stale_after_s)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        progress.update(bar, info=f"waiting for {len(running)} trial(s) of other workers")
        time.sleep(2.0)


def _summarise(study, objective: Objective, opts: TuneOptions, base: TrainConfig, space: SearchSpace, url: str,
               stopped_by: str, wall_s: float) -> dict:
    rows = report.trial_rows(study)
    summary = {
        "study": opts.study, "storage": studies.redact(url), "budget": opts.trials, "metric": opts.metric,
        "objective": f"mean held-out-fold {opts.metric} over {opts.folds} folds" if opts.folds else f"val split {opts.metric}",
        "folds": opts.folds, "stopped_by": stopped_by, "wall_s": wall_s, "states": report.state_counts(rows),
        "counted_trials": sum(studies.counts_against_budget(t) for t in study.get_trials(deepcopy=False)),
        "epochs_trained": sum(r["epochs_trained"] for r in rows),
        "space": {k: p.describe() for k, p in space.params.items()}, "fixed": space.fixed,
        "best": None, "base_recipe": None, "linear_probe": None, "test": None,
    }
    base_trials = [r for r in rows if r.get("enqueued") and r["state"] == "COMPLETE"]
    if base_trials:
        summary["base_recipe"] = {"number": base_trials[0]["number"], "value": base_trials[0]["value"],
                                  "fold_std": base_trials[0].get("fold_std")}
    if not report.completed(study):
        return summary
    best = study.best_trial
    summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                       "fold_std": best.user_attrs.get("fold_std")}
    if stopped_by == "interrupt":
        return summary  # Ctrl-C means now: the floor is scored when the study ends
    best_cfg = objective.config_for(best.params)
    floor = objective.probe_floor(best_cfg)
    summary["linear_probe"] = {**floor, "what": f"frozen {best_cfg.backbone} features at the best config's resolution, "
                               "logistic regression (C by inner CV), same folds/split"}
    summary["beats_linear_probe"] = best.value > floor["value"]
    return summary


def _score_test_once(data: Path, out: Path, cfg: TrainConfig, test_dir: Path, console: Console, show_progress: bool) -> dict:
    """Train the best config as `cnnloop train` would and score --test-dir, once, after the search."""
    from training.train import train

    metrics = train(data, out / "best_run", cfg, test_dir=test_dir, overwrite=True, console=console,
                    show_progress=show_progress)
    return {"run_dir": str(out / "best_run"), **{k: metrics["test"][k] for k in ("n", "accuracy", "macro_f1")}}
