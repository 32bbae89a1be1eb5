"""The regression warm start's pair pool: teacher samples made once and reused.

Fresh pairs (``regression_pairs`` 0) run the teacher's ``regression_teacher_steps`` DDIM steps
for every sample of every warm-start iteration and use each pair once. The reference instead
builds a pool once (10,000 noise/image pairs) and regresses onto random pairs of it, each seen
about 50 times. ``build_pool`` makes that pool: noise ``z_i`` and a prompt index ``p_i`` drawn
from the run's seed (their own stream, so a build stopped half way continues with the same
pairs), and ``target_i`` = the teacher's DDIM sample from ``z_i`` under prompt ``p_i`` (the
formula of the fresh pairs, in batches of ``batch_size``). ``save_pool``/``load_pool`` keep it
as safetensors with the settings that define it in the metadata (never a pickle); the run
folder caches it (``run.TrainingRun.prepare_pool``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import sampling
from .config import ConfigError

POOL_FILE = "regression_pool.safetensors"
METADATA_KEY = "dmd2_regression_pool"
DTYPES = {"noise": torch.float32, "target": torch.float32, "prompt_index": torch.int64}


class PoolError(ConfigError):
    """A pool file that cannot be used as it is (damaged, not a pool)."""


@dataclass
class RegressionPool:
    """``noise``/``target`` (n, C, H, W) float32 and ``prompt_index`` (n,) int64 on the CPU,
    the first ``n`` of the ``settings["regression_pairs"]`` pairs (n is less while building)."""

    noise: torch.Tensor
    target: torch.Tensor
    prompt_index: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def size(self) -> int:
        return int(self.settings["regression_pairs"])

    @property
    def complete(self) -> bool:
        return len(self) >= self.size


def teacher_forwards_per_pair(config) -> int:
    """UNet forwards one pair costs: the teacher's DDIM steps, doubled by the unconditional
    pass of the guidance (``real_x0`` skips it at guidance 1)."""
    return config.regression_teacher_steps * (1 if config.real_guidance_scale == 1.0 else 2)


def warm_start_forwards(config, world_size: int = 1) -> dict[str, int]:
    """Teacher UNet forwards (per process) the warm start spends: ``fresh`` with a new pair
    per sample and iteration, ``pool`` for a pool of ``regression_pairs`` (0 when off), whose
    build ``world_size`` processes share (``build_pool``: every world_size-th batch each)."""
    per_pair = teacher_forwards_per_pair(config)
    share = -(-config.regression_pairs // (world_size * config.batch_size)) * config.batch_size  # rounds x batch
    return {"fresh": config.regression_steps * config.samples_per_iteration * per_pair,
            "pool": min(share, config.regression_pairs) * per_pair if config.regression_steps else 0}


def pool_settings(config, family, latent_shape, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What defines a pool: its size, the teacher's sampler and guidance, the seed its draws
    come from, the base's sampling and the latent shape, plus ``identity`` (the data
    fingerprints and the checkpoint's hash: another teacher or other prompts, other pairs)."""
    return {"regression_pairs": config.regression_pairs, "regression_teacher_steps": config.regression_teacher_steps,
            "real_guidance_scale": config.real_guidance_scale, "uncond": config.uncond, "seed": config.seed,
            "sampling": family.sampling_label, "latent_shape": [int(v) for v in latent_shape], **dict(identity or {})}


def pool_inputs(settings: Mapping[str, Any], prompt_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All the pool's noise and prompt indices, drawn from its seed on their own generator
    (the trainer's and the data's streams are left alone: fresh-pair runs are unchanged)."""
    n, shape = int(settings["regression_pairs"]), tuple(settings["latent_shape"])
    gen = torch.Generator().manual_seed(int(settings["seed"]) * 1000 + 29)
    prompt_index = torch.randint(0, prompt_count, (n,), generator=gen)
    return torch.randn((n, *shape), generator=gen), prompt_index


def build_pool(config, backend, settings: Mapping[str, Any] | None = None, start: RegressionPool | None = None,
               progress: Callable[[int, int], None] | None = None, save: Callable[[RegressionPool], None] | None = None,
               save_every: int = 0, stop: Callable[[], Any] = lambda: None,
               inputs: tuple[torch.Tensor, torch.Tensor] | None = None, rank: int = 0, world_size: int = 1,
               gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> RegressionPool:
    """The pool of ``config.regression_pairs`` pairs on ``backend``'s teacher (its ``real_x0``
    with the run's guidance), continuing ``start`` (the pairs a stopped build kept).
    ``progress(done, total)`` before the first batch and after each; ``save(pool)`` every ``save_every`` batches
    and when ``stop()`` returns a reason, which ends the build early: the returned pool is
    then not ``complete``. ``inputs``: ``pool_inputs`` already drawn (a caller that checked a
    saved pool against them: an SDXL pool's noise is 2.6 GB at 10,000 pairs, drawn once).
    Several processes (``world_size``) share the build: in each round, process ``rank`` makes
    the ``rank``-th of ``world_size`` consecutive batches and ``gather(target)`` returns every
    process's, in rank order; the pool is the same as one process makes, batch for batch."""
    settings = dict(settings or pool_settings(config, backend.family, backend.prompt_batch([0]).shape[1:]))
    noise, prompt_index = inputs if inputs is not None else pool_inputs(settings, backend.prompt_count)
    targets = [start.target] if start is not None and len(start) else []
    done = len(start) if start is not None else 0
    teacher_steps = backend.family.trailing_timesteps(config.regression_teacher_steps)
    device, batches = torch.device(backend.device), 0

    if progress is not None:
        progress(done, len(noise))

    def pool() -> RegressionPool:
        target = torch.cat(targets) if targets else noise[:0].clone()
        return RegressionPool(noise[:len(target)], target, prompt_index[:len(target)], settings)

    def make(rows: slice) -> torch.Tensor:
        if rows.start >= rows.stop:  # this process's share of the last round is empty
            return noise[:0].clone()
        batch = backend.prompt_batch(prompt_index[rows].tolist())
        with torch.no_grad():
            target = sampling.ddim_sample(
                lambda x, t: backend.real_x0(x, t, batch.cond, batch.uncond, config.real_guidance_scale),
                noise[rows].to(device), teacher_steps, backend.family,
            )
        return target.float().cpu()

    while done < len(noise):
        start_row = min(done + rank * config.batch_size, len(noise))
        target = make(slice(start_row, min(start_row + config.batch_size, len(noise))))
        targets.extend(part for part in (gather(target) if world_size > 1 else [target]) if len(part))
        done, batches = min(done + world_size * config.batch_size, len(noise)), batches + 1
        if progress is not None:
            progress(done, len(noise))
        if done < len(noise):
            stopping = stop() is not None
            if save is not None and (stopping or (save_every and batches % save_every == 0)):
                save(pool())
            if stopping:
                break
    return pool()


def save_pool(pool: RegressionPool, path: str | Path) -> Path:
    """The pool (complete or partial) as safetensors, written atomically, its settings as
    JSON in the metadata."""
    from .lora import save_safetensors_atomic

    tensors = {"noise": pool.noise, "target": pool.target, "prompt_index": pool.prompt_index}
    return save_safetensors_atomic({k: v.contiguous() for k, v in tensors.items()}, path,
                                   {METADATA_KEY: json.dumps(pool.settings, sort_keys=True)})


def load_pool(path: str | Path, settings: Mapping[str, Any], prompt_count: int,
              inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[RegressionPool | None, str]:
    """The pool in ``path`` if it was built with ``settings`` (possibly partial), else
    (None, why it cannot serve: the first setting that differs). A file that is no pool,
    or whose tensors do not fit its settings, raises ``PoolError`` in one line. ``inputs``:
    ``pool_inputs(settings, prompt_count)`` if the caller has drawn them already."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = "delete it to build the pool again"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (a handle, not a dict)
        saved = json.loads(metadata[METADATA_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise PoolError(f"{path} is not a readable regression pool ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(saved, dict):
        raise PoolError(f"{path}: its {METADATA_KEY} metadata is not a table of settings; {fix}")
    wanted = json.loads(json.dumps(dict(settings)))
    for key, value in wanted.items():
        if saved.get(key) != value:
            return None, f"its {key} is {saved.get(key)!r}, the run's {value!r}"
    if set(tensors) != set(DTYPES):
        raise PoolError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(DTYPES)}; {fix}")
    for key, dtype in DTYPES.items():
        if tensors[key].dtype != dtype:
            raise PoolError(f"{path}: {key} is {tensors[key].dtype}, expected {dtype}; {fix}")
    n, shape = len(tensors["target"]), tuple(wanted["latent_shape"])
    if (tuple(tensors["noise"].shape) != (n, *shape) or tuple(tensors["target"].shape) != (n, *shape)
            or tuple(tensors["prompt_index"].shape) != (n,) or n > int(wanted["regression_pairs"])):
        raise PoolError(f"{path}: its tensors' shapes {[tuple(t.shape) for t in tensors.values()]} do not fit its "
                        f"{wanted['regression_pairs']} pairs of {shape}; {fix}")
    noise, prompt_index = inputs if inputs is not None else pool_inputs(wanted, prompt_count)
    if not (torch.equal(tensors["noise"], noise[:n]) and torch.equal(tensors["prompt_index"], prompt_index[:n])):
        return None, "its noise or prompts are not those its seed draws here (another torch version?)"
    if not torch.isfinite(tensors["target"]).all():
        raise PoolError(f"{path}: its targets hold inf or NaN; {fix}")
    return RegressionPool(tensors["noise"], tensors["target"], tensors["prompt_index"], dict(saved)), ""
