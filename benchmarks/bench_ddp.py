"""Two processes on the CPU (gloo), today's multi-process code against the one before (#26).

``draws``: iteration time when every rank simulates rank 0's number of generator steps
(``shared_draw``, today) against each rank drawing its own (before: each iteration waits
for the rank with the most steps). One pair of processes runs both trainers on the same
backend, alternating iterations (a busy machine slows both alike); prints rank 0's mean
iteration time, the mean number of simulated steps the slowest rank ran, and the ratio.

``averager``: peak memory of a run with a full fake score (``--fake-score full``: every
gradient of a UNet copy is averaged) with ``GradientAverager`` (today: buckets of 25 MiB,
large gradients in place) against the flat all-reduce before (one new buffer as large as
all the gradients on each backward). Each variant in a fresh pair of processes; prints each
rank's peak RSS, its growth over the set-up, and the difference against the trained bytes.

    python benchmarks/bench_ddp.py draws         # the test models' width (tiny-sd15), 64 px
    python benchmarks/bench_ddp.py averager      # mid-size SD1.5-shaped UNet, full fake score, 64 px
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import MODELS, random_data, random_model


class FlatAverager:
    """The averager before #26: every gradient of a backward flattened into one new buffer."""

    def __init__(self, params, world_size: int):
        self.params, self.world_size = list(params), world_size
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.ready: set[int] = set()
        self.queued = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p):
        self.ready.add(self.index[id(p)])
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)

    def _all_reduce(self):
        grads = [self.params[i].grad for i in sorted(self.ready)]
        self.ready, self.queued = set(), False
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup(rank: int, world: int, port: int, args, full_fake_score: bool):
    """The multi-process run as ``TrainingRun`` sets it up, without a run folder."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from comfyui_dmd2.comfy_env import ensure_comfy

    ensure_comfy(cpu=True)
    from comfyui_dmd2.training.backend import SharedBaseBackend
    from comfyui_dmd2.training.run import init_distributed

    d = init_distributed("cpu")
    _, base = random_model(args.model, torch.float32)
    latent = args.resolution // 8
    backend = SharedBaseBackend(base, random_data(MODELS[args.model][1], args.resolution, seed=1 + rank), (4, latent, latent),
                                lora_rank=args.rank, lora_alpha=8.0, device="cpu", seed=0, rank=rank,
                                full_copies=("fake_score",) if full_fake_score else ())
    return d, backend


def draws_worker(rank: int, world: int, port: int, args, out: str) -> None:
    from comfyui_dmd2.training.config import DMD2Config
    from comfyui_dmd2.training.run import GradientAverager, broadcast_parameters
    from comfyui_dmd2.training.trainer import DMD2Trainer

    d, backend = _setup(rank, world, port, args, full_fake_score=False)
    config = DMD2Config.for_arch("sd15", warmup_steps=0, batch_size=1, grad_accum=1, steps=10_000)
    depths: dict[str, list[int]] = {"own": [], "shared": []}
    trainers = {}
    for name in ("own", "shared"):  # the same seeds: rank 0 draws the same depths in both
        trainers[name] = trainer = DMD2Trainer(config, backend, rank=rank, shared_draw=d.from_main if name == "shared" else None)
        plain = trainer._draw

        def draw(*a, plain=plain, seen=depths[name], **k):
            out = plain(*a, **k)
            seen.append(out["step"])
            return out

        trainer._draw = draw
    params = trainers["own"].generator_params + trainers["own"].fake_params
    broadcast_parameters(params, d)
    GradientAverager(params, world, d)
    times: dict[str, list[float]] = {"own": [], "shared": []}
    for i in range(2 * args.iterations):  # alternated: a busy machine slows both alike
        name = ("own", "shared")[i % 2]
        d.barrier()
        start = time.perf_counter()
        trainers[name].step()
        times[name].append(time.perf_counter() - start)
    slowest = {name: [max(d.all_gather_object(k)) for k in depths[name]] for name in depths}
    if rank == 0:
        Path(out, "draws.json").write_text(json.dumps({"times": times, "slowest": slowest, "own_rank0": depths["own"]}))
    torch.distributed.destroy_process_group()


def averager_worker(rank: int, world: int, port: int, args, out: str, variant: str) -> None:
    from comfyui_dmd2.training.config import DMD2Config
    from comfyui_dmd2.training.run import GradientAverager, broadcast_parameters
    from comfyui_dmd2.training.trainer import DMD2Trainer

    d, backend = _setup(rank, world, port, args, full_fake_score=True)
    config = DMD2Config.for_arch("sd15", warmup_steps=0, batch_size=1, steps=10_000, fake_updates_per_generator_update=1, grad_accum=1)
    trainer = DMD2Trainer(config, backend, rank=rank, shared_draw=d.from_main)
    params = trainer.generator_params + trainer.fake_params
    broadcast_parameters(params, d)
    (GradientAverager(params, world, d) if variant == "bucketed" else FlatAverager(params, world))
    setup_rss, setup_peak = rss_mib(), peak_rss_mib()
    for _ in range(args.iterations):
        trainer.step()
    result = {"setup_rss_mib": setup_rss, "setup_peak_mib": setup_peak, "peak_mib": peak_rss_mib(),
              "trained_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
              "fake_score_mib": sum(p.numel() * p.element_size() for p in trainer.fake_params) / 2**20}
    Path(out, f"{variant}_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["draws", "averager"])
    p.add_argument("--model", choices=sorted(MODELS), help="default: tiny-sd15 for draws, mid-sd15 for averager")
    p.add_argument("--resolution", type=int, help="default: 64")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--iterations", type=int, help="of each variant (draws: alternated, default 30; averager: default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = p.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        if args.what == "draws":
            args.model, args.resolution = args.model or "tiny-sd15", args.resolution or 64
            args.iterations = args.iterations or 30
            mp.spawn(draws_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
            r = json.loads(Path(out, "draws.json").read_text())
            print(f"{args.model} at {args.resolution} px, LoRA rank {args.rank}, 2 gloo processes x {args.threads} thread(s), "
                  f"4-step, {args.iterations} iterations each, alternated")
            mean = {}
            for name, label in (("own", "before (own draws)"), ("shared", "today (rank 0's draw)")):
                times, slowest = r["times"][name], r["slowest"][name]
                mean[name] = sum(times) / len(times)
                print(f"{label:22s}: {mean[name]:.3f} s/iteration (median {sorted(times)[len(times) // 2]:.3f}), "
                      f"slowest rank's simulated steps {sum(slowest) / len(slowest):.2f} on average")
            own = r["own_rank0"]
            print(f"rank 0's own draws averaged {sum(own) / len(own):.2f} steps (expected 1.5; expected slowest of 2: 2.125)")
            print(f"iteration time ratio today/before: {mean['shared'] / mean['own']:.3f}")
        else:
            args.model, args.resolution = args.model or "mid-sd15", args.resolution or 64
            args.iterations = args.iterations or 2
            results = {}
            for variant in ("flat", "bucketed"):
                mp.spawn(averager_worker, args=(2, _free_port(), args, out, variant), nprocs=2, join=True)
                results[variant] = [json.loads(Path(out, f"{variant}_rank{r}.json").read_text()) for r in range(2)]
            first = results["flat"][0]
            print(f"{args.model} at {args.resolution} px, full fake score ({first['fake_score_mib']:.0f} MiB fp32 of "
                  f"{first['trained_mib']:.0f} MiB trained), 2 gloo processes, {args.iterations} iterations")
            for variant, label in (("flat", "before (one flat copy)"), ("bucketed", "today (25 MiB buckets)")):
                for rank, r in enumerate(results[variant]):
                    print(f"{label:24s} rank {rank}: peak RSS {r['peak_mib']:7.0f} MiB, "
                          f"growth over set-up {r['peak_mib'] - r['setup_rss_mib']:6.0f} MiB")
            for rank in range(2):
                saved = results["flat"][rank]["peak_mib"] - results["bucketed"][rank]["peak_mib"]
                print(f"rank {rank}: peak lower by {saved:.0f} MiB today "
                      f"({saved / results['flat'][rank]['trained_mib']:.2f} x the trained parameters' size)")


if __name__ == "__main__":
    main()
