"""What a study leaves in --out: trials.json, best_config.yaml, summary.json and optuna's PNG views."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from training.config import TrainConfig, save_config

BEST_CONFIG = "best_config.yaml"
TRIALS = "trials.json"
SUMMARY = "summary.json"


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                     "epochs_trained": t.user_attrs.get("epochs_trained", 0), "duration_s": duration,
                     **{k: t.user_attrs[k] for k in ("error", "interrupted", "pruned_at", "enqueued", "worker", "fold_std")
                        if k in t.user_attrs}})
    return rows


def completed(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def state_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def write_outputs(study, out: Path, best_cfg: TrainConfig | None, summary: dict) -> list[str]:
    """Write every output; returns the PNG names written (a view optuna cannot draw yet is skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / TRIALS).write_text(json.dumps(trial_rows(study), indent=2, default=str) + "\n")
    if best_cfg is not None:
        save_config(best_cfg, out / BEST_CONFIG)
    pngs = _plots(study, out)
    (out / SUMMARY).write_text(json.dumps({**summary, "plots": pngs}, indent=2, sort_keys=True, default=str) + "\n")
    return pngs


def _plots(study, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    done = completed(study)
    wanted = [("optimization_history.png", views.plot_optimization_history, 1)]
    searched = {k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1}
    if searched:
        # Importances fit a random forest over completed trials: it needs a few, and a varied parameter.
        wanted += [("param_importances.png", views.plot_param_importances, 3),
                   ("slice.png", lambda s: views.plot_slice(s, params=sorted(searched)), 2),
                   ("parallel_coordinate.png", lambda s: views.plot_parallel_coordinate(s, params=sorted(searched)), 2)]
    written = []
    for name, draw, needs in wanted:
        if len(done) < needs:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib views experimental
            ax = draw(study)
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written
