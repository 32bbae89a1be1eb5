"""Multi-process training on CPU (gloo): gradients are averaged, adapters stay in sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from comfyui_dmd2.training.cli import GradientAverager
from PIL import Image
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _averager_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    params = [a.weight, a.bias, b.weight, b.bias]
    GradientAverager(params, world)
    x = torch.full((4, 3), float(rank + 1))
    # First backward reaches only a's parameters (b frozen), like the trainer's two updates.
    b.requires_grad_(False)
    b(a(x)).sum().backward()
    b.requires_grad_(True)
    a.requires_grad_(False)
    b(a(x) * (rank + 1)).sum().backward()
    torch.save({"a": [p.grad for p in (a.weight, a.bias)], "b": [p.grad for p in (b.weight, b.bias)]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gradient_averager_averages_each_backward(tmp_path):
    mp.spawn(_averager_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Expected: the mean of what each rank alone would compute.
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    expected_a, expected_b = [], []
    for rank in range(2):
        x = torch.full((4, 3), float(rank + 1))
        ga = torch.autograd.grad(b(a(x)).sum(), [a.weight, a.bias])
        gb = torch.autograd.grad(b(a(x).detach() * (rank + 1)).sum(), [b.weight, b.bias])
        expected_a.append(ga)
        expected_b.append(gb)
    for r in range(2):
        for i in range(2):
            torch.testing.assert_close(got[r]["a"][i], (expected_a[0][i] + expected_a[1][i]) / 2)
            torch.testing.assert_close(got[r]["b"][i], (expected_b[0][i] + expected_b[1][i]) / 2)


def test_torchrun_two_gloo_processes_keep_adapters_in_sync(tiny_checkpoints, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na tree\nthe sea\nblue sky\n")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (128, 128), (100 * i, 50, 200)).save(images / f"{i}.png")
    output, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TESTS / "train_entry.py"),
        "--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(prompts), "--images", str(images),
        "--output", str(output), "--steps", "3", "--resolution", "128", "--lora-rank", "4", "--save-every", "2",
        "--sample-every", "0", "--grad-accum", "1", "--set", "warmup_steps=0", "--set", "fake_updates_per_generator_update=2",
        "--set", "lr_generator=1e-3", "--set", "lr_fake_score=1e-3", "--quiet",
    ]
    env = {**os.environ, "DMD2_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = load_file(str(dump / "adapters_rank0.safetensors"))
    rank1 = load_file(str(dump / "adapters_rank1.safetensors"))
    assert set(rank0) == set(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    ups = [v for k, v in rank0.items() if k.startswith("generator/") and "lora_up" in k]
    assert any(v.abs().sum() > 0 for v in ups)  # the generator was trained
    assert any(k.startswith("fake_score/gan_head.") for k in rank0)
    assert any(k.startswith("generator_ema/") for k in rank0)  # the moving average, in sync too
    # One set of outputs, written by rank 0.
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert {p.name for p in (output / "checkpoints" / "step_0000003").iterdir()} == {"tensors.safetensors", "settings.json", "state_rank0.pt", "state_rank1.pt"}
    assert (output / "dmd2_tiny_sd15_lora.safetensors").is_file()
