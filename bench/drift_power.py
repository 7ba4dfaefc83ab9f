"""Drift detection power on real photos: how often each detector fires, by shift and window size.

One run: train a quick model on hymenoptera/train with the project's own `train` (or reuse
`--run`), export it afresh through the current `export_bundle` (fp32 only) into a temporary
folder, and take that bundle's `reference.npz` as the reference, exactly as the service would.
A bundle already in a `--run` folder is never read: one exported before commit 7dc6963 carries a
PCA basis fitted on the validation sample it projects, which makes MMD fire on clean data.
The live pool is the hymenoptera val/ folder (153 photos, never seen in training), preprocessed
with `load_model_input`, then corrupted on the uint8 model input: Gaussian blur, darkening,
Gaussian noise; label shift keeps the images clean and samples 90% ants. ONNX Runtime scores each pool variant once; windows then sample rows.

Windows no larger than the pool are drawn without replacement; larger ones (and label-shift
windows needing more ants than the 70 in the pool) with replacement, which repeats photos and
so overstates the evidence a window holds: read those cells as "pool vs reference".

    python bench/drift_power.py [--run RUN_DIR] [--windows 100] [--sizes 50 100 200 500]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYM = ROOT.parent / "shared" / "datasets" / "hymenoptera"
ALPHA = 0.05
DETECTORS = ("bbsd_ks", "class_chi2", "mmd", "confidence_ks", "entropy_ks")
# The drift report's verdict combines bbsd_ks, class_chi2 and mmd; confidence and entropy support it.
VERDICTS = {"combined": ("bbsd_ks", "class_chi2", "mmd")}
# For comparison only, not shipped: MMD on the pre-7dc6963 basis, fitted on the validation embeddings
# it projects. Costs one more MMD per window.
OLD_MMD = "mmd_old_val_fitted_pca"
COLUMNS = (*DETECTORS, *VERDICTS, OLD_MMD)
SHIFTS = ("clean", "blur", "darken", "noise", "label")
BLUR_RADIUS, DARKEN, NOISE_SIGMA, LABEL_SHIFT_ANTS = 2.5, 0.4, 25.0, 0.9
# Quick recipe: frozen backbone, 4 epochs. val_fraction 0.4 because the validation split becomes the
# reference: the default 15% leaves 37 photos, and no window size can out-detect a 37-sample reference.
RECIPE = {"strategy": "freeze", "epochs": 4, "image_size": 224, "val_fraction": 0.4, "seed": 0}
ANCHOR = "Failing Loudly: BBSD+KS averaged 0.51 detection at 200 samples across its shifts"


def train_run(out: Path) -> Path:
    from training.config import load_train_config
    from training.train import train

    train(HYM / "train", out, load_train_config(None, RECIPE), test_dir=HYM / "val", show_progress=False)
    return out


def build_reference(run_dir: Path, bundle_dir: Path):
    """Export the run now (fp32 only) and return (classifier, classes, policy, metadata, reference).

    The reference holds the bundle's arrays as shipped (PCA basis fitted on training embeddings),
    plus, for the OLD_MMD column only, the validation embeddings projected on a basis fitted on
    themselves, as exporters before 7dc6963 shipped it."""
    from exporters.export.bundle_writer import export_bundle
    from exporters.onnx_runtime import OnnxClassifier
    from exporters.reference_stats import MAX_SAMPLE, fit_pca, load_reference, project
    from training.run.publish import read_export_inputs

    inputs = read_export_inputs(run_dir)
    run = inputs.run
    _, metadata = export_bundle(run.model, run.classes, run.policy, inputs.description, inputs.val, inputs.train_images,
                                bundle_dir, variants=(), calibration=inputs.calibration, log=lambda m: print(m, file=sys.stderr))
    # bundle.json is written by Registry.publish; this bench skips the registry and opens the files directly.
    classifier = OnnxClassifier(bundle_dir / metadata["variants"]["fp32"]["file"], prefer_gpu=False)
    ref = load_reference(bundle_dir / metadata["reference"]["file"])
    if len(ref["labels_sample"]) != len(inputs.val.labels):
        raise SystemExit("the validation split exceeds the reference sample; this bench assumes they coincide")
    fitted_on = metadata["reference"]["pca"]["fitted_on"]
    if fitted_on != min(len(inputs.train_images), MAX_SAMPLE):
        raise SystemExit(f"the shipped PCA basis was fitted on {fitted_on} embeddings, not on the training sample; "
                         "this bench measures the basis fitted on training embeddings only")
    val_emb = classifier.predict(inputs.val.images)[1]
    mean, components, _ = fit_pca(val_emb, len(ref["pca_components"]))
    ref["bases"] = {"mmd": (ref["pca_mean"], ref["pca_components"]), OLD_MMD: (mean, components)}
    ref["emb"] = {"mmd": ref["embeddings_pca_sample"], OLD_MMD: project(val_emb, mean, components)}
    ref["n_train"] = len(inputs.train_images)
    return classifier, run.classes, run.policy, metadata, ref


def corrupt(images: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
    if shift == "blur":
        return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(BLUR_RADIUS))) for im in images])
    if shift == "darken":
        return (images.astype(np.float32) * DARKEN).round().astype(np.uint8)
    if shift == "noise":
        return np.clip(images + rng.normal(0, NOISE_SIGMA, images.shape), 0, 255).round().astype(np.uint8)
    return images


def draw_window(rng: np.random.Generator, size: int, labels: np.ndarray, shift: str, ants: int) -> tuple[np.ndarray, bool]:
    """Row indices of one window, and whether it had to repeat photos."""
    if shift != "label":
        replace = size > len(labels)
        return rng.choice(len(labels), size, replace=replace), replace
    n_ants = int(round(LABEL_SHIFT_ANTS * size))
    parts, replace = [], False
    for cls, n in ((ants, n_ants), (1 - ants, size - n_ants)):
        rows = np.flatnonzero(labels == cls)
        replace |= n > len(rows)
        parts.append(rng.choice(rows, n, replace=n > len(rows)))
    return np.concatenate(parts), replace


def run_detectors(ref: dict, probs: np.ndarray, emb: dict[str, np.ndarray], seed: int) -> dict[str, bool]:
    from training.drift import stats

    k = probs.shape[1]
    ref_probs = ref["probs_sample"]
    results = {
        "bbsd_ks": stats.bbsd_ks(ref_probs, probs, ALPHA),
        "class_chi2": stats.class_distribution_shift(np.bincount(ref_probs.argmax(1), minlength=k),
                                                     np.bincount(probs.argmax(1), minlength=k), ALPHA),
        **{name: stats.mmd_rbf(ref["emb"][name], e, ALPHA, seed=seed) for name, e in emb.items()},
        "confidence_ks": stats.confidence_shift(ref_probs, probs, ALPHA),
        "entropy_ks": stats.entropy_shift(ref_probs, probs, ALPHA),
    }
    fired = {n: results[n].detected for n in (*DETECTORS, OLD_MMD)}
    for verdict, names in VERDICTS.items():
        fired[verdict] = stats.combine([results[n] for n in names], ALPHA)[0]
    return fired


def score_pool(classifier, clean: np.ndarray, ref: dict, rng: np.random.Generator) -> dict:
    """shift -> (probabilities, {basis name: projected embeddings}), one ONNX Runtime pass per corruption."""
    from exporters.reference_stats import project

    pool = {}
    for shift in SHIFTS[:4]:
        probs, emb = classifier.predict(corrupt(clean, shift, rng))
        pool[shift] = (probs, {name: project(emb, *basis) for name, basis in ref["bases"].items()})
    pool["label"] = pool["clean"]
    return pool


def detection_rates(pool: dict, ref: dict, labels: np.ndarray, ants: int, sizes: list[int], windows: int,
                    rng: np.random.Generator) -> list[dict]:
    from rich.console import Console

    from training.progress import make_progress

    cells = []
    with make_progress(Console(stderr=True), True) as progress:
        task = progress.add_task("windows", total=len(SHIFTS) * len(sizes) * windows)
        for shift in SHIFTS:
            probs, emb = pool[shift]
            for size in sizes:
                hits, repeated = dict.fromkeys(COLUMNS, 0), False
                for w in range(windows):
                    idx, rep = draw_window(rng, size, labels, shift, ants)
                    repeated |= rep
                    for name, fired in run_detectors(ref, probs[idx], {n: e[idx] for n, e in emb.items()}, seed=w).items():
                        hits[name] += fired
                    progress.advance(task)
                cells.append({"shift": shift, "window": size, "windows": windows, "with_replacement": repeated,
                              "rate": {n: h / windows for n, h in hits.items()}})
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="reuse a finished training run instead of training one")
    ap.add_argument("--windows", type=int, default=100, help="windows per (shift, size) cell")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "drift_power.json")
    args = ap.parse_args()

    from exporters.preprocess import load_model_input
    from training.data.sources import labeled_folder
    from training.drift import stats

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="drift-power-") as tmp:
        run_dir = args.run or train_run(Path(tmp) / "run")
        classifier, classes, policy, metadata, ref = build_reference(run_dir, Path(tmp) / "bundle")
    files = labeled_folder(HYM / "val", classes)
    labels, ants = files.labels, classes.index("ants")
    rng = np.random.default_rng(args.seed)
    pool = score_pool(classifier, np.stack([load_model_input(p, policy) for p in files.paths]), ref, rng)
    temperature = metadata["reference"]["temperature"]
    pool_quality = {shift: {"accuracy": float(np.mean(pool[shift][0].argmax(1) == labels)),
                            **stats.estimated_accuracy(ref["probs_sample"], ref["labels_sample"], pool[shift][0], temperature)}
                    for shift in SHIFTS[:4]}
    cells = detection_rates(pool, ref, labels, ants, args.sizes, args.windows, rng)

    result = {
        "recipe": RECIPE, "run": str(run_dir) if args.run else "trained by this bench (temporary)",
        "classes": classes, "reference_size": int(len(ref["probs_sample"])), "pool_size": int(len(labels)),
        "pool_ants": int(np.sum(labels == ants)), "val_accuracy": metadata["reference"]["val_accuracy"],
        "temperature": temperature, "alpha": ALPHA, "exporter_commit": exporter_commit(),
        "pca": {**metadata["reference"]["pca"], "train_images": ref["n_train"],
                "basis": "fitted on training embeddings (shipped since 7dc6963)",
                OLD_MMD: "comparison only: basis fitted on the validation embeddings it projects (pre-7dc6963)"},
        "verdicts": {k: list(v) for k, v in VERDICTS.items()},
        "corruptions": {"blur_radius": BLUR_RADIUS, "darken_factor": DARKEN, "noise_sigma": NOISE_SIGMA,
                        "label_shift_ants": LABEL_SHIFT_ANTS},
        "pool_quality": pool_quality, "cells": cells, "anchor": ANCHOR, "seconds": round(time.perf_counter() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_tables(result)


def exporter_commit() -> str:
    """Last commit touching the exporter, plus '+dirty' when the working tree differs from it."""
    import subprocess

    paths = ["exporters/model_store/bundle.py", "exporters/export/bundle_writer.py", "exporters/reference_stats.py"]
    git = ["git", "-C", str(ROOT)]
    try:
        sha = subprocess.run([*git, "log", "-1", "--format=%h", "--", *paths],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", *paths]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def print_tables(result: dict) -> None:
    print(f"reference: {result['reference_size']} validation outputs; pool: {result['pool_size']} val/ photos; "
          f"{result['cells'][0]['windows']} windows per cell; * = drawn with replacement (repeats photos)\n")
    print("| shift | window | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for c in result["cells"]:
        rates = " | ".join(f"{c['rate'][n]:.2f}" for n in COLUMNS)
        print(f"| {c['shift']} | {c['window']}{'*' if c['with_replacement'] else ''} | {rates} |")
    print(f"\nAnchor: {ANCHOR}.\n")
    print("| pool | true accuracy | ATC estimate | average confidence |")
    print("|---|---:|---:|---:|")
    for shift, q in result["pool_quality"].items():
        print(f"| {shift} | {q['accuracy']:.3f} | {q['atc']:.3f} | {q['average_confidence']:.3f} |")


if __name__ == "__main__":
    main()
