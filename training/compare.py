"""`cnnloop compare`: one recipe, the same folds, several backbones -> accuracy vs serving speed.

For each backbone (the base config with only `backbone` and its weights changed; `image_size` the
backbone's default unless the user fixed it): k-fold CV with its linear-probe floor
(`training.cv.cross_validate`), the wall time of the fits, the last fold's fitted model exported
to one ONNX file (`exporters.export.onnx_graph`, parity-checked on that fold's held-out images), and
ONNX Runtime CPU images/s and latency of every graph timed in the same process, round-robin
(`exporters.export.ort_timing`). The folds come from `stratified_kfold(labels, K, seed)`, so they are the
same for every backbone as long as the same files decode; this is checked, not assumed.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from exporters.preprocess import ResizePolicy
from training.model.backbones import BackboneSpec, check_weights_at_hand, get_backbone_spec
from training.config import TrainConfig
from training.errors import TrainingError

BATCH_SIZES = (1, 32)
PARITY_IMAGES = 16  # held-out images the exported graph must agree with torch on
EXPORTED_MODEL = "the last fold's fitted model (trained on the other K-1 folds)"


@dataclass(frozen=True)
class Contender:
    """One backbone to compare, resolved and checked before any training starts."""

    spec: BackboneSpec
    cfg: TrainConfig  # the base recipe with this backbone and its weights

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def policy(self) -> ResizePolicy:
        return self.spec.resize_policy(self.cfg.image_size)


def resolve_contenders(names: list[str], cfg: TrainConfig, weights_for: dict[str, str] | None = None) -> list[Contender]:
    """Check every name and its weights up front: a typo in the third name must not cost two trainings.
    `weights_for` maps a backbone to its --weights value; the others take `cfg.weights`."""
    weights_for = dict(weights_for or {})
    if len(names) < 2:
        raise TrainingError(f"compare needs at least 2 backbones, got {len(names)}: pass --backbones a,b[,c...]")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TrainingError(f"backbone(s) named more than once in --backbones: {', '.join(repeated)}")
    stray = sorted(set(weights_for) - set(names))
    if stray:
        raise TrainingError(f"--backbone-weights names {', '.join(stray)}, which --backbones does not list")
    specs = [get_backbone_spec(n) for n in names]  # unknown names fail here, with close matches
    contenders = []
    for spec in specs:
        weights = weights_for.get(spec.name, cfg.weights)
        check_weights_at_hand(spec, weights, f"pass --backbone-weights {spec.name}=PATH (a .pth/.pt/.safetensors "
                              f"state_dict or s3:// URI), or --backbone-weights {spec.name}=none for a random init")
        contenders.append(Contender(spec, TrainConfig.model_validate({**cfg.model_dump(), "backbone": spec.name, "weights": weights})))
    return contenders


def held_out_fingerprint(paths) -> str:
    """sha256 of a fold's sorted held-out file paths: equal fingerprints, equal folds."""
    digest = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        digest.update(p.encode() + b"\n")
    return digest.hexdigest()


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, images/s) points: True where no other point is at least as good on both and
    better on one (higher is better on both axes)."""
    return [not any(a >= pa and s >= ps and (a > pa or s > ps) for j, (a, s) in enumerate(points) if j != i)
            for i, (pa, ps) in enumerate(points)]


def _cross_validate_one(data: Path, c: Contender, folds: int, console: Console, show_progress: bool) -> tuple[dict, list[str], object]:
    """(cv result, held-out fingerprint per fold, last fold's (model, held-out paths))."""
    from training.cv import cross_validate

    fingerprints: list[str] = []
    last: dict = {}

    def on_fold(k: int, fit, splits) -> None:
        fingerprints.append(held_out_fingerprint(splits.test.paths))
        if k == folds - 1:
            last["model"], last["paths"] = fit.model.eval().cpu(), list(splits.test.paths)

    started = time.perf_counter()
    result = cross_validate(data, c.cfg, folds, console=console, show_progress=show_progress, on_fold=on_fold)
    result["wall_seconds"] = time.perf_counter() - started
    return result, fingerprints, (last["model"], last["paths"])


def _export(c: Contender, model, held_out: list, out_dir: Path) -> dict:
    """The model to one self-contained ONNX file, refused if ORT disagrees with torch on held-out images."""
    from exporters.export.onnx_graph import check_parity, export_onnx, torch_predict
    from exporters.onnx_runtime import OnnxClassifier
    from exporters.preprocess import load_model_input

    started = time.perf_counter()
    path = out_dir / "onnx" / f"{c.name}.onnx"
    graph = export_onnx(model, c.policy.crop_size, path)
    images = np.stack([load_model_input(p, c.policy) for p in held_out[:PARITY_IMAGES]])
    onnx_probs, _ = OnnxClassifier(path, prefer_gpu=False).predict(images)
    parity = check_parity(torch_predict(model, images)[0], onnx_probs)
    return {"model": EXPORTED_MODEL, "path": str(path), "onnx_fp32_bytes": path.stat().st_size,
            "exporter": graph.exporter, "opset": graph.opset, "image_size": c.policy.crop_size,
            "parity_vs_torch": parity, "export_seconds": time.perf_counter() - started}


def _summary_row(c: Contender, cv: dict, fingerprints: list[str], export: dict) -> dict:
    fit_seconds = [f["fit_seconds"] for f in cv["folds"]]
    floor = cv["linear_probe"]["summary"]
    return {
        "backbone": c.name, "weights": c.cfg.weights, "image_size": c.policy.crop_size,
        "accuracy": cv["summary"]["accuracy"], "macro_f1": cv["summary"]["macro_f1"],
        "linear_probe": {"accuracy": floor["accuracy"], "macro_f1": floor["macro_f1"], "what": cv["linear_probe"]["what"]},
        "beats_linear_probe": cv["beats_linear_probe"],
        "train_seconds": {"folds_total": float(sum(fit_seconds)), "per_fold_mean": float(np.mean(fit_seconds)),
                          "cv_wall": cv["wall_seconds"], "what": "fit_model wall time per fold (cv_wall adds decoding, "
                                                                  "scoring and the linear probe)"},
        "folds": cv["folds"], "linear_probe_folds": cv["linear_probe"]["folds"],
        "held_out_sha256": fingerprints, "skipped_images": len(cv["skipped_images"]),
        "export": export,
    }


def compare_backbones(data: Path, contenders: list[Contender], folds: int, out_dir: Path, bench_seconds: float = 2.0,
                      rounds: int = 4, console: Console | None = None, show_progress: bool = True) -> dict:
    """Cross-validate, export and time every contender; write nothing but the ONNX files (the caller
    writes compare.json and compare.png). Raises TrainingError if two backbones saw different folds."""
    from exporters.cpus import available_cpus
    from exporters.onnx_runtime import OnnxClassifier
    from exporters.export.ort_timing import time_round_robin
    from training.progress import make_progress

    if folds < 2:
        raise TrainingError(f"--folds must be at least 2, got {folds}")
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    rows = []
    for i, c in enumerate(contenders):
        console.print(f"[bold]{c.name}[/] ({i + 1}/{len(contenders)}): {folds}-fold CV at {c.policy.crop_size} px")
        cv, fingerprints, (model, held_out) = _cross_validate_one(data, c, folds, console, show_progress)
        if rows and fingerprints != rows[0]["held_out_sha256"]:
            differ = [k + 1 for k, (a, b) in enumerate(zip(fingerprints, rows[0]["held_out_sha256"])) if a != b]
            raise TrainingError(f"{c.name} held out other files than {rows[0]['backbone']} in fold(s) {differ}: "
                                "the folds are not comparable (did an image decode for one backbone and not the other?)")
        rows.append(_summary_row(c, cv, fingerprints, _export(c, model, held_out, out_dir)))
        del model

    threads = available_cpus()
    sessions = {r["backbone"]: OnnxClassifier(r["export"]["path"], prefer_gpu=False, threads=threads) for r in rows}
    with make_progress(console, show_progress) as progress:
        task = progress.add_task("timing ONNX Runtime", total=rounds * len(sessions) * len(BATCH_SIZES))
        timings = time_round_robin(sessions, BATCH_SIZES, bench_seconds, rounds,
                                   on_slot=lambda name, b: progress.update(task, advance=1, info=f"{name} batch {b}"))
    for r in rows:
        r["onnxruntime"] = {f"batch_{b}": timings[r["backbone"]][b] for b in BATCH_SIZES}
    front = pareto_front([(r["accuracy"]["mean"], r["onnxruntime"]["batch_32"]["images_per_s"]) for r in rows])
    for r, on_front in zip(rows, front):
        r["pareto"] = on_front
    import onnxruntime

    return {
        "data": str(data), "k": folds, "backbones": rows,
        "pareto_front": [r["backbone"] for r in rows if r["pareto"]],
        "folds": {"held_out_sha256": rows[0]["held_out_sha256"], "identical_across_backbones": True,
                  "what": "sha256 of each fold's sorted held-out paths, checked equal for every backbone"},
        "timing": {"runtime": f"onnxruntime {onnxruntime.__version__}", "provider": "CPUExecutionProvider",
                   "intra_op_threads": threads, "seconds_per_measurement": bench_seconds, "rounds": rounds,
                   "batch_sizes": list(BATCH_SIZES), "graph": "fp32 ONNX of the exported model",
                   "how": "all graphs in one process, interleaved round-robin rounds after warm-up calls"},
        "pareto_axes": {"x": "ONNX Runtime CPU images/s at batch 32", "y": "mean CV accuracy"},
        "config": {k: v for k, v in contenders[0].cfg.model_dump(mode="json").items() if k not in ("backbone", "weights")},
    }


def plot_pareto(result: dict, path: Path) -> None:
    """Accuracy (error bars: std over folds) vs batch-32 images/s (log x), the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["backbones"]
    x = [r["onnxruntime"]["batch_32"]["images_per_s"] for r in rows]
    y = [r["accuracy"]["mean"] for r in rows]
    err = [r["accuracy"]["std"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    ax.errorbar(x, y, yerr=err, fmt="o", color="tab:blue", ecolor="grey", capsize=4, label="backbone (±1 std over folds)")
    front = sorted((xi, yi) for xi, yi, r in zip(x, y, rows) if r["pareto"])
    ax.plot([p[0] for p in front], [p[1] for p in front], "s--", color="tab:red", mfc="none", ms=12, label="Pareto front")
    for xi, yi, r in zip(x, y, rows):
        flag = "" if r["beats_linear_probe"] else " (not above probe)"
        ax.annotate(r["backbone"] + flag, (xi, yi), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlim(min(x) / 1.3, max(x) * 2.5)  # room for the labels right of the points
    ax.set_xlabel("ONNX Runtime CPU images/s, batch 32 (log)")
    ax.set_ylabel(f"accuracy, mean of {result['k']} folds")
    ax.set_title("accuracy vs serving throughput: up and right is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
