#!/usr/bin/env bash
# What a lent GPU machine is worth to cnnloop, in one markdown table:
#   (a) training images/s of `cnnloop train --device cuda`, with and without AMP (and data-parallel
#       under torchrun when 2+ GPUs are visible): median of train_images_per_s over the epochs after
#       the first (cuDNN autotuning and allocator warm-up land in epoch 1);
#   (b) ONNX Runtime throughput of the exported bundle on the CUDA EP (fp32, fp16) next to the CPU EP,
#       with parity of each CUDA row vs CPU EP fp32 (max |dp|, top-1 agreement) on the val images;
#   (c) the figures that size a GPU pod (README, "Sizing a GPU node"): JPEG decode + resize + crop
#       per CPU core (img/s, as the service's decode threads run it), GPU memory each CUDA EP session
#       takes (nvidia-smi before and after it loads and runs), and the cores of decoding one GPU needs.
#
#   bash bench/gpu_check.sh [DATA]      DATA: hymenoptera (train/ + val/) by default
#   EPOCHS=3 BATCH=32 PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Exit status: 0 measured, or no CUDA device, in which case it prints
# "no CUDA device: nothing to measure" and exits 0 so a CPU-only CI job can call it unconditionally.
# When onnxruntime has no CUDAExecutionProvider (the CPU wheel), the CUDA EP rows say "absent" and are
# skipped. Non-zero: a step failed and printed why (a CUDA EP that is listed but does not load is a failure).
# Parity is reported, not enforced: the CUDA EP may use TF32, which misses the 1e-4 export bar by design.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
BIN=$(dirname "$PY")
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-32}
DATA=${1:-}
if [ -z "$DATA" ]; then
  for d in ../shared/datasets/hymenoptera shared/datasets/hymenoptera; do
    [ -d "$d" ] && DATA=$d && break
  done
fi

# A broken environment (no torch, no onnxruntime) fails here with its traceback, not as "no GPU".
PROBE=$("$PY" -c 'import onnxruntime as ort, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(n, "torch", torch.__version__, "sees", n, "GPU(s); onnxruntime providers:", ", ".join(ort.get_available_providers()))')
NGPU=${PROBE%% *}
if [ "$NGPU" -eq 0 ]; then
  echo "no CUDA device: nothing to measure (${PROBE#* })"
  exit 0
fi
if [ -z "$DATA" ] || [ ! -d "$DATA/val" ]; then
  echo "error: no data: pass a folder holding train/ and val/ ImageFolders (hymenoptera by default)" >&2
  exit 2
fi

WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
RECIPE=(--device cuda --epochs "$EPOCHS" --batch-size "$BATCH" --strategy finetune --patience "$EPOCHS" --test-fraction 0 --quiet)

echo "training on $DATA: $EPOCHS epochs, batch $BATCH, full fine-tune" >&2
"$BIN/cnnloop" train "$DATA" --out "$WORK/train-amp" --amp "${RECIPE[@]}" >&2
"$BIN/cnnloop" train "$DATA" --out "$WORK/train-fp32" --no-amp "${RECIPE[@]}" >&2
if [ "$NGPU" -ge 2 ]; then
  "$BIN/torchrun" --standalone --nproc_per_node="$NGPU" --no-python "$BIN/cnnloop" train "$DATA" \
    --out "$WORK/train-ddp" --amp "${RECIPE[@]}" >&2
fi

"$PY" - "$WORK" "$DATA" "$BATCH" <<'EOF'
import json, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, "bench")
import onnxruntime as ort
import torch

from exporters.export.bundle_writer import export_bundle
from exporters.export.onnx_graph import PARITY_TOLERANCE, parity_figures
from exporters.onnx_runtime import OnnxClassifier
from exporters.preprocess import load_model_input
from export import load_bench_images, time_passes  # bench/export.py
from training.run.publish import read_export_inputs

work, data, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
gpu = torch.cuda.get_device_name(0)
rows = []  # (what, setting, images/s, parity)
for name, label in (("train-amp", "train, torch AMP"), ("train-fp32", "train, torch fp32"),
                    ("train-ddp", f"train, torch AMP, DDP x{torch.cuda.device_count()}")):
    if (work / name / "metrics.json").is_file():
        m = json.loads((work / name / "metrics.json").read_text())
        rates = [h["train_images_per_s"] for h in m["history"]]
        crop = json.loads((work / name / "model.json").read_text())["policy"]["crop_size"]
        rows.append((label, f"{crop} px, batch {batch}/GPU", statistics.median(rates[1:] or rates), ""))

inputs = read_export_inputs(work / "train-amp")
log = lambda msg: print(msg, file=sys.stderr)
bundle, meta = export_bundle(inputs.run.model, inputs.run.classes, inputs.run.policy, inputs.description, inputs.val,
                             inputs.train_images, work / "bundle", variants=("fp16",), log=log)
images, _ = load_bench_images(data / "val", inputs.run.classes, inputs.run.policy)
setting = f"{len(images)} val images, batch {batch}"
cpu = OnnxClassifier(bundle / meta["variants"]["fp32"]["file"], prefer_gpu=False)
rate, reference = time_passes(lambda b: cpu.run(b)[0], images, batch, reps=3)
rows.append(("ONNX Runtime CPU EP fp32", setting, rate, "reference"))
files = [p.read_bytes() for p in sorted((data / "val").rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]
start = time.thread_time()
for data_bytes in files * 2:
    load_model_input(data_bytes, inputs.run.policy)
decode_per_core = 2 * len(files) / (time.thread_time() - start)
rows.append(("JPEG decode + resize + crop, one CPU core", f"{len(files)} val JPEGs, thread CPU time", decode_per_core, ""))


def gpu_memory_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


sizing = []
failed = False
if "CUDAExecutionProvider" not in ort.get_available_providers():
    rows.append(("ONNX Runtime CUDA EP", "absent: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)", None, "skipped"))
for variant in ("fp32", "fp16") if "CUDAExecutionProvider" in ort.get_available_providers() else ():
    entry = meta["variants"].get(variant) or {}
    if not entry.get("file"):
        rows.append((f"ONNX Runtime CUDA EP {variant}", "variant refused at export", None, "skipped"))
        continue
    before = gpu_memory_mib()
    session = OnnxClassifier(bundle / entry["file"], prefer_gpu=True)
    if "CUDAExecutionProvider" not in session.providers:
        rows.append((f"ONNX Runtime CUDA EP {variant}", "CUDA EP listed but failed to load (CUDA/cuDNN libraries?)", None, "FAILED"))
        failed = True
        continue
    rate, probs = time_passes(lambda b, s=session: s.run(b)[0], images, batch, reps=3)
    after = gpu_memory_mib()
    memory = "" if before is None or after is None else f"{after - before:.0f} MiB of GPU memory for this session"
    sizing.append(f"CUDA EP {variant}: {rate:.0f} img/s at batch {batch} = the decoding of {rate / decode_per_core:.1f} CPU cores"
                  + (f"; {memory}" if memory else ""))
    p = parity_figures(reference, probs)
    parity = f"max abs dp {p['max_abs_diff']:.1e}, top-1 {100 * p['top1_agreement']:.1f}%"
    if variant == "fp32":  # fp16 answers to the accuracy-drop bar at export, not to this one
        within = p["max_abs_diff"] <= PARITY_TOLERANCE and p["top1_agreement"] == 1.0
        parity += f" ({'within' if within else 'outside'} the {PARITY_TOLERANCE:g} export bar)"
    rows.append((f"ONNX Runtime CUDA EP {variant}", setting, rate, parity))

print(f"\nGPU check on {gpu}, torch {torch.__version__}, onnxruntime {ort.__version__}\n")
print("| measurement | setting | images/s | parity vs CPU EP fp32 |")
print("|---|---|---:|---|")
for what, how, ips, parity in rows:
    print(f"| {what} | {how} | {'' if ips is None else f'{ips:.1f}'} | {parity} |")
if sizing:
    print("\nSizing a GPU node (README): one GPU keeps this many cores of JPEG decoding busy")
    for line in sizing:
        print(f"- {line}")
sys.exit(1 if failed else 0)
EOF
