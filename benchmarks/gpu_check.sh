#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): full-size SDXL at 1024 px, batch 1 and 2, bf16
# and fp16, 50 iterations, export and ComfyUI's stock LoRA loader; then SD1.5 at 512 with a
# full fake score (--fake-score full: bf16, batch 1, 10 iterations). About 7 minutes on an
# H100/H200. Needs torch with CUDA and ComfyUI (COMFYUI_PATH, or the test env's copy).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "${OUT:-output}"
"$PY" benchmarks/gpu_check.py --json "${OUT:-output}/gpu_check.jsonl" "$@"
status=$?
# the 1-step layout's full fake score where it is meant to fit: SD1.5 at 512
"$PY" benchmarks/gpu_check.py --json "${OUT:-output}/gpu_check.jsonl" --model sd15 --resolution 512 --batches 1 \
    --precisions bf16 --fake-score full --iterations 10 || status=$?
exit $status
