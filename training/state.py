"""Copying saved tensors into live ones, checked first (checkpoints, adapters, model files).

A saved state comes from a file, so it is validated before anything is touched: the key set
must equal the live one and every shape must match; otherwise nothing is copied and the error
names what differs. A live tensor sharded across processes (a DTensor) takes its own rows of
the saved whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def copy_checked(
    own: Mapping[str, torch.Tensor],
    saved: Mapping[str, torch.Tensor],
    what: str,
    error: type[Exception] = ValueError,
) -> None:
    """Copy ``saved[key]`` into ``own[key]`` for every key, after checking keys and shapes.
    ``what`` opens the error message (e.g. "saved tensors do not match this trainer")."""
    if set(saved) != set(own):
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise error(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in own.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise error(f"{what}: {key} has shape {tuple(saved[key].shape)}, expected {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(_as_laid_out(saved[key], value))


def _as_laid_out(source: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``source`` as ``like`` holds it: a tensor sharded across processes (a DTensor,
    ``training.shard``) takes this process's rows of the saved whole, with no collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return source
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return source
    return distribute_tensor(source.to(like.to_local().device), like.device_mesh, like.placements, src_data_rank=None)
