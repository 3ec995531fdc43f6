"""Expert-parallel MoE forward: route locally, all-to-all the token copies to the rank that owns their
expert, run every local expert as one grouped GEMM, all-to-all the results back, weight and sum.

Names used throughout: T tokens on this rank, k = top_k, E experts, P = expert-parallel degree,
L = E / P experts per rank, H hidden size, I expert intermediate size. A *row* is one (token, expert)
copy, so a rank sends T·k rows and receives R rows.

Why this shape: each rank keeps its own tokens (attention is never repeated), and only the rows that
need a remote expert cross the network. The per-layer cost on the host is one `.tolist()` of the
split sizes, because `all_to_all_single` takes host split sizes; everything else stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def route(gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own router (softmax, top-k, renormalised when norm_topk_prob): scores and expert ids [T, k].

    Calling the HF router module (not a copy of its math) keeps routing bit-identical to `single`
    and keeps transformers' output recorders (router_logits) working.
    """
    outputs = gate(x)
    return outputs[-2], outputs[-1]


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the T·k rows sorted by expert (stable), and the number of rows per expert [E].

    Sorting by global expert id also sorts by destination rank, since rank p owns experts
    [p·L, (p+1)·L). Counts come from a scatter-add, not bincount, which would sync with the host.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _Permute(torch.autograd.Function):
    """rows[perm] whose backward is a gather by the inverse permutation.

    Why not plain index_select: its backward is an atomic index_add_ into a zeroed buffer, which on
    an H200 cost 10% of an 8-layer Qwen3-30B step; a permutation's gradient is just another gather.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _CopyTokens(torch.autograd.Function):
    """Row j = token order[j] // k: each token copied once per chosen expert, in expert order.

    The backward sums each token's k copies by unsorting the rows (a gather) and reducing a
    [T, k, H] view, instead of index_select's atomic scatter-add.
    """

    @staticmethod
    def forward(
        ctx, tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return tokens.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        unsorted = grad.index_select(0, inverse)
        return unsorted.view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


def permute_rows(rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """rows[perm] with a gather (not scatter-add) backward; pass `inverse` when it is already known."""
    return _Permute.apply(rows, perm, inverse_permutation(perm) if inverse is None else inverse)


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


def expert_major_index(recv_counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Gather index turning rank-major received rows into expert-major rows.

    `all_to_all_single` delivers rows grouped by source rank, each source's block sorted by local
    expert: segments (q, l) in order q·L + l. The grouped GEMM needs one contiguous group per local
    expert: segments in order l·P + q. Row j of expert-major order is row index[j] of rank-major.
    Pure device arithmetic on [P, L] counts, no sort and no host sync.
    """
    num_sources, num_local = recv_counts.shape
    device = recv_counts.device
    rank_major_starts = _exclusive_cumsum(recv_counts.reshape(-1)).view(num_sources, num_local)
    counts_expert_major = recv_counts.t().reshape(-1)
    starts_in_source = rank_major_starts.t().reshape(-1)
    segment = torch.repeat_interleave(
        torch.arange(num_local * num_sources, device=device), counts_expert_major, output_size=num_rows
    )
    offset_in_segment = (
        torch.arange(num_rows, device=device) - _exclusive_cumsum(counts_expert_major)[segment]
    )
    return starts_in_source[segment] + offset_in_segment


def uses_grouped_kernel(x: torch.Tensor) -> bool:
    """CUDA bf16 runs torch's grouped GEMM; anything else (the CPU, fp32) the per-expert fallback."""
    return x.is_cuda and x.dtype == torch.bfloat16


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, rows_per_group: list[int], offsets: torch.Tensor | None
) -> torch.Tensor:
    """x [R, K] sorted into len(weight) contiguous groups; group g is multiplied by weight[g].T ([N, K]).

    On CUDA (bf16) one grouped GEMM with int32 cumulative `offsets`: bf16 needs no per-group padding,
    only 16-byte aligned strides (K and N multiples of 8) and base pointers, which
    freshly allocated contiguous buffers have. Elsewhere a loop over the L local experts, which is
    correct everywhere and cheap on the CPU.
    """
    if offsets is not None and uses_grouped_kernel(x):
        return grouped_mm_kernel(x, weight, offsets)
    chunks = x.split(rows_per_group)
    return torch.cat([chunk @ weight[group].t() for group, chunk in enumerate(chunks)])


def grouped_mm_kernel(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM: x [R, K] row-major, weight [G, N, K] seen as column-major [G, K, N]."""
    return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


class GroupedExperts(nn.Module):
    """This rank's experts: HF's parameter names and layout (gate_up_proj [L, 2I, H], down_proj [L, H, I]).

    A module of its own so that FSDP can wrap the experts separately from the dense layer (they are
    sharded over a different mesh axis), and so that the state dict keys stay transformers' keys.
    """

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(
        self, rows: torch.Tensor, rows_per_expert: list[int], offsets: torch.Tensor | None
    ) -> torch.Tensor:
        if rows.shape[0] == 0:
            # No rows came here this step. Keep the weights in the graph so that they still get a
            # (zero) gradient: weight decay then matches `single`, and FSDP's reduce still runs.
            # Keep `rows` in the graph too, or this rank would skip the all-to-all's backward that
            # every other EP rank enters.
            anchor = self.gate_up_proj.sum() + self.down_proj.sum()
            return rows * 0 + 0 * anchor
        gate, up = grouped_linear(rows, self.gate_up_proj, rows_per_expert, offsets).chunk(2, dim=-1)
        return grouped_linear(self.act_fn(gate) * up, self.down_proj, rows_per_expert, offsets)


@dataclass
class DispatchPlan:
    """Split sizes of one layer's exchange: host lists for the collectives, device counts for the GEMM."""

    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    rows_per_local_expert: list[int]
    recv_counts: torch.Tensor  # [P, L]: rows from source rank q for local expert l

    @property
    def num_recv_rows(self) -> int:
        return sum(self.recv_splits)


@torch.compiler.disable  # host sync + collective: compiled layers run it eagerly (a graph break)
def plan_dispatch(counts: torch.Tensor, num_ranks: int, group: dist.ProcessGroup | None) -> DispatchPlan:
    """Exchange per-expert row counts and bring the split sizes to the host (one sync per layer)."""
    send_counts = counts.view(num_ranks, -1)
    if group is None:
        recv_counts = send_counts
    else:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
    host = torch.cat([send_counts.sum(1), recv_counts.reshape(-1)]).tolist()
    send_splits, recv_matrix = host[:num_ranks], host[num_ranks:]
    num_local = send_counts.shape[1]
    per_source = [recv_matrix[q * num_local : (q + 1) * num_local] for q in range(num_ranks)]
    return DispatchPlan(
        send_splits=send_splits,
        recv_splits=[sum(row) for row in per_source],
        rows_per_local_expert=[sum(column) for column in zip(*per_source, strict=True)],
        recv_counts=recv_counts,
    )


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the inverse all-to-all (split sizes swapped).

    A plain c10d call: on NCCL it is queued on the communicator's stream and the compute stream
    waits for it on the device, so the host does not block.
    """

    @staticmethod
    def forward(ctx, rows, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = rows.new_empty((sum(out_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


@torch.compiler.disable  # a collective with host split sizes: kept out of compiled graphs
def exchange(
    rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-to-all with autograd (identity without a group): `out_splits[q]` rows come from rank q."""
    if group is None:
        return rows
    return _AllToAll.apply(rows, out_splits, in_splits, group)


class ExpertParallelMoE(nn.Module):
    """Drop-in for transformers' Qwen3MoeSparseMoeBlock: same `gate` and `experts` children and keys.

    Each rank routes its own tokens, sends each row to the rank owning its expert, runs its L local
    experts as one grouped GEMM and sends the outputs back, where they are weighted by the router
    scores and summed over the k copies of each token (a deterministic gather + sum rather than an
    atomic index_add_).
    """

    def __init__(
        self,
        gate: nn.Module,
        experts: GroupedExperts,
        num_experts: int,
        ep_group: dist.ProcessGroup | None,
        ep_size: int,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = ep_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores, expert_ids = route(self.gate, x)
        num_tokens, top_k = expert_ids.shape
        order, counts = sort_by_expert(expert_ids, self.num_experts)
        unorder = inverse_permutation(order)
        plan = plan_dispatch(counts, self.ep_size, self.ep_group)

        rows = _CopyTokens.apply(x, order, unorder, top_k)
        rows = exchange(rows, plan.recv_splits, plan.send_splits, self.ep_group)
        to_expert_major = None
        if self.ep_size > 1 and plan.recv_counts.shape[1] > 1:
            to_expert_major = expert_major_index(plan.recv_counts, plan.num_recv_rows)
            to_rank_major = inverse_permutation(to_expert_major)
            rows = permute_rows(rows, to_expert_major, to_rank_major)
        offsets = None
        if uses_grouped_kernel(rows):
            offsets = torch.cumsum(plan.recv_counts.sum(0), 0, dtype=torch.int32)
        out_rows = self.experts(rows, plan.rows_per_local_expert, offsets)
        if to_expert_major is not None:
            out_rows = permute_rows(out_rows, to_rank_major, to_expert_major)
        out_rows = exchange(out_rows, plan.send_splits, plan.recv_splits, self.ep_group)

        per_copy = permute_rows(out_rows, unorder, order).view(num_tokens, top_k, -1)
        out = (per_copy * scores.unsqueeze(-1).to(per_copy.dtype)).sum(dim=1)
        return out.to(hidden_states.dtype).reshape(shape)
