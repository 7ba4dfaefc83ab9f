"""Calibration, prediction sets and abstention, measured on held-out images over several seeds.

Per dataset and seed: train a run with the project's own `train` (or reuse the one already in
`--work`), then, from the run's raw val and test probabilities (its splits.json):

1. ECE (15 bins), NLL and Brier on test before and after the temperature fitted on val;
2. conformal prediction sets fitted on val at 90% and 95% target coverage: their coverage, size,
   empty share and per-class coverage on test;
3. accuracy of the answered images at 80/90/100% coverage (calibrated test confidence);
4. label-free accuracy (ATC and average confidence, raw and calibrated) on the test split and on
   shifted test images: digits inverted (the demo's shift), hymenoptera photos darkened and blurred.
   The shift is applied to the image file, which is then decoded as any upload;
5. the CPU the service spends per image on calibration (`service.predictions.calibrate_batch`:
   temperature, one draw per image from its digest, sets, abstention), beside what /predict costs
   per image in bench/results/serve_wrk.json.

hymenoptera: train/ (val carved from it) with val/ as the test split, the default recipe. digits:
scikit-learn's 1,797 scans at 32 px, carved 70/15/15, the demo's recipe (64 px, no flips). Nothing
here is chosen on a test split: every fit reads val only.

    python bench/calibration_quality.py [--seeds 0 1 2] [--datasets hymenoptera digits] [--work DIR] [--quick]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HYM = ROOT.parent / "shared" / "datasets" / "hymenoptera"
DATASETS = ("hymenoptera", "digits")
COVERAGES = (0.90, 0.95)
DARKEN, BLUR_RADIUS = 0.4, 2.0
SHIFTS = {"hymenoptera": f"darkened x{DARKEN} + Gaussian blur r={BLUR_RADIUS:g}", "digits": "inverted (ImageOps.invert)"}
TIMING_BATCHES = (1, 32)
TIMING_ROUNDS = 5


def recipe(dataset: str, seed: int, quick: bool) -> dict:
    from training.demo.loop import DEMO_RECIPE

    base = {"seed": seed} if dataset == "hymenoptera" else {**DEMO_RECIPE, "seed": seed}
    return {**base, "epochs": 2} if quick else base


def train_or_reuse(dataset: str, seed: int, work: Path, quick: bool) -> tuple[Path, bool, float | None]:
    """(run directory, reused?, training seconds or None when reused): a finished run in `work` is never retrained."""
    from rich.console import Console

    from training.config import load_train_config
    from training.data.digits import write_digits
    from training.train import train

    run = work / f"{dataset}-seed{seed}{'-quick' if quick else ''}"
    if (run / "metrics.json").is_file():
        return run, True, None
    if dataset == "hymenoptera":
        data, test_dir = HYM / "train", HYM / "val"
    else:
        data, test_dir = work / "digits-data", None
        if not (data / "9").is_dir():
            write_digits(data, size=32, overwrite=True)  # 32 px files, as the demo writes them
    t0 = time.perf_counter()
    train(data, run, load_train_config(None, recipe(dataset, seed, quick)), test_dir=test_dir, overwrite=True,
          console=Console(stderr=True, quiet=True), show_progress=False)
    return run, False, time.perf_counter() - t0


def shift_image(dataset: str, path: Path) -> Image.Image:
    if dataset == "digits":
        with Image.open(path) as im:
            return ImageOps.invert(ImageOps.exif_transpose(im).convert("L"))
    with Image.open(path) as im:
        im = ImageEnhance.Brightness(ImageOps.exif_transpose(im).convert("RGB")).enhance(DARKEN)
        return im.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))


def write_shifted(dataset: str, paths: list[str], labels: np.ndarray, classes: list[str], out: Path) -> Path:
    """The shifted copies of a split as an ImageFolder (lossless PNG), written once per run."""
    if not (out / ".done").is_file():
        for p, y in zip(paths, labels):
            dest = out / classes[y] / f"{Path(p).stem}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shift_image(dataset, Path(p)).save(dest)
        (out / ".done").write_text("")
    return out


def probabilities(run, files) -> tuple[np.ndarray, np.ndarray]:
    """(raw probabilities, labels) of `run` on labeled files, decoded and centre-cropped as in evaluate."""
    from training.data import augment
    from training.data.decode import decode_files
    from training.loop.steps import predict, resolve_device

    decoded, skipped = decode_files(files, run.policy.resize_size)
    if skipped:
        raise SystemExit(f"undecodable images: {skipped[:3]}")
    device = resolve_device("cpu")
    probs, _ = predict(run.model.to(device), augment.eval_crop(decoded.images, run.policy), device)
    return probs, decoded.labels.numpy()


def split_files(run_dir: Path, name: str, classes: list[str]):
    from training.data.sources import LabeledFiles
    from training.run.files import read_split

    paths, labels = read_split(run_dir, name)
    return LabeledFiles([Path(p) for p in paths], labels, classes)


def label_free(val_probs, val_labels, live_probs, live_labels, calibration) -> dict:
    """|estimate - true accuracy| of ATC and average confidence, raw (T = 1) and calibrated (val's T)."""
    from training.drift.stats import estimated_accuracy

    true = float(np.mean(live_probs.argmax(1) == live_labels))
    raw = estimated_accuracy(val_probs, val_labels, live_probs)
    cal = estimated_accuracy(calibration.apply(val_probs), val_labels, calibration.apply(live_probs))
    out = {"true_accuracy": true, "n": int(len(live_labels))}
    for when, est in (("raw", raw), ("calibrated", cal)):
        for method in ("atc", "average_confidence"):
            out[f"{method}_{when}"] = est[method]
            out[f"{method}_{when}_error"] = abs(est[method] - true)
    return out


def ece_noise_floor(probs: np.ndarray, draws: int = 1000, seed: int = 0) -> float:
    """Mean ECE of a perfectly calibrated model with these confidences on this many images: each image
    is right with probability equal to its confidence. 15-bin ECE on ~150 images is biased upwards by
    sampling noise alone; this is that bias."""
    from exporters.calibration import expected_calibration_error

    rng = np.random.default_rng(seed)
    top, conf = probs.argmax(1), probs.max(1)
    wrong = (top + 1) % probs.shape[1]
    return float(np.mean([expected_calibration_error(probs, np.where(rng.random(len(conf)) < conf, top, wrong))
                          for _ in range(draws)]))


def scores_with_floor(probs: np.ndarray, labels: np.ndarray) -> dict:
    from exporters.calibration import calibration_scores

    return {**calibration_scores(probs, labels), "ece_if_perfectly_calibrated": ece_noise_floor(probs)}


def expected_coverage(n: int, coverage: float) -> float:
    """What split conformal promises on average with n calibration images: qhat is the
    ceil((n+1) coverage)-th of n scores, so a new image is covered with probability k / (n+1)."""
    return min(1.0, math.ceil((n + 1) * coverage) / (n + 1))


def measure_run(dataset: str, seed: int, run_dir: Path) -> tuple[dict, dict]:
    """(this run's row, what the serving timing needs: raw test probabilities and the 90% calibration)."""
    from exporters.calibration import TEMPERATURE_RANGE, calibration_scores, fit_calibration, risk_coverage, set_report
    from training.data.sources import labeled_folder
    from training.run.files import load_run, read_json

    run = load_run(run_dir)
    val_probs, val_labels = probabilities(run, split_files(run_dir, "val", run.classes))
    test_files = split_files(run_dir, "test", run.classes)
    test_probs, test_labels = probabilities(run, test_files)
    shifted_dir = write_shifted(dataset, [str(p) for p in test_files.paths], test_files.labels, run.classes,
                                run_dir.parent / f"{run_dir.name}-shifted-test")
    shifted_probs, shifted_labels = probabilities(run, labeled_folder(shifted_dir, run.classes))

    cals = {c: fit_calibration(val_probs, val_labels, c, seed=seed) for c in COVERAGES}
    cal = cals[COVERAGES[0]]
    # The same draws as the run's own report (training/scoring/confidence.py): rng(seed + 1).
    u = np.random.default_rng(seed + 1).random(len(test_labels))
    shipped = read_json(run_dir / "calibration.json")
    row = {
        "dataset": dataset, "seed": seed, "classes": run.classes,
        "n": {"val": int(len(val_labels)), "test": int(len(test_labels)), "shifted_test": int(len(shifted_labels))},
        "temperature": cal.temperature, "temperature_in_run": shipped["temperature"],
        # No misclassified val image: NLL falls as T -> 0, so the fit can only stop at its lower bound.
        "val_errors": int(np.sum(val_probs.argmax(1) != val_labels)),
        "temperature_at_bound": bool(np.isclose(cal.temperature, TEMPERATURE_RANGE, rtol=1e-6).any()),
        "calibration_val": {"before": calibration_scores(val_probs, val_labels),
                            "after": calibration_scores(cal.apply(val_probs), val_labels)},
        "calibration_test": {"before": scores_with_floor(test_probs, test_labels),
                             "after": scores_with_floor(cal.apply(test_probs), test_labels)},
        "prediction_sets": {f"{c:.2f}": {"qhat": cals[c].to_json()["qhat"], "expected_coverage": expected_coverage(len(val_labels), c),
                                         **set_report(cals[c], test_probs, test_labels, run.classes, u)}
                            for c in COVERAGES},
        "risk_coverage": risk_coverage(cal.apply(test_probs), test_labels)["at_coverage"],
        "label_free": {"test": label_free(val_probs, val_labels, test_probs, test_labels, cal),
                       "shifted_test": {"shift": SHIFTS[dataset],
                                        **label_free(val_probs, val_labels, shifted_probs, shifted_labels, cal)}},
    }
    return row, {"raw": test_probs, "calibration": cal}


def _cpu_us_per_image(fn, batch: int, reps: int) -> float:
    """Median over rounds of CPU microseconds per image (this thread only: thread_time_ns)."""
    rounds = []
    for _ in range(TIMING_ROUNDS):
        t0 = time.thread_time_ns()
        for _ in range(reps):
            fn()
        rounds.append((time.thread_time_ns() - t0) / 1e3 / reps / batch)
    return statistics.median(rounds)


def serving_cost(timing_inputs: dict[str, dict]) -> dict:
    """CPU per image of `calibrate_batch` at batch 1 and 32, per dataset (class count), beside /predict's CPU per image."""
    from service.predictions import calibrate_batch

    out = {"predict_cpu_us_per_image": predict_cpu_per_image(), "rows": []}
    for dataset, inp in timing_inputs.items():
        raw, cal = inp["raw"], inp["calibration"]
        for batch in TIMING_BATCHES:
            x = np.ascontiguousarray(raw[np.arange(batch) % len(raw)], dtype=np.float32)
            shas = [hashlib.sha256(f"{dataset}-{i}".encode()).hexdigest() for i in range(batch)]
            reps = max(200, 20_000 // batch)
            served = _cpu_us_per_image(lambda: calibrate_batch(x, cal, shas), batch, reps)
            base = out["predict_cpu_us_per_image"]["one_core_c32"]
            out["rows"].append({"dataset": dataset, "classes": int(raw.shape[1]), "batch": batch, "reps_per_round": reps,
                                "calibrate_batch_us": served, "calibrate_batch_vs_predict": served / base})
    return out


def predict_cpu_per_image() -> dict:
    """Server CPU per /predict image (one image per request) from bench/results/serve_wrk.json, c=32 rows."""
    doc = json.loads((ROOT / "bench" / "results" / "serve_wrk.json").read_text())
    out = {}
    for run in doc["runs"]:
        row = next(r for r in run["wrk"] if r["concurrency"] == 32)
        name = "one_core_c32" if len(run["cores"]) == 1 else "two_cores_c32"
        out[name] = row["server_cpu_s"] / (row["images_per_s"] * row["wall_s"]) * 1e6
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean, std and range over seeds of each headline number, per dataset."""
    def stats(values):
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        s = {"seeds": [r["seed"] for r in rs], "temperature": stats([r["temperature"] for r in rs])}
        for when in ("before", "after"):
            for k in ("ece", "nll", "brier", "accuracy", "mean_confidence", "ece_if_perfectly_calibrated"):
                s[f"test_{k}_{when}"] = stats([r["calibration_test"][when][k] for r in rs])
        for c in (f"{c:.2f}" for c in COVERAGES):
            for k in ("coverage", "mean_set_size", "empty_sets"):
                s[f"sets_{c}_{k}"] = stats([r["prediction_sets"][c][k] for r in rs])
        for c in ("0.80", "0.90", "1.00"):
            s[f"accuracy_at_{c}"] = stats([r["risk_coverage"][c]["accuracy"] for r in rs])
        for traffic in ("test", "shifted_test"):
            for k in ("true_accuracy", "atc_raw_error", "atc_calibrated_error", "average_confidence_raw_error",
                      "average_confidence_calibrated_error"):
                s[f"{traffic}_{k}"] = stats([r["label_free"][traffic][k] for r in rs])
        out[dataset] = s
    return out


def targets(summary: dict) -> dict:
    """Each target on the seed means: ECE after <= half of before and <= 0.03; coverage within 2 points."""
    out = {}
    for dataset, s in summary.items():
        before, after = s["test_ece_before"]["mean"], s["test_ece_after"]["mean"]
        out[dataset] = {"ece_halved": after <= before / 2, "ece_at_most_0.03": after <= 0.03,
                        **{f"coverage_{c:.2f}_within_2_points": abs(s[f"sets_{c:.2f}_coverage"]["mean"] - c) <= 0.02
                           for c in COVERAGES}}
    return out


def _ms(s: dict, key: str, fmt: str = ".3f") -> str:
    return f"{s[key]['mean']:{fmt}} ± {s[key]['std']:{fmt}}"


def print_tables(rows: list[dict], summary: dict, cost: dict) -> None:
    print("### Calibration on test (temperature fitted on val)\n")
    print("| dataset | seed | val errors / n | test n | test accuracy | T | ECE before -> after | ECE if perfectly calibrated (before / after) | NLL before -> after | Brier before -> after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dataset, s in summary.items():
        print(f"| {dataset} | mean ± std | | | {_ms(s, 'test_accuracy_before')} | {_ms(s, 'temperature', '.2f')} | "
              f"{_ms(s, 'test_ece_before')} -> {_ms(s, 'test_ece_after')} | {s['test_ece_if_perfectly_calibrated_before']['mean']:.3f} / "
              f"{s['test_ece_if_perfectly_calibrated_after']['mean']:.3f} | {_ms(s, 'test_nll_before')} -> "
              f"{_ms(s, 'test_nll_after')} | {_ms(s, 'test_brier_before')} -> {_ms(s, 'test_brier_after')} |")
        for r in (r for r in rows if r["dataset"] == dataset):
            b, a = r["calibration_test"]["before"], r["calibration_test"]["after"]
            t = f"**{r['temperature']:.2f} (bound)**" if r["temperature_at_bound"] else f"{r['temperature']:.2f}"
            print(f"| | {r['seed']} | {r['val_errors']} / {r['n']['val']} | {r['n']['test']} | {b['accuracy']:.3f} | {t} | {b['ece']:.3f} -> "
                  f"{a['ece']:.3f} | {b['ece_if_perfectly_calibrated']:.3f} / {a['ece_if_perfectly_calibrated']:.3f} | "
                  f"{b['nll']:.3f} -> {a['nll']:.3f} | {b['brier']:.3f} -> {a['brier']:.3f} |")
    print("\n### Prediction sets on test (fitted on val)\n")
    print("| dataset | seed | val n | target | expected k/(n+1) | coverage | mean set size | empty sets | per-class coverage |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for dataset, s in summary.items():
        rs = [r for r in rows if r["dataset"] == dataset]
        for c in (f"{c:.2f}" for c in COVERAGES):
            print(f"| {dataset} | mean ± std | | {c} | {rs[0]['prediction_sets'][c]['expected_coverage']:.3f} | {_ms(s, f'sets_{c}_coverage')} | {_ms(s, f'sets_{c}_mean_set_size', '.2f')} | "
                  f"{_ms(s, f'sets_{c}_empty_sets')} | |")
            for r in rs:
                p = r["prediction_sets"][c]
                per = {k: v["coverage"] for k, v in p["per_class"].items()}
                per_text = (", ".join(f"{k} {v:.3f}" for k, v in per.items()) if len(per) <= 3 else
                            f"min {min(per.values()):.3f} ({min(per, key=per.get)}), max {max(per.values()):.3f}")
                print(f"| | {r['seed']} | {r['n']['val']} | {c} | {p['expected_coverage']:.3f} | {p['coverage']:.3f} | {p['mean_set_size']:.2f} | "
                      f"{p['empty_sets']:.3f} | {per_text} |")
    print("\n### Accuracy of the answered images against coverage (calibrated test confidence)\n")
    print("| dataset | seed | 80% answered | 90% answered | 100% answered |")
    print("|---|---|---:|---:|---:|")
    for dataset, s in summary.items():
        print(f"| {dataset} | mean ± std | {_ms(s, 'accuracy_at_0.80')} | {_ms(s, 'accuracy_at_0.90')} | {_ms(s, 'accuracy_at_1.00')} |")
        for r in (r for r in rows if r["dataset"] == dataset):
            rc = r["risk_coverage"]
            print(f"| | {r['seed']} | {rc['0.80']['accuracy']:.3f} | {rc['0.90']['accuracy']:.3f} | {rc['1.00']['accuracy']:.3f} |")
    print("\n### Label-free accuracy: |estimate - true accuracy|\n")
    print("| dataset | traffic | seed | true accuracy | ATC raw | ATC calibrated | avg confidence raw | avg confidence calibrated |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for dataset, s in summary.items():
        for traffic in ("test", "shifted_test"):
            name = "test" if traffic == "test" else f"test, {SHIFTS[dataset]}"
            print(f"| {dataset} | {name} | mean ± std | {_ms(s, f'{traffic}_true_accuracy')} | {_ms(s, f'{traffic}_atc_raw_error')} | "
                  f"{_ms(s, f'{traffic}_atc_calibrated_error')} | {_ms(s, f'{traffic}_average_confidence_raw_error')} | "
                  f"{_ms(s, f'{traffic}_average_confidence_calibrated_error')} |")
            for r in (r for r in rows if r["dataset"] == dataset):
                lf = r["label_free"][traffic]
                print(f"| | | {r['seed']} | {lf['true_accuracy']:.3f} | {lf['atc_raw_error']:.3f} | {lf['atc_calibrated_error']:.3f} | "
                      f"{lf['average_confidence_raw_error']:.3f} | {lf['average_confidence_calibrated_error']:.3f} |")
    base = cost["predict_cpu_us_per_image"]
    print(f"\n### CPU per image of serving calibration (median of {TIMING_ROUNDS} rounds, thread CPU time)\n")
    print(f"/predict costs {base['one_core_c32']:.0f} us of server CPU per image (1 core, c=32, bench/results/serve_wrk.json).\n")
    print("| classes | batch | calibrate_batch, us of CPU per image | share of /predict's CPU per image |")
    print("|---:|---:|---:|---:|")
    for r in cost["rows"]:
        print(f"| {r['classes']} ({r['dataset']}) | {r['batch']} | {r['calibrate_batch_us']:.1f} | {r['calibrate_batch_vs_predict']:.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/cnnloop-calibration-quality"),
                    help="runs and shifted images live here; a finished run found here is reused, not retrained")
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0 only, 2 epochs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seeds = [0] if args.quick else args.seeds
    out = args.out or ROOT / "bench" / "results" / f"calibration_quality{'_quick' if args.quick else ''}.json"
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows, timing_inputs, runs = [], {}, []
    for dataset in args.datasets:
        for seed in seeds:
            run_dir, reused, seconds = train_or_reuse(dataset, seed, args.work, args.quick)
            runs.append({"dataset": dataset, "seed": seed, "run": str(run_dir), "reused": reused, "train_seconds": seconds})
            print(f"{dataset} seed {seed}: {'reused' if reused else f'trained in {seconds:.0f}s'} {run_dir}", file=sys.stderr)
            row, inputs = measure_run(dataset, seed, run_dir)
            rows.append(row)
            timing_inputs.setdefault(dataset, inputs)
    load_before_timing = os.getloadavg()
    cost = serving_cost(timing_inputs)
    summary = summarise(rows)
    doc = {"recipes": {d: recipe(d, 0, args.quick) for d in args.datasets}, "coverages": COVERAGES, "shifts": SHIFTS,
           "machine": {"cpus": os.cpu_count(), "load_before": load_before, "load_before_timing": load_before_timing,
                       "load_after": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M")},
           "runs": runs, "rows": rows, "summary": summary, "targets": targets(summary), "serving_cost": cost}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print_tables(rows, summary, cost)
    print(f"\ntargets (seed means): {json.dumps(doc['targets'])}")


if __name__ == "__main__":
    main()
