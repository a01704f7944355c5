#!/usr/bin/env bash
# The GPU figures of the benchmarks, in one command, on a machine with a GPU and only torch,
# torchvision (pyarrow, pandas): no Ray, pycocotools or s3fs needed. R50-FPN at 800 px,
# training step and inference, fp32 and AMP bf16, ours vs torchvision's RetinaNet with the same
# settings and weights, and detections on the GPU equal to the CPU's within tolerance.
# Then the training input (bench/gpu_input.py): R50-FPN bf16 fed by 12 decode processes through
# the uint8 path of jobs.train, images/s and GPU busy fraction against batches resident on the GPU.
# Then the runtimes of jobs.infer on a GPU and the ONNX export on its torch (bench/gpu_runtimes.py).
# Writes bench/results/model-gpu.json, train-input-gpu.json and runtimes-gpu.json (naming the
# device); under 9.5 minutes.
#
#   bash bench/gpu.sh             # on the GPU machine
#   bash bench/gpu.sh --dry-run   # anywhere: every code path, tiny model, on the CPU if need be
#
# PYTHON picks the interpreter (default: python3, the GPU machine's own). RESULTS=DIR writes the
# three JSONs into DIR instead (a dry run writes them only then: its toy figures are no results).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import torch, torchvision' 2>/dev/null \
    || { echo "error: $PY cannot import torch and torchvision (set PYTHON=...)" >&2; exit 2; }
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
PYEOF
# 6 + 2 + 1 minutes, leaving the rest of 10 for start-up and the copy back.
status=0
bench() {  # seconds, script, result file name, the script's arguments
    local limit=$1 script=$2 name=$3 extra=()
    shift 3
    [ -n "${RESULTS:-}" ] && extra=(--output "$RESULTS/$name")
    timeout "$limit" "$PY" "bench/$script" "$@" ${extra[@]+"${extra[@]}"} || status=$?
}
bench 360 gpu_model.py model-gpu.json "$@"
bench 120 gpu_input.py train-input-gpu.json "$@"
bench 60 gpu_runtimes.py runtimes-gpu.json "$@"
exit $status
