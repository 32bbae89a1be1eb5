"""Run ``dmd2-train`` in a subprocess with the tiny test models registered.

    python tests/train_entry.py <dmd2-train arguments>

ComfyUI only recognises the tiny checkpoints after ``tiny_models.register()``. Test-only
knobs (environment): ``DMD2_TEST_STEP_DELAY`` seconds of sleep after each iteration (so a
test can kill the run between checkpoints), ``DMD2_TEST_DUMP`` a folder where each process
writes its final adapter weights as ``adapters_rank{r}.safetensors``,
``DMD2_TEST_PROCESS_GROUP`` a backend string the process group is created with before the
command runs (``cuda:gloo``: a group with no backend for CPU tensors, as NCCL alone),
``DMD2_TEST_SIGNAL_AT=STEP:RANK`` the process of that rank sends itself SIGTERM after
iteration STEP (a stop request that reaches one process only).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from comfyui_dmd2.comfy_env import ensure_comfy

ensure_comfy(cpu=True)

import tiny_models
import torch

tiny_models.register()
tiny_models.register_flux()
torch.set_num_threads(int(os.environ.get("DMD2_TEST_THREADS", "1")))

from comfyui_dmd2.training import cli, trainer


def main() -> int:
    delay = float(os.environ.get("DMD2_TEST_STEP_DELAY", "0"))
    signal_at = os.environ.get("DMD2_TEST_SIGNAL_AT")
    if delay or signal_at:
        plain_step = trainer.DMD2Trainer.step
        stop_step, stop_rank = map(int, signal_at.split(":")) if signal_at else (-1, -1)

        def slow_step(self):
            metrics = plain_step(self)
            time.sleep(delay)
            if self.step_count == stop_step and int(os.environ.get("RANK", "0")) == stop_rank:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

        trainer.DMD2Trainer.step = slow_step
    if os.environ.get("DMD2_TEST_PROCESS_GROUP"):
        torch.distributed.init_process_group(os.environ["DMD2_TEST_PROCESS_GROUP"])
    dump = os.environ.get("DMD2_TEST_DUMP")
    if not dump:
        return cli.main(sys.argv[1:])
    from comfyui_dmd2.training.shard import gathered
    from safetensors.torch import save_file

    trained, _, _ = cli.train(sys.argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    save_file(gathered(trained.tensors(), keep=True), str(Path(dump) / f"adapters_rank{rank}.safetensors"))  # a sharded fake score whole
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
