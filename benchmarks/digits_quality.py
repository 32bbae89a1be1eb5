"""Quality of DMD2 distillation on the 8x8 digits, side by side with the teacher.

    python benchmarks/digits_quality.py [--quick] [--out DIR] [--threads N]

Runs the digits demo, the finetune scenario (#23: the base teacher's 4-step student as the
release LoRA, swept over strengths on a finetune of the teacher; our LoRAs distilled from the
finetune by the product's path, from scratch and from the release LoRA; all exported as kohya
LoRA files and sampled in a ComfyUI graph through the stock LoRA loader and the pack's
DMD2Generate node) and prints the Fréchet-distance table and the ratios the targets are
judged on (``demo.finetune_targets``). The ablations are ``digits_study.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("dmd2-digits-benchmark"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="reuse a teacher cached here")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from comfyui_dmd2.training.digits import demo

    metrics = demo.run_demo(args.out, demo.QUICK if args.quick else demo.FULL, args.cache)
    print(demo._markdown(metrics))
    for target in metrics["targets"]:
        print(f"{target['target']}: ratio {target['ratio']:.2f} ({'met' if target['met'] else 'not met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
