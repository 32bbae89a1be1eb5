#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): full-size SDXL at 1024 px, batch 1 and 2, bf16
# and fp16, 50 iterations, export and ComfyUI's stock LoRA loader; about 6 minutes on an
# H100/H200. Needs torch with CUDA and ComfyUI (COMFYUI_PATH, or the test env's copy).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "${OUT:-output}"
exec "$PY" benchmarks/gpu_check.py --json "${OUT:-output}/gpu_check.jsonl" "$@"
