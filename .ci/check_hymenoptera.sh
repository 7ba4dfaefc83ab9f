#!/usr/bin/env bash
# Train on hymenoptera/train with its val/ folder as the held-out TEST split (early stopping uses
# a validation split carved from train), then fail below the 93% regression guard.
# Usage: check_hymenoptera.sh HYM_DIR [extra cnnloop train flags, e.g. --backbone efficientnet_lite2]
set -euo pipefail
HYM="$1"; shift
GUARD="${CNNLOOP_HYM_GUARD:-0.93}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
.venv/bin/cnnloop train "$HYM/train" --test-dir "$HYM/val" --out "$out/run" --quiet --json "$out/m.json" "$@"
.venv/bin/python - "$out/m.json" "$GUARD" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); guard = float(sys.argv[2])
acc = m["test"]["accuracy"]
print(f"hymenoptera test accuracy {acc:.4f} (n={m['test']['n']}), macro-F1 {m['test']['macro_f1']:.4f}, guard {guard}")
sys.exit(0 if acc >= guard else 1)
PY
