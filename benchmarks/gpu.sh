#!/usr/bin/env bash
# The accelerator checks of benchmarks/RESULTS.md in one run (< 8 minutes on one H100/H200):
# decode tok/s and its fraction of the HBM roofline at batch 64 and 256, and the train step's
# MFU, both at the Qwen2.5-0.5B shape with random weights (no checkpoint, no peer: transformers
# is not needed on the accelerator image). Usage, from the repository root:
#     bash benchmarks/gpu.sh [PRESET]      # default Qwen2.5-0.5B; Qwen2.5-1.5B also fits
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-Qwen2.5-0.5B}"
PY="${PYTHON:-python}"
# Fail in seconds, naming what is missing, before any device time goes to a compile: the
# accelerator image has JAX, flax, optax and orbax; the rest must be carried in (wheels).
"$PY" - <<'PY'
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "etils", "fsspec", "ml_dtypes", "numpy")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {missing}; install them (or carry their wheels) first")
import benchmarks.sampler, benchmarks.train_step  # noqa: F401  (imports without torch/transformers)
PY
echo "== sampler, $PRESET, bfloat16"
timeout 300 "$PY" -m benchmarks.sampler --preset "$PRESET" --dtype bfloat16 --batch 64,256 --skip-memory
echo "== train step, $PRESET, bfloat16 compute, fp32 params"
timeout 240 "$PY" -m benchmarks.train_step --preset "$PRESET" --dtype bfloat16 --batch 16 --seq-len 1024 \
    --seq-chunk 512 --remat --mfu
