"""A full fake score sharded across processes (FSDP2, ``torch.distributed.fsdp.fully_shard``).

A full fp32 fake score costs 16 bytes per UNet parameter with its gradients and AdamW state
(about 41 GB for SDXL): more than a 24 GB card holds whole. Sharded over N processes each
holds 1/N of its weights, gradients and optimiser state and gathers one block at a time
for the forward and backward passes (``shard_units``); its gradients are reduce-scattered
by FSDP2 itself (averaged, as ``run.GradientAverager`` does for the replicated adapters and
the GAN head). The rest of this module is what the run needs around sharded (DTensor)
parameters: clipping their norm with plain ones, checkpoints (full tensors gathered for
``tensors.safetensors``, each process's optimiser shard in its own state file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def is_sharded(tensor: Any) -> bool:
    """A DTensor: this process holds some of its rows (never where torch has no distributed)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_units(unet: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 gathers one at a time, nested ones first (``fully_shard`` needs them
    before their parents): every transformer block, every res block, then each spatial
    transformer's own layers (projections, norm). The UNet's remaining layers (embeddings,
    first and last convolutions) form the root unit."""
    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    return [m for kind in (BasicTransformerBlock, ResBlock, SpatialTransformer) for m in unet.modules() if isinstance(m, kind)]


def device_mesh(dist, device: str | torch.device):
    """The 1-D mesh of all processes on ``device``, over the group that has a backend for it
    (``run.Dist.group_for``: the default group, or the gloo group beside an NCCL-only one)."""
    from torch.distributed.device_mesh import DeviceMesh

    device = torch.device(device)
    group = dist.group_for(torch.empty(0, device=device)) or torch.distributed.group.WORLD
    return DeviceMesh.from_group(group, device.type)


def shard_module(module: nn.Module, mesh) -> int:
    """Shard ``module``'s parameters over ``mesh`` in place (each becomes a DTensor holding this
    process's rows), unit by unit (``shard_units``), in fp32: the fp32 pass of the DM loss
    and the weights AdamW updates are the unsharded run's. Returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    units = shard_units(module)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return len(units) + 1


def unit_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of the largest unit's own parameters, bytes of the root unit's) of a module
    ``shard_module`` would shard (what one gather holds; ``memory.estimate`` uses it)."""
    units = shard_units(module)
    owned: set[int] = set()
    sizes = []
    for unit in units:  # nested units first: each unit owns what no unit before it took
        params = [p for p in unit.parameters() if id(p) not in owned]
        owned |= {id(p) for p in params}
        sizes.append(sum(p.numel() * p.element_size() for p in params))
    root = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in owned)
    return max(sizes, default=0), root


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over sharded and plain (replicated) parameters
    together: the norm of all the gradients as if unsharded, every gradient scaled by the
    same factor."""
    params = list(params)
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    plain = [p for p in params if not is_sharded(p)]
    norms = []
    for group in (sharded, plain):
        grads = [p.grad for p in group if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(norm.full_tensor() if is_sharded(norm) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


def gathered(tensors: Mapping[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """``tensors`` whole, as fp32 CPU tensors: sharded ones gathered one at a time (every
    process must call this, in the same order); only where ``keep`` (rank 0, which writes the
    file) are they kept, so no other process holds a full copy."""
    out = {}
    for key, value in tensors.items():
        value = value.detach()
        if is_sharded(value):
            value = value.full_tensor()
        if keep:
            out[key] = value.float().cpu().contiguous()
    return out


def local(state: Any) -> Any:
    """A state (nested dicts, lists) with each DTensor replaced by this process's shard, a
    plain tensor: what a state file holds (``restore_optimizer_state`` makes them DTensors)."""
    if is_sharded(state):
        return state.to_local()
    if isinstance(state, dict):
        return {k: local(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local(v) for v in state)
    return state


def restore_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """``state`` (an optimiser state dict saved through ``local``) with the shards of sharded
    parameters made DTensors again, laid out as those parameters (same processes, same
    rows), ready for ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        return state
    entries = dict(state["state"])
    for index, entry in entries.items():
        p = params[int(index)] if int(index) < len(params) else None
        if p is None or not is_sharded(p):
            continue
        entries[index] = {
            k: DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in entry.items()
        }
    return {**state, "state": entries}
