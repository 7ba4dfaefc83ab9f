"""Export variants side by side: images/s on CPU for torch eager vs ONNX Runtime fp32 vs int8 (and fp16).

One run: export RUN_DIR's model through the real `export_bundle` (parity check and variant
refusal included), then time every contender on the same preprocessed images (hymenoptera val by
default), batch 32, `--reps` timed passes after one untimed warm-up pass. Reported: images/s
(median pass), model file size, accuracy on the bench images and the delta vs fp32 ONNX, plus the
validation deltas the bundle metadata recorded.

    python bench/export.py RUN_DIR [--data DIR] [--batch 32] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera" / "val"


def load_bench_images(data: Path, classes: list[str], policy) -> tuple[np.ndarray, np.ndarray]:
    from exporters.preprocess import load_model_input
    from training.data.sources import labeled_folder

    files = labeled_folder(data, classes)
    return np.stack([load_model_input(p, policy) for p in files.paths]), files.labels


def time_passes(predict, images: np.ndarray, batch: int, reps: int) -> tuple[float, np.ndarray]:
    """(median images/s over `reps` full passes, probabilities of the last pass); one warm-up pass first."""
    def one_pass() -> np.ndarray:
        return np.concatenate([predict(images[i : i + batch]) for i in range(0, len(images), batch)])

    probs = one_pass()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        probs = one_pass()
        rates.append(len(images) / (time.perf_counter() - t0))
    return statistics.median(rates), probs


def export_run(run_dir: Path, out_dir: Path):
    from exporters.export.bundle_writer import export_bundle
    from training.run.publish import read_export_inputs

    inputs = read_export_inputs(run_dir)
    run = inputs.run
    bundle_dir, metadata = export_bundle(run.model, run.classes, run.policy, inputs.description, inputs.val,
                                         inputs.train_images, out_dir, calibration=inputs.calibration,
                                         log=lambda m: print(m, file=sys.stderr))
    return run, bundle_dir, metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished hymenoptera training run")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder to time and score on (default: hymenoptera/val)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.json")
    args = ap.parse_args()

    import onnxruntime
    import torch

    from exporters.export.onnx_graph import Uint8ImageClassifier
    from exporters.onnx_runtime import OnnxClassifier

    with tempfile.TemporaryDirectory() as tmp:
        run, bundle_dir, metadata = export_run(args.run_dir, Path(tmp) / "bundle")
        images, labels = load_bench_images(args.data, run.classes, run.policy)
        print(f"timing on {len(images)} images from {args.data}, batch {args.batch}, {args.reps} reps, "
              f"{torch.get_num_threads()} torch threads", file=sys.stderr)

        wrapper = Uint8ImageClassifier(run.model).eval()

        def torch_eager(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return wrapper(torch.from_numpy(batch))[0].numpy()

        contenders = {"torch eager (fp32)": (torch_eager, None)}
        for name, entry in metadata["variants"].items():
            if entry["file"]:
                session = OnnxClassifier(bundle_dir / entry["file"], prefer_gpu=False)
                contenders[f"onnxruntime CPU {name}"] = (lambda b, s=session: s.run(b)[0], bundle_dir / entry["file"])

        rows, fp32_acc = [], None
        for name, (predict, path) in contenders.items():
            rate, probs = time_passes(predict, images, args.batch, args.reps)
            acc = float(np.mean(probs.argmax(1) == labels))
            variant = name.rsplit(" ", 1)[-1]
            if name == "onnxruntime CPU fp32":
                fp32_acc = acc
            rows.append({"contender": name, "images_per_s": rate,
                         "size_mb": (path.stat().st_size if path else sum(p.numel() * p.element_size() for p in run.model.state_dict().values())) / 1e6,
                         "bench_accuracy": acc,
                         "val_delta_points": metadata["variants"].get(variant, {}).get("accuracy_delta_points") if path else None})
            print(f"{name}: {rate:.1f} img/s, accuracy {acc:.4f}", file=sys.stderr)
    for row in rows:
        row["bench_delta_points"] = 100 * (row["bench_accuracy"] - fp32_acc)
    base = next(r["images_per_s"] for r in rows if r["contender"] == "torch eager (fp32)")
    for row in rows:
        row["speedup_vs_torch"] = row["images_per_s"] / base

    result = {"run_dir": str(args.run_dir), "data": str(args.data), "n_images": int(len(images)), "batch": args.batch,
              "reps": args.reps, "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
              "torch": torch.__version__, "cpu_count": os.cpu_count(),
              # Other jobs on the box slow every contender; the 1-minute load average says how busy it was.
              "load_average_1m_at_end": os.getloadavg()[0], "parity_vs_torch": metadata["variants"]["fp32"]["parity_vs_torch"],
              "refused_variants": metadata["refused_variants"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nExport variants on CPU, {args.data.name} ({len(images)} images), batch {args.batch}, median of {args.reps} passes\n")
    print("| contender | images/s | vs torch | size (MB) | accuracy | Δ vs fp32 ONNX (bench) | Δ vs fp32 (val, metadata) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        val_delta = "" if r["val_delta_points"] is None else f"{r['val_delta_points']:+.2f}"
        print(f"| {r['contender']} | {r['images_per_s']:.1f} | {r['speedup_vs_torch']:.2f}x | {r['size_mb']:.1f} | "
              f"{r['bench_accuracy']:.4f} | {r['bench_delta_points']:+.2f} | {val_delta} |")
    print(f"\nparity fp32 ONNX vs torch on val: max |dp| {result['parity_vs_torch']['max_abs_diff']:.2e}; "
          f"refused variants: {', '.join(result['refused_variants']) or 'none'}")


if __name__ == "__main__":
    main()
