"""Multi-process training on CPU (gloo): gradients are averaged, adapters stay in sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_torchrun_processes_share_the_regression_pool_build(tiny_checkpoints, tmp_path):
    """Two gloo processes build a 3-pair pool at batch 1 together (rank 0 pairs 0 and 2, rank 1
    pair 1), gather it, and warm-start from the same pool: the file rank 0 writes holds every
    pair, and both processes end with the same adapters."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na tree\nthe sea\n")
    output, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TESTS / "train_entry.py"),
        "--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(prompts), "--output", str(output), "--steps", "1",
        "--resolution", "128", "--lora-rank", "4", "--batch-size", "1", "--grad-accum", "1", "--regression-steps", "2",
        "--regression-pairs", "3", "--set", "regression_teacher_steps=2", "--sample-every", "0", "--quiet",
    ]
    env = {**os.environ, "DMD2_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    pool = load_file(str(output / "regression_pool.safetensors"))
    assert len(pool["target"]) == 3 and torch.isfinite(pool["target"]).all()
    rank0, rank1 = (load_file(str(dump / f"adapters_rank{r}.safetensors")) for r in (0, 1))
    assert set(rank0) == set(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def _nccl_like_worker(rank: int, world: int, port: int, out: str) -> None:
    """A default group with a backend for CUDA tensors only ("cuda:gloo" stands for NCCL
    alone): every collective the run makes must still work on the CPU."""
    from comfyui_dmd2.training.run import (
        broadcast_parameters,
        check_in_sync,
        init_distributed,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("cuda:gloo", rank=rank, world_size=world)
    results: dict = {}
    try:
        dist.all_reduce(torch.ones(1))  # what the command did before: a CPU tensor on this group
    except RuntimeError as exc:
        results["plain_error"] = str(exc).splitlines()[0]
    d = init_distributed("cpu")
    results["host_group"] = d.host_group is not None
    d.barrier()
    results["agree_max"] = d.agree_max(15 if rank == 1 else 0)
    results["from_main"] = d.from_main(rank + 7)
    results["gathered"] = d.all_gather_object(f"rank {rank}")
    torch.manual_seed(rank)  # different weights on each rank until the broadcast
    layer = torch.nn.Linear(3, 2)
    broadcast_parameters(list(layer.parameters()), d)
    results["checksum"] = check_in_sync(list(layer.parameters()), d)
    GradientAverager(list(layer.parameters()), world, d)
    layer(torch.full((1, 3), float(rank + 1))).sum().backward()
    results["grad"] = layer.weight.grad.clone()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_collectives_run_on_a_group_without_a_cpu_backend(tmp_path):
    mp.spawn(_nccl_like_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in got:
        assert "No backend type associated with device type cpu" in r["plain_error"]  # the emulation is real
        assert r["host_group"]
        assert r["agree_max"] == 15 and r["from_main"] == 7
        assert r["gathered"] == ["rank 0", "rank 1"]
        torch.testing.assert_close(r["grad"], torch.tensor([[1.5, 1.5, 1.5]] * 2))  # mean of rank 1's ones and rank 2's twos
    assert got[0]["checksum"] == got[1]["checksum"]


def test_process_group_backend_gives_gpus_a_cpu_backend_beside_nccl():
    from comfyui_dmd2.training.run import process_group_backend

    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cuda:1") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def test_gradient_buckets_are_bounded_and_keep_order():
    """No flat copy of every gradient: small ones share buckets of at most the bucket size,
    one of that size or more is reduced in place on its own."""
    big = torch.zeros(300_000)  # 1.14 MiB: over the 1 MiB bucket
    small = [torch.zeros(50_000) for _ in range(12)]  # 0.19 MiB each
    half = torch.zeros(50_000, dtype=torch.float16)
    grads = [small[0], small[1], big, *small[2:], half, small[0][::2]]
    buckets = GradientAverager([], 2, bucket_mib=1).buckets(grads)
    assert [id(g) for b in buckets for g in b] == [id(g) for g in grads]  # every gradient once, in order
    for b in buckets:
        assert sum(g.numel() * g.element_size() for g in b) <= 2**20 or len(b) == 1
        assert len({(g.dtype, g.device) for g in b}) == 1
    alone = [id(b[0]) for b in buckets if len(b) == 1]
    assert alone == [id(big), id(half), id(grads[-1])]  # too big, another dtype, not contiguous
    assert [len(b) for b in buckets] == [2, 1, 5, 5, 1, 1]


def _two_rank_run(tiny_checkpoints, tmp_path, output, steps, extra_env, *extra_args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na tree\nthe sea\nblue sky\n")
    images = tmp_path / "images"
    if not images.is_dir():
        images.mkdir()
        for i in range(2):
            Image.new("RGB", (128, 128), (100 * i, 50, 200)).save(images / f"{i}.png")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TESTS / "train_entry.py"),
        "--checkpoint", str(tiny_checkpoints["sd15"]), "--prompts", str(prompts), "--images", str(images),
        "--output", str(output), "--steps", str(steps), "--resolution", "128", "--lora-rank", "4", "--save-every", "2",
        "--sample-every", "0", "--grad-accum", "1", "--set", "warmup_steps=0", "--set", "fake_updates_per_generator_update=2",
        "--set", "lr_generator=1e-3", "--set", "lr_fake_score=1e-3", "--quiet", *extra_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)


def _stop_resume_export(tiny_checkpoints, tmp_path, env, steps, stop_at, *extra_args):
    """Two ranks: SIGTERM to rank 1 only after iteration ``stop_at``, both stop there with a
    checkpoint; the same command resumes on both and exports."""
    output = tmp_path / "out"
    saves = {f"step_{s:07d}" for s in range(2, stop_at + 1, 2)} | {f"step_{stop_at:07d}"}
    stopped = _two_rank_run(tiny_checkpoints, tmp_path, output, steps, {**env, "DMD2_TEST_SIGNAL_AT": f"{stop_at}:1"}, *extra_args)
    assert stopped.returncode != 0
    assert "No backend type" not in stopped.stderr, stopped.stderr[-4000:]
    lines = [line for line in stopped.stderr.splitlines() if "stopped at step" in line]
    assert len(lines) == 2 and all(line.endswith(f"dmd2-train: stopped at step {stop_at}; run the same command to resume") for line in lines), stopped.stderr[-4000:]
    assert {p.name for p in (output / "checkpoints").iterdir()} == set(sorted(saves)[-2:])
    assert {p.name for p in (output / "checkpoints" / f"step_{stop_at:07d}").iterdir()} >= {"state_rank0.pt", "state_rank1.pt"}
    assert not list(output.glob("*.safetensors"))

    resumed = _two_rank_run(tiny_checkpoints, tmp_path, output, steps, env, *extra_args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming at step {stop_at} of {steps}" in resumed.stderr
    # The last checkpoint passed check_in_sync: both processes held the same adapters.
    assert {p.name for p in (output / "checkpoints" / f"step_{steps:07d}").iterdir()} >= {"state_rank0.pt", "state_rank1.pt"}
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps))
    exported = load_file(str(output / "dmd2_tiny_sd15_lora.safetensors"))
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in exported.items())


def test_torchrun_on_a_group_without_cpu_backend_stops_resumes_and_exports(tiny_checkpoints, tmp_path):
    """Issue #26: NCCL alone has no backend for CPU tensors, and the command's stop flag was
    one. Emulated on the CPU by a group registered for CUDA only: start-up, 3 iterations, a
    SIGTERM that reaches rank 1 only, then the same command resumes on both and exports."""
    _stop_resume_export(tiny_checkpoints, tmp_path, {"DMD2_TEST_PROCESS_GROUP": "cuda:gloo"}, 5, 3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("group", ["", "nccl"], ids=["cpu-gloo-cuda-nccl", "nccl-only"])
def test_two_gpus_on_nccl_stop_resume_and_export(tiny_checkpoints, tmp_path, group):
    """The same on 2 GPUs for real: the command's own group, and one created before it with
    NCCL alone; 10 iterations, SIGTERM to rank 1 after 5, resume, export."""
    _stop_resume_export(tiny_checkpoints, tmp_path, {"DMD2_TEST_PROCESS_GROUP": group} if group else {}, 10, 5, "--device", "cuda")


REFERENCE = TESTS / "data" / "single_process_draws.safetensors"


def _single_process_run():
    """12 iterations of the 4-step trainer on the analytic 2-D target (GAN on, 2 micro-batches,
    moving average): the trained tensors, the trainer's RNG state and the generator's calls."""
    from comfyui_dmd2.training.trainer import DMD2Trainer
    from test_trainer_gmm import GMMBackend, gmm_config

    torch.manual_seed(3)
    backend = GMMBackend(with_gan=True)
    calls = []
    plain = backend.generator_x0
    backend.generator_x0 = lambda x_t, t, cond: calls.append(int(t[0])) or plain(x_t, t, cond)
    config = gmm_config(generator_timesteps=(999, 749, 499, 249), batch_size=16, grad_accum=2, ema_decay=0.9, fake_updates_per_generator_update=2)
    trainer = DMD2Trainer(config, backend)
    losses = [m["loss_fake"] for m in trainer.run(steps=12, progress=False)]
    tensors = {k: v.detach().clone().contiguous() for k, v in trainer.tensors().items()}
    return tensors | {"rng": trainer.rng.get_state(), "calls": torch.tensor(calls), "loss_fake": torch.tensor(losses, dtype=torch.float64)}


def write_single_process_reference() -> None:
    """Regenerate the reference (only where a change is meant to alter single-process runs):
    ``cd tests && python -c "import test_ddp; test_ddp.write_single_process_reference()"``."""
    from safetensors.torch import save_file

    REFERENCE.parent.mkdir(exist_ok=True)
    save_file(_single_process_run(), str(REFERENCE))


def test_single_process_runs_are_bit_identical_to_before_the_shared_draw():
    """The shared draw of #26 changes nothing for one process: the same draws (the trainer's
    RNG state and the generator's call sequence, exactly), the same losses and tensors as the
    saved run of the trainer before it (``write_single_process_reference``)."""
    got, saved = _single_process_run(), load_file(str(REFERENCE))
    assert set(got) == set(saved)
    assert torch.equal(got["rng"], saved["rng"]) and torch.equal(got["calls"], saved["calls"])
    assert len(set(got["calls"].tolist())) == 4  # every simulated depth was drawn
    for key in saved:  # bit-identical here; a tolerance for other CPUs' float kernels
        torch.testing.assert_close(got[key], saved[key], rtol=1e-6, atol=1e-7, msg=key)


def _shared_draw_worker(rank: int, world: int, port: int, out: str) -> None:
    from comfyui_dmd2.training.run import init_distributed
    from comfyui_dmd2.training.trainer import DMD2Trainer
    from test_trainer_gmm import GMMBackend, gmm_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    d = init_distributed("cpu")
    calls = {}
    for shared in (False, True):
        torch.manual_seed(rank)
        backend = GMMBackend()
        seen = calls[shared] = []
        plain = backend.generator_x0
        backend.generator_x0 = lambda x_t, t, cond, plain=plain, seen=seen: seen.append(int(t[0])) or plain(x_t, t, cond)
        config = gmm_config(generator_timesteps=(999, 749, 499, 249), batch_size=8)
        DMD2Trainer(config, backend, rank=rank, shared_draw=d.from_main if shared else None).run(steps=12, progress=False)
    torch.save(calls, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_backward_simulation_depth_is_shared_across_ranks(tmp_path):
    """Each rank draws its own noise, but all simulate the same number of generator steps
    (rank 0's draw): no rank waits on another's longer simulation."""
    mp.spawn(_shared_draw_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert got[0][False] != got[1][False]  # own draws: the ranks' depths differ
    assert got[0][True] == got[1][True] == got[0][False]  # shared: rank 0's on both


def _disagreeing_worker(rank: int, world: int, port: int, out: str) -> None:
    from comfyui_dmd2.training.config import ConfigError
    from comfyui_dmd2.training.run import (
        OutOfSync,
        check_in_sync,
        check_same_inputs,
        check_shared_folder,
        init_distributed,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    d = init_distributed("cpu")
    errors = []
    check_same_inputs(d, checkpoint="abc", prompts=["", "a tree"])  # the same on both: passes
    try:
        check_same_inputs(d, checkpoint="abc", prompts=["", "a tree" if rank == 0 else "a cube"])
    except ConfigError as exc:
        errors.append(str(exc))
    try:
        check_in_sync([torch.nn.Parameter(torch.full((2,), float(rank)))], d)
    except OutOfSync as exc:
        errors.append(str(exc))
    check_shared_folder(d, Path(out))  # one folder: seen by both
    own = Path(out, f"local{rank}")  # each machine its own disk
    own.mkdir()
    try:
        check_shared_folder(d, own)
    except ConfigError as exc:
        errors.append(str(exc).replace(str(own), "<folder>"))
    d.barrier()  # rank 0 removes the probes after the check
    errors.append(sorted(p.name for p in Path(out).rglob(".dmd2-shared-*")))  # the probes are gone
    torch.save(errors, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_processes_that_disagree_stop_with_one_line_on_every_rank(tmp_path):
    """Several machines each read their own copies of the inputs: a rank that reads other
    prompts, or does not see rank 0's output folder, is refused before training, and
    adapters that drifted apart stop the run; on every rank, each with one line (dmd2-train
    prints it as its error)."""
    mp.spawn(_disagreeing_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert got[0] == got[1] and len(got[0]) == 4
    inputs, sync, folder, probes = got[0]
    assert inputs.startswith("rank 1 (on ") and "about the prompts: every process must read the same files" in inputs and "\n" not in inputs
    assert sync.startswith("the processes hold different adapters (checksums 0, 4)") and "\n" not in sync
    assert folder.startswith("rank 1 (on ") and "does not see the output folder <folder> that rank 0 (on " in folder
    assert probes == []


def test_sharded_full_fake_score_equals_the_whole_one_and_resumes(tiny_checkpoints, tmp_path):
    """#26 item 4: a full fake score sharded over 2 processes (FSDP2 on gloo) trains as the
    same run holding it whole on each (--no-shard-fake-score): the same losses, gradient
    norms and exported LoRA within float tolerance, also across a stop and resume; each
    process holds half the fake score's AdamW state; resuming it unsharded is refused in one
    line."""
    _sharded_equals_whole(tiny_checkpoints, tmp_path, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (benchmarks/gpu_check.sh runs it)")
def test_two_gpus_shard_a_full_fake_score(tiny_checkpoints, tmp_path):
    """The same on 2 GPUs over NCCL, bf16: sharded against whole within bf16's tolerance."""
    _sharded_equals_whole(tiny_checkpoints, tmp_path, 100.0, "--device", "cuda")


def _sharded_equals_whole(tiny_checkpoints, tmp_path, slack: float, *extra_args):
    """The sharded run (stopped after 3 iterations, resumed to 4) against the whole one;
    ``slack`` widens the float tolerances (bf16 on GPUs)."""
    full = ("--fake-score", "full", *extra_args)
    whole = _two_rank_run(tiny_checkpoints, tmp_path, tmp_path / "whole", 4, {}, *full, "--no-shard-fake-score")
    assert whole.returncode == 0, whole.stderr[-4000:]
    sharded_out = tmp_path / "sharded"
    stopped = _two_rank_run(tiny_checkpoints, tmp_path, sharded_out, 4, {"DMD2_TEST_SIGNAL_AT": "3:1"}, *full)
    assert stopped.returncode != 0 and "stopped at step 3" in stopped.stderr, stopped.stderr[-4000:]
    resumed = _two_rank_run(tiny_checkpoints, tmp_path, sharded_out, 4, {}, *full)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming at step 3 of 4" in resumed.stderr

    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "sharded")}
    assert [r["step"] for r in rows["sharded"]] == [0, 1, 2, 3]
    for key in ("loss_dm", "loss_fake", "loss_gan_discriminator", "loss_gan_generator", "grad_norm_fake", "grad_norm_generator"):
        got = [r[key] for r in rows["sharded"] if key in r]
        expected = [r[key] for r in rows["whole"] if key in r]
        assert len(got) == len(expected) >= 2, key
        torch.testing.assert_close(got, expected, rtol=1e-4 * slack, atol=1e-7 * slack, msg=key)
    lora = {name: load_file(str(tmp_path / name / "dmd2_tiny_sd15_lora.safetensors")) for name in ("whole", "sharded")}
    assert set(lora["whole"]) == set(lora["sharded"])
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in lora["sharded"].items())
    for key, value in lora["whole"].items():
        torch.testing.assert_close(lora["sharded"][key], value, rtol=1e-3 * slack, atol=1e-5 * slack, msg=key)
    # The checkpoint holds the fake score whole (the same keys as the unsharded run's) and each
    # process's half of its AdamW state. The fake score's weights agree to 1% of what its last
    # two updates moved them (measured 0.05%): AdamW turns the float noise of gradients that are
    # zero but for rounding (a conv bias before a GroupNorm) into steps of the learning rate.
    step = "checkpoints/step_0000004"
    tensors = {name: load_file(str(tmp_path / name / step / "tensors.safetensors")) for name in ("whole", "sharded")}
    assert set(tensors["whole"]) == set(tensors["sharded"])
    before = load_file(str(tmp_path / "whole" / "checkpoints/step_0000002/tensors.safetensors"))
    fake = [k for k in before if k.startswith("fake_score/fake_score.")]

    def flat(values):
        return torch.cat([values[k].flatten() for k in fake])

    moved = (flat(tensors["whole"]) - flat(before)).norm()
    assert moved > 0 and (flat(tensors["sharded"]) - flat(tensors["whole"])).norm() < 0.01 * min(slack, 10) * moved
    for key in set(before) - set(fake):  # generator, its moving average, the GAN head
        torch.testing.assert_close(tensors["sharded"][key], tensors["whole"][key], rtol=1e-3 * slack, atol=1e-6 * slack, msg=key)
    states = [torch.load(sharded_out / step / f"state_rank{r}.pt", weights_only=True) for r in range(2)]
    plain = torch.load(tmp_path / "whole" / step / "state_rank0.pt", weights_only=True)
    assert [s["fake_score_shards"] for s in states] == [2, 2] and plain["fake_score_shards"] == 1
    halves = [s["trainer"]["fake_optimizer"]["state"] for s in states]
    plain_state = plain["trainer"]["fake_optimizer"]["state"]
    sizes = {i: ([h[i]["exp_avg"].numel() for h in halves], plain_state[i]["exp_avg"].numel()) for i in plain_state}
    sharded = [n for n, whole in sizes.values() if sum(n) == whole and min(n) < whole]
    replicated = [n for n, whole in sizes.values() if n == [whole, whole]]  # the GAN head
    assert len(sharded) == len(fake) and len(replicated) == len([k for k in before if k.startswith("fake_score/gan_head.")])
    assert sum(max(n) for n in sharded) < 0.55 * sum(sum(n) for n in sharded)  # each rank about half
    refused = _two_rank_run(tiny_checkpoints, tmp_path, sharded_out, 6, {}, *full, "--no-shard-fake-score")
    assert refused.returncode != 0  # torchrun: 1 when a process exits with 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("dmd2-train: error:")]
    assert errors and all("its full fake score was sharded over 2 processes and would now be held whole" in e and
                          e.endswith("resume on 2 processes, or start over with --no-resume") for e in errors), refused.stderr[-3000:]
