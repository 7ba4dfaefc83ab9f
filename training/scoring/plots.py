"""PNG pictures of a run: learning curves and confusion matrices (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    cm = np.asarray(matrix)
    n = len(classes)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"{title} (accuracy {acc:.1%}, n={cm.sum()})")
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > thresh else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_find(result: dict, path: Path) -> None:
    """Loss vs head lr of `cnnloop lr-find` (training.lr_find), each suggestion a vertical line."""
    lrs = [p["lr_head"] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(lrs, [p["loss"] for p in result["points"]], color="C0", alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, [p["smoothed_loss"] for p in result["points"]], color="C0", lw=2, label="smoothed loss")
    for i, (name, s) in enumerate(result["suggestions"].items(), 1):
        star = " (recommended)" if name == result["recommended"] else ""
        ax.axvline(s["head_lr"], color=f"C{i}", ls="--", lw=1, label=f"{name} {s['head_lr']:.2e}{star}")
    ax.set_xscale("log")
    # The blow-up that ends a sweep is 10-100x the start: it would flatten the part worth reading.
    losses = [p[k] for p in result["points"] for k in ("loss", "smoothed_loss")]
    ax.set_ylim(min(losses) * 0.95, min(max(losses), 1.5 * result["points"][0]["smoothed_loss"]) * 1.05)
    ax.set_xlabel(f"head learning rate (open backbone stages: {result.get('open_stages', '?')})")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test" + (" (stopped: diverged)" if result["diverged"] else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(before: list[dict], after: list[dict], path: Path, title: str) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, before and after
    calibration (exporters.calibration.reliability_bins); on the diagonal is calibrated."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    for bins, name, color in ((before, "before", "C3"), (after, "after temperature scaling", "C0")):
        if bins:
            sizes = np.array([b["count"] for b in bins], dtype=float)
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=color, label=name)
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=20 + 200 * sizes / sizes.max(),
                       color=color, alpha=0.3)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin (marker area: images)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_risk_coverage(curve: dict, at_coverage: dict, path: Path, title: str) -> None:
    """Accuracy of the answered images against the share answered (the most confident first)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    ax.plot(curve["coverage"], curve["accuracy"], color="C0", lw=2)
    for key, point in at_coverage.items():
        ax.plot(float(key), point["accuracy"], "o", color="C1")
        ax.annotate(f"{float(key):.0%}: {point['accuracy']:.1%} (conf >= {point['threshold']:.2f})",
                    (float(key), point["accuracy"]), textcoords="offset points", xytext=(-175, 6), fontsize=8)
    ax.set_xlabel("coverage (share of images answered, most confident first)")
    ax.set_ylabel("accuracy of the answered images")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
