"""How a drift report is shown: a rich table for people, a PNG where a picture beats numbers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from training.drift.report import INSUFFICIENT, LiveWindow, ReferenceSet


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if 0 < abs(x) < 10 ** -digits else f"{x:.{digits}f}"
    return str(x)


def print_report(report: dict, console: Console) -> None:
    w = report["window"]
    console.print(f"[bold]drift report[/] model {report['model_version']}: {w['n']} prediction(s) in the window "
                  f"vs {report['reference']['n']} reference outputs", highlight=False)
    if report["status"] == INSUFFICIENT:
        console.print(f"[yellow]insufficient data:[/] {report['reason']}", highlight=False)
    else:
        table = Table("test", "statistic", "p-value", "alpha", "drift?", "in verdict", title="shift tests")
        for name, t in report["tests"].items():
            table.add_row(name, _fmt(t["statistic"]), _fmt(t["p_value"]), _fmt(report["alpha"], 2),
                          "[red]yes[/]" if t["detected"] else "no", "yes" if name in report["verdict_tests"] else "-")
        console.print(table)
        est = report["estimated_accuracy"]
        console.print(f"accuracy estimated without labels: ATC {_fmt(est['atc'])}, average calibrated confidence "
                      f"{_fmt(est['average_confidence'])} (validation {_fmt(report['reference']['val_accuracy'])})", highlight=False)
        verdict = "[bold red]DRIFT[/]" if report["drift_detected"] else "[bold green]no drift[/]"
        console.print(f"verdict: {verdict} (combined p {_fmt(report['combined_p_value'])}, Bonferroni over "
                      f"{', '.join(report['verdict_tests'])}; severity {report['severity']:.1f})", highlight=False)
    fb = report["feedback"]
    if fb["n"]:
        lo, hi = fb["ci95"]
        flag = " [red]below validation[/]" if fb["below_validation"] else ""
        console.print(f"feedback accuracy {_fmt(fb['accuracy'])} on {fb['n']} label(s), 95% CI [{_fmt(lo)}, {_fmt(hi)}] "
                      f"vs validation {_fmt(fb['validation_accuracy'])}{flag}"
                      + ("" if fb["enough"] else " (too few labels for a verdict)"), highlight=False)
    else:
        console.print("feedback accuracy: no labeled predictions in the window")
    if fb.get("without_image"):
        console.print(f"[yellow]{fb['without_image']} feedback label(s) are on predictions whose image was not stored "
                      "(store_sample_rate < 1): they count above but no retrain can learn from them[/]", highlight=False)
    changes = report["label_changes"]
    if changes is not None:
        console.print(f"label changes: {changes['count']} feedback event(s), "
                      f"{changes['relabelled_predictions']} prediction(s) relabelled", highlight=False)


def plot_report(report: dict, reference: ReferenceSet, window: LiveWindow, path: Path) -> Path:
    """Four panels: predicted classes, top-1 confidence, the first two embedding PCs, and the test p-values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    k = len(reference.labels)
    x = np.arange(k)
    ref_c = np.bincount(reference.probs.argmax(1), minlength=k) / max(1, len(reference.probs))
    live_c = np.bincount(window.probs.argmax(1), minlength=k) / max(1, len(window.probs)) if len(window.probs) else np.zeros(k)
    ax[0, 0].bar(x - 0.2, ref_c, 0.4, label="reference")
    ax[0, 0].bar(x + 0.2, live_c, 0.4, label="live")
    ax[0, 0].set_xticks(x, reference.labels, rotation=45 if k > 6 else 0)
    ax[0, 0].set_title("predicted class share")
    ax[0, 0].legend()
    bins = np.linspace(0, 1, 21)
    ax[0, 1].hist(reference.probs.max(1), bins, alpha=0.6, density=True, label="reference")
    if len(window.probs):
        ax[0, 1].hist(window.probs.max(1), bins, alpha=0.6, density=True, label="live")
    ax[0, 1].set_title("top-1 confidence")
    ax[0, 1].legend()
    ax[1, 0].scatter(reference.embeddings[:, 0], reference.embeddings[:, min(1, reference.embeddings.shape[1] - 1)], s=8,
                     alpha=0.5, label="reference")
    if window.embeddings is not None:
        ax[1, 0].scatter(window.embeddings[:, 0], window.embeddings[:, min(1, window.embeddings.shape[1] - 1)], s=8, alpha=0.5,
                         label="live")
    ax[1, 0].set_title("embeddings, first two principal components")
    ax[1, 0].legend()
    tests = report.get("tests") or {}
    if tests:
        names = list(tests)
        p = [max(tests[n]["p_value"], 1e-16) for n in names]
        ax[1, 1].barh(names, [-np.log10(v) for v in p], color=["tab:red" if tests[n]["detected"] else "tab:gray" for n in names])
        ax[1, 1].axvline(-np.log10(report["alpha"]), color="k", ls="--", label=f"alpha {report['alpha']}")
        ax[1, 1].set_xlabel("-log10 p (red: shift detected)")
        ax[1, 1].legend()
    else:
        ax[1, 1].text(0.5, 0.5, report.get("reason", "no tests"), ha="center", va="center", wrap=True)
        ax[1, 1].axis("off")
    ax[1, 1].set_title("tests")
    status = {"drift": "DRIFT", "no_drift": "no drift"}.get(report["status"], "insufficient data")
    fig.suptitle(f"model {report['model_version']}: {report['window']['n']} predictions - {status}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
