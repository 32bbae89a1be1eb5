#!/usr/bin/env bash
# The README's main job: set up (idempotent), then distill a digits diffusion model on the CPU
# with the pack's DMD2 trainer, sample it through the pack's nodes and write a grid + metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-env.sh
exec .venv/bin/python -m comfyui_dmd2.training.digits --out output/demo "$@"
