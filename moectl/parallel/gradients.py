"""The global L2 norm of gradients however they are laid out, and clipping by it.

A plain gradient is taken to be the same on every rank (replicated: single, DDP after its all-reduce,
tp's replicated embedding and norms), so it counts once. A DTensor gradient states its layout: its
local piece's squares are summed over the mesh dimensions it is sharded on, and counted once over
those it is replicated on. Strategies that keep *plain* local shards (ep's experts) add the squares of
those over their own group (`Strategy.grad_norm`).

Why by hand rather than `torch.nn.utils.get_total_norm` on DTensors: the model mixes plain tensors and
DTensors on different meshes (tp: replicated plain router and embedding; mixed: 1-D and 2-D meshes),
which one foreach call does not take, and bf16 gradients would give a bf16 norm; here every piece is
squared and summed in fp32 with torch's foreach norm, one reduction per distinct layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial


def _local_sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    try:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):  # a build without the fp32-output kernel
        norms = [torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]
    return torch.stack(norms).square().sum()


def grad_sum_of_squares(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """Σ g² over the gradients of `params` (missing gradients count as zero), fp32, the same on every
    rank for replicated and DTensor gradients; a plain gradient contributes this rank's values."""
    plain: list[torch.Tensor] = []
    by_layout: dict[tuple, list[torch.Tensor]] = {}
    device = None
    for param in params:
        grad = param.grad
        device = device or param.device
        if grad is None:
            continue
        if not isinstance(grad, DTensor):
            plain.append(grad)
            continue
        if any(isinstance(placement, Partial) for placement in grad.placements):
            grad = grad.redistribute(placements=param.placements)  # a sum of pieces, not pieces
        # Every placement but Replicate splits the tensor (Shard, and FSDP's _StridedShard over tp shards,
        # which is not a Shard subclass): its pieces' squares add up over that mesh dimension.
        sharded_dims = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
        by_layout.setdefault((grad.device_mesh, sharded_dims), []).append(grad.to_local())
    total = torch.zeros((), dtype=torch.float32, device=device)
    if plain:
        total = total + _local_sum_of_squares(plain)
    for (mesh, sharded_dims), locals_ in by_layout.items():
        squares = _local_sum_of_squares(locals_)
        for dim in sharded_dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total = total + squares
    return total


def clip_gradients_(params: Iterable[nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale every gradient by max_norm / (total_norm + 1e-6), torch's clip_grad_norm_ factor, on
    each rank's local pieces (a scale needs no communication)."""
    grads = [
        p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None
    ]
    if grads:
        torch._foreach_mul_(grads, max_norm / (total_norm + 1e-6))
