"""Expert-parallel MoE forward: route locally, send each token once to every rank that holds one of its
chosen experts (with its choices there and their router weights), run the local experts as one grouped
GEMM, weight and sum a token's expert outputs on the expert's rank, and send one row per (token, rank)
back, where the ranks' partial sums add up.

Names: T tokens on this rank, k = top_k, E experts, P = EP degree, L = E / P local experts, H hidden
size, I expert width. A *row* is one (token, destination rank) copy: a rank sends S rows and receives
R. A *pair* is one (token, chosen expert): a rank computes N pairs. A *slot* is one of a row's k
choices, empty where that choice lives on another rank.

Why once per rank, not once per choice: a top-8 token of Qwen3-30B-A3B needs on average 1.99 / 3.63 /
5.34 of 2 / 4 / 8 ranks, so every exchange carries 75 / 55 / 33 % fewer bytes. The price: a row's k
local expert ids and weights travel with it (8 bytes per choice beside 2·H bytes of activations), and
the weighting moves to the expert's rank, where the pairs of a row are reduced before the return trip.

Chunks (`parallel.ep_chunks`): the tokens split into C contiguous chunks whose exchanges are issued
asynchronously, so that chunk c+1's rows travel while chunk c's experts compute, and chunk c's results
travel back while chunk c+1's compute (and in backward, mirrored). Work handles and their waits place
the overlap; nothing inside the pipeline syncs with the host.

Host syncs: one per layer at P > 1 (all_to_all_single takes host split sizes; the counts of every
chunk are exchanged at once, before any token moves); none at P = 1 on the grouped-GEMM path, whose
group offsets stay on the device.

Gathers, never scatter-adds: every reduction here (a token's rows, a row's pairs) sums one gather per
slot, whose backward is another gather: deterministic, and on an H200 the atomic index_add_ it replaces
cost 10 % of a step. Compiled (`train.compile`), the gathers and their sum fuse into one elementwise
kernel, as do the grouped GEMMs' activation and the weighting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moectl.model.fp8 import grouped_mm_fp8
from moectl.model.precision import compute_dtype
from moectl.parallel.ep_recompute import Tape, TapeDeck
from moectl.run.faults import ExpertOverload


def route(gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own router (softmax, top-k, renormalised when norm_topk_prob): scores and expert ids [T, k].

    Calling the HF router module (not a copy of its math) keeps routing bit-identical to `single`
    and keeps transformers' output recorders (router_logits) working.
    """
    outputs = gate(x)
    return outputs[-2], outputs[-1]


# ---- grouped GEMM -------------------------------------------------------------------------------------
#: FP8 grouped GEMMs take groups that start at multiples of this many rows (16 bytes of FP8).
FP8_GROUP_ALIGNMENT = 16


def uses_grouped_kernel(x: torch.Tensor) -> bool:
    """CUDA bf16 runs torch's grouped GEMM; anything else (the CPU, fp32) the per-expert fallback."""
    return x.is_cuda and x.dtype == torch.bfloat16


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows_per_group: list[int] | None,
    offsets: torch.Tensor | None,
    fp8: bool = False,
) -> torch.Tensor:
    """x [R, K] sorted into len(weight) contiguous groups; group g is multiplied by weight[g].T ([N, K]).

    Without host group sizes (`rows_per_group` None): one grouped GEMM with int32 cumulative `offsets`,
    which bf16 runs without per-group padding given 16-byte aligned strides (K and N multiples of 8) and
    base pointers, which freshly allocated contiguous buffers have; `fp8`: torchao's rowwise-scaled FP8
    grouped GEMM, whose groups must start at multiples of 16 rows (`align_groups`). With host sizes: a
    loop over the groups, correct everywhere and cheap on the CPU.
    """
    if rows_per_group is None:
        if fp8:
            return grouped_mm_fp8(x, weight, offsets)
        return grouped_mm_kernel(x, weight, offsets)
    chunks = x.split(rows_per_group)
    return torch.cat([chunk @ weight[group].t() for group, chunk in enumerate(chunks)])


def grouped_mm_kernel(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM: x [R, K] row-major, weight [G, N, K] seen as column-major [G, K, N]."""
    return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


# ---- gathers and slot sums ----------------------------------------------------------------------------
def sum_gathered(
    source: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """out[r] = Σ_j source[slots[r, j]] (· weights[r, j]), accumulated in fp32 at least, in source's dtype.

    One gather per slot, summed as they come: compiled, one elementwise kernel that reads each row it
    needs once per slot. The sum over a gathered [rows, slots, H] view it replaces compiles into a
    reduction over the slot dim, which an H200 ran at a fifth of its memory bandwidth.
    """
    accumulate = torch.promote_types(source.dtype, torch.float32)
    total = None
    for slot in range(slots.shape[1]):
        term = source.index_select(0, slots[:, slot]).to(accumulate)
        if weights is not None:
            term = term * weights[:, slot : slot + 1].to(accumulate)
        total = term if total is None else total + term
    return total.to(source.dtype)


def sum_slots(source: torch.Tensor, slots: torch.Tensor, source_has_zero_row: bool) -> torch.Tensor:
    """out[r] = Σ_j source[slots[r, j]], where an empty slot points at a zero row one past the end of
    `source` (added here unless the source already ends with one)."""
    if not source_has_zero_row:
        source = torch.cat([source, source.new_zeros(1, source.shape[-1])])
    return sum_gathered(source, slots)


class GatherRows(torch.autograd.Function):
    """out[i] = rows[index[i]] (one row copied into several places); the backward sums the copies of
    each row, which `slots` [rows, m] lists (len(out) where a row has fewer than m copies). With `gaps`,
    index len(rows) stands for a zero row (the padding between aligned groups)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, slots: torch.Tensor, gaps: bool = False):
        ctx.save_for_backward(slots)
        if gaps:
            rows = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slots,) = ctx.saved_tensors
        return sum_slots(grad, slots, source_has_zero_row=False), None, None, None


class SumSlots(torch.autograd.Function):
    """out[r] = Σ_j source[slots[r, j]] over the slots that exist; the backward gathers by `index`
    (source row i belongs to output row index[i]). With `source_has_zero_row` the source's last row is
    the zero row of the empty slots (a receive buffer allocated one row longer, sparing a copy)."""

    @staticmethod
    def forward(ctx, source, slots, index, source_has_zero_row: bool) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.source_has_zero_row = source_has_zero_row
        return sum_slots(source, slots, source_has_zero_row)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_source = grad.index_select(0, index)
        if ctx.source_has_zero_row:
            grad_source = torch.cat([grad_source, grad_source.new_zeros(1, grad_source.shape[-1])])
        return grad_source, None, None, None


class WeightedSumSlots(torch.autograd.Function):
    """The combine on the expert's rank: out[r] = Σ_j weight[r, j] · pairs[slots[r, j]] over a row's
    choices that live here (the others have weight 0). Backward: gathers again, and each weight's gradient
    is the dot product of its pair's output with the row's gradient.

    Saves the pairs (N·H), as autograd would for the weighted sum; the [R, k, H] gather is transient.
    With `gaps`, pairs whose row is len(grad) and whose choice is weights.numel() are padding: they get
    a zero gradient and give none.
    """

    @staticmethod
    def forward(ctx, pairs, weights, slots, pair_row, pair_choice, gaps: bool = False) -> torch.Tensor:
        ctx.save_for_backward(pairs, weights, pair_row, pair_choice)
        ctx.gaps = gaps
        present = slots.clamp(max=pairs.shape[0] - 1)  # an empty slot reads any pair, weighted by 0
        return sum_gathered(pairs, present, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pairs, weights, pair_row, pair_choice = ctx.saved_tensors
        flat_weights = weights.reshape(-1)
        if ctx.gaps:
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[-1])])
            flat_weights = torch.cat([flat_weights, flat_weights.new_zeros(1)])
        grad_per_pair = grad.index_select(0, pair_row)
        pair_weights = flat_weights.index_select(0, pair_choice).to(grad.dtype)
        grad_pairs = grad_per_pair * pair_weights.unsqueeze(-1)
        grad_pair_weights = (grad_per_pair * pairs).sum(-1).to(weights.dtype)
        grad_weights = flat_weights.new_zeros(flat_weights.numel()).index_copy(
            0, pair_choice, grad_pair_weights
        )
        return grad_pairs, grad_weights[: weights.numel()].view_as(weights), None, None, None, None


@dataclass
class PairIndex:
    """Where the choices of a block of rows sit once sorted by local expert (N pairs, expert-major)."""

    pair_row: torch.Tensor  # [N] the row of each pair
    pair_choice: torch.Tensor  # [N] its flat choice index, row·k + j
    slots: torch.Tensor  # [R, k] the pair of each choice; N where that choice lives on another rank


def pair_index(local_ids: torch.Tensor, num_local: int, num_pairs: int) -> PairIndex:
    """Sort a block's choices by local expert (-1: not here), stably, so a group keeps row order.

    Pure device arithmetic: `num_pairs` (host) is known from the count exchange.
    """
    num_rows, top_k = local_ids.shape
    present = local_ids >= 0
    key = torch.where(present, local_ids, num_local).reshape(-1)
    order = torch.argsort(key, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    chosen = order[:num_pairs]
    slots = torch.where(present, position.view(num_rows, top_k), num_pairs)
    return PairIndex(pair_row=chosen // top_k, pair_choice=chosen, slots=slots)


def align_groups(index: PairIndex, offsets: torch.Tensor, alignment: int) -> tuple[PairIndex, torch.Tensor]:
    """The same pairs with every group starting at a multiple of `alignment` rows (FP8 grouped GEMMs
    need 16: the weight gradient's groups are its inner dimension). Group g moves down by the gaps before
    it; a gap is a zero row (row index R, choice index R·k: see GatherRows and WeightedSumSlots), and the
    last group runs to the end of a buffer of a size known on the host: N + (alignment − 1)·G, rounded up.

    Returns the padded index and the padded groups' int32 cumulative ends.
    """
    num_rows, top_k = index.slots.shape
    num_pairs, num_groups = index.pair_row.numel(), offsets.numel()
    num_padded = -(-(num_pairs + (alignment - 1) * num_groups) // alignment) * alignment
    ends = offsets.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    aligned_ends = torch.cumsum((counts + alignment - 1) // alignment * alignment, 0)
    shift = aligned_ends - ends  # where a group's pairs start minus where they started, for every group
    group_start_shift = torch.cat([shift.new_zeros(1), shift[:-1]])
    group = torch.searchsorted(ends, torch.arange(num_pairs, device=ends.device), right=True)
    moved = torch.arange(num_pairs, device=ends.device) + group_start_shift.index_select(0, group)
    pair_row = index.pair_row.new_full((num_padded,), num_rows).index_copy(0, moved, index.pair_row)
    pair_choice = index.pair_choice.new_full((num_padded,), num_rows * top_k)
    pair_choice = pair_choice.index_copy(0, moved, index.pair_choice)
    moved_or_empty = torch.cat([moved, moved.new_full((1,), num_padded)])
    slots = moved_or_empty.index_select(0, index.slots.reshape(-1)).view_as(index.slots)
    padded_ends = torch.cat([aligned_ends[:-1], aligned_ends.new_full((1,), num_padded)])
    return PairIndex(pair_row=pair_row, pair_choice=pair_choice, slots=slots), padded_ends.to(torch.int32)


def expert_rows(
    rows: torch.Tensor,
    weights: torch.Tensor,
    pair_row: torch.Tensor,
    pair_choice: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    pairs_per_expert: list[int] | None,
    fp8: bool = False,
    gaps: bool = False,
) -> torch.Tensor:
    """Rows [R, H] with their choices (a `PairIndex`, with zero rows between groups if `gaps`) → each
    row's weighted sum over the local experts it chose [R, H]. Tensors only, so that one compiled graph
    serves every layer."""
    pairs = GatherRows.apply(rows, pair_row, slots, gaps)
    gate, up = grouped_linear(pairs, gate_up_proj, pairs_per_expert, offsets, fp8).chunk(2, dim=-1)
    out = grouped_linear(act_fn(gate) * up, down_proj, pairs_per_expert, offsets, fp8)
    return WeightedSumSlots.apply(out, weights, slots, pair_row, pair_choice, gaps)


def gather_send_rows(x: torch.Tensor, send_token: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    return GatherRows.apply(x, send_token, token_slots)


def combine_rows(back: torch.Tensor, token_slots: torch.Tensor, send_token: torch.Tensor) -> torch.Tensor:
    return SumSlots.apply(back, token_slots, send_token, True)


@functools.cache
def _compiled(function: Callable) -> Callable:
    # dynamic: row counts change every step; one graph for every layer and step.
    return torch.compile(function, dynamic=True)


def tensor_function(function: Callable, compile_it: bool) -> Callable:
    return _compiled(function) if compile_it else function


def _plain_activation(act_fn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation as a module-free function (one compiled graph for all layers), if it is SiLU."""
    return F.silu if type(act_fn).__name__ in ("SiLU", "SiLUActivation") else None


# ---- statistics ---------------------------------------------------------------------------------------
@dataclass
class DispatchStats:
    """What this rank's dispatch sent, counted on the host from split sizes it already has."""

    bytes_sent: int = 0  # to other ranks, in the token exchanges (rows, their choices, gradients)
    collectives: int = 0  # collectives issued (count exchanges included)

    def take(self) -> dict[str, float]:
        """The figures since the last call (one optimizer step), then zero."""
        figures = {"a2a_bytes_per_step": float(self.bytes_sent)}
        self.bytes_sent = self.collectives = 0
        return figures


def _bytes_to_others(splits: list[int], own_rank: int, row_bytes: int) -> int:
    return row_bytes * (sum(splits) - splits[own_rank])


# ---- the exchange plan --------------------------------------------------------------------------------
@dataclass
class ChunkPlan:
    """One chunk's exchange: host split sizes for the collectives, device offsets for the grouped GEMM."""

    send_rows: tuple[int, int]  # [start, stop) of this chunk's rows in the layer's send buffer
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    pairs_per_local_expert: list[int]
    pair_offsets: torch.Tensor  # [L] int32, cumulative pairs per local expert

    @property
    def num_recv_rows(self) -> int:
        return sum(self.recv_splits)

    @property
    def num_recv_pairs(self) -> int:
        return sum(self.pairs_per_local_expert)


@dataclass
class LayerPlan:
    """One layer's dispatch: rows ordered by chunk, then destination rank, then token."""

    chunks: list[ChunkPlan]
    send_token: torch.Tensor  # [S] the token of each sent row
    token_slots: torch.Tensor  # [T, P] the row carrying token t to rank p; S where it does not go there
    send_ids: torch.Tensor  # [S, k] int32: each choice's local expert on the row's rank, -1 elsewhere
    send_present: torch.Tensor  # [S, k] bool: the choice lives on the row's rank
    num_send_rows: int


def chunk_bounds(num_tokens: int, num_chunks: int) -> list[tuple[int, int]]:
    """Contiguous token ranges, sizes differing by at most one (as torch.tensor_split)."""
    base, extra = divmod(num_tokens, num_chunks)
    bounds, start = [], 0
    for chunk in range(num_chunks):
        stop = start + base + (chunk < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass
class LoadLimit:
    """When a rank may not take the rows routed to it: past `factor` × its balanced share of (token,
    expert) pairs, or (factor None, CUDA) past what its free memory holds."""

    factor: float | None
    bytes_per_pair: int  # activations one received pair costs on the expert's rank
    bytes_per_row: int  # and one received row


# ---- the exchanges, as autograd nodes ----------------------------------------------------------------
class LayerRun:
    """One forward of one block: its plan, the exchanges in flight, and their backward counterparts.

    Replaying (the recompute of a checkpointed layer), nothing is sent: received tensors come from the
    tape the first forward recorded, and what nobody reads (the returned rows) is zeros.
    """

    def __init__(self, block: ExpertParallelMoE, plan: LayerPlan, tape: Tape | None, replaying: bool):
        self.plan, self.tape, self.replaying = plan, tape, replaying
        self.group, self.rank, self.stats = block.ep_group, block.ep_rank, block.stats
        num_chunks = len(plan.chunks)
        self._dispatch: list[tuple] = [()] * num_chunks
        self._returns: list[tuple] = [()] * num_chunks
        self._back: torch.Tensor | None = None
        self._grad_send: tuple[torch.Tensor, torch.Tensor] | None = None
        self._grad_dispatch: list[tuple] = []
        self._grad_returns: list[tuple] = [()] * num_chunks

    def _all_to_all(self, out, source, out_splits, in_splits, row_bytes: int):
        self.stats.collectives += 1
        self.stats.bytes_sent += _bytes_to_others(in_splits, self.rank, row_bytes)
        return dist.all_to_all_single(out, source, out_splits, in_splits, group=self.group, async_op=True)

    # forward
    def start_dispatch(self, send: torch.Tensor, send_weights: torch.Tensor) -> None:
        """Issue every chunk's two exchanges: its rows, and their choices (ids and weights, one int32
        tensor: the weights travel as their fp32 bits)."""
        choices = torch.cat([send_weights.detach().float().view(torch.int32), self.plan.send_ids], dim=1)
        for index, chunk in enumerate(self.plan.chunks):
            start, stop = chunk.send_rows
            recv_choices = choices.new_empty(chunk.num_recv_rows, choices.shape[1])
            recv_rows = send.new_empty(chunk.num_recv_rows, send.shape[1])
            splits = (chunk.recv_splits, chunk.send_splits)
            choices_work = self._all_to_all(recv_choices, choices[start:stop], *splits, choices.shape[1] * 4)
            rows_work = self._all_to_all(
                recv_rows, send[start:stop], *splits, send.shape[1] * send.element_size()
            )
            self._dispatch[index] = (choices_work, rows_work, recv_choices, recv_rows, choices, send)

    def finish_dispatch(self, index: int, weights_dtype: torch.dtype):
        choices_work, rows_work, recv_choices, recv_rows, _, _ = self._dispatch[index]
        self._dispatch[index] = ()
        choices_work.wait()
        rows_work.wait()
        top_k = recv_choices.shape[1] // 2
        weights = recv_choices[:, :top_k].contiguous().view(torch.float32).to(weights_dtype)
        return recv_rows, weights, recv_choices[:, top_k:].contiguous()

    def start_return(self, index: int, out_rows: torch.Tensor) -> None:
        chunk = self.plan.chunks[index]
        if self._back is None:  # every chunk's results land in one buffer, plus the zero row of empty slots
            self._back = out_rows.new_empty(self.plan.num_send_rows + 1, out_rows.shape[1])
            self._back[-1].zero_()
        start, stop = chunk.send_rows
        row_bytes = out_rows.shape[1] * out_rows.element_size()
        work = self._all_to_all(
            self._back[start:stop], out_rows, chunk.send_splits, chunk.recv_splits, row_bytes
        )
        self._returns[index] = (work, out_rows)

    def finish_returns(self) -> torch.Tensor:
        for index, pending in enumerate(self._returns):
            pending[0].wait()
            self._returns[index] = ()
        back, self._back = self._back, None
        return back

    # backward, mirrored: the returns' gradients leave first (last chunk first, the order autograd
    # consumes them), each chunk's dispatch gradients leave as soon as its experts' backward is done.
    def start_returns_backward(self, grad_back: torch.Tensor) -> None:
        grad_back = grad_back.contiguous()
        row_bytes = grad_back.shape[1] * grad_back.element_size()
        for index in reversed(range(len(self.plan.chunks))):
            chunk = self.plan.chunks[index]
            start, stop = chunk.send_rows
            grad_rows = grad_back.new_empty(chunk.num_recv_rows, grad_back.shape[1])
            work = self._all_to_all(
                grad_rows, grad_back[start:stop], chunk.recv_splits, chunk.send_splits, row_bytes
            )
            self._grad_returns[index] = (work, grad_rows, grad_back)

    def finish_return_backward(self, index: int) -> torch.Tensor:
        work, grad_rows, _ = self._grad_returns[index]
        self._grad_returns[index] = ()
        work.wait()
        return grad_rows

    def start_dispatch_backward(
        self, index: int, grad_rows: torch.Tensor, grad_weights: torch.Tensor
    ) -> None:
        if self._grad_send is None:
            num_rows = self.plan.num_send_rows
            self._grad_send = (
                grad_rows.new_empty(num_rows, grad_rows.shape[1]),
                grad_weights.new_empty(num_rows, grad_weights.shape[1]),
            )
        chunk = self.plan.chunks[index]
        start, stop = chunk.send_rows
        splits = (chunk.send_splits, chunk.recv_splits)
        grad_rows, grad_weights = grad_rows.contiguous(), grad_weights.contiguous()
        row_bytes = grad_rows.shape[1] * grad_rows.element_size()
        weight_bytes = grad_weights.shape[1] * grad_weights.element_size()
        rows_work = self._all_to_all(self._grad_send[0][start:stop], grad_rows, *splits, row_bytes)
        weights_work = self._all_to_all(self._grad_send[1][start:stop], grad_weights, *splits, weight_bytes)
        self._grad_dispatch.append((rows_work, weights_work, grad_rows, grad_weights))

    def finish_dispatch_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        for rows_work, weights_work, _, _ in self._grad_dispatch:
            rows_work.wait()
            weights_work.wait()
        self._grad_dispatch = []
        grads, self._grad_send = self._grad_send, None
        return grads


class _StartDispatch(torch.autograd.Function):
    """Sends every chunk's rows and choices (async); returns an empty link tensor for the graph. Backward:
    waits for the gradients the chunks' `_WaitDispatch` backwards sent back."""

    @staticmethod
    def forward(ctx, run: LayerRun, send: torch.Tensor, send_weights: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        if not run.replaying:
            run.start_dispatch(send, send_weights)
        return send.new_empty(0)

    @staticmethod
    def backward(ctx, _link_grad):
        grad_send, grad_weights = ctx.run.finish_dispatch_backward()
        return None, grad_send, grad_weights


class _WaitDispatch(torch.autograd.Function):
    """Chunk c's received rows [R, H], their weights [R, k] and local expert ids [R, k]. Backward: sends the
    rows' and weights' gradients back (async), waited for in `_StartDispatch`'s backward."""

    @staticmethod
    def forward(ctx, run: LayerRun, index: int, weights_dtype: torch.dtype, link: torch.Tensor):
        ctx.run, ctx.index = run, index
        if run.replaying:
            rows, weights, ids = run.tape.next()
            rows, weights = rows.detach(), weights.detach()
        else:
            rows, weights, ids = run.finish_dispatch(index, weights_dtype)
            if run.tape is not None:
                run.tape.items.append((rows.detach(), weights.detach(), ids))
        ctx.mark_non_differentiable(ids)
        return rows, weights, ids

    @staticmethod
    def backward(ctx, grad_rows, grad_weights, _grad_ids):
        ctx.run.start_dispatch_backward(ctx.index, grad_rows, grad_weights)
        return None, None, None, grad_rows.new_zeros(0)


class _StartReturn(torch.autograd.Function):
    """Sends chunk c's combined rows back to their tokens' ranks (async). Backward: waits for their
    gradients, sent by `_WaitReturns`' backward."""

    @staticmethod
    def forward(ctx, run: LayerRun, index: int, out_rows: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.index = run, index
        if not run.replaying:
            run.start_return(index, out_rows)
        return out_rows.new_empty(0)

    @staticmethod
    def backward(ctx, _link_grad):
        return None, None, ctx.run.finish_return_backward(ctx.index)


class _WaitReturns(torch.autograd.Function):
    """Every chunk's returned rows, one buffer [S + 1, H] ending with a zero row. Backward: sends their
    gradients to the expert ranks (async)."""

    @staticmethod
    def forward(ctx, run: LayerRun, hidden: int, *links: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.num_links = run, len(links)
        if run.replaying:  # the recompute needs no value downstream of the return trip
            return links[0].new_zeros(run.plan.num_send_rows + 1, hidden)
        return run.finish_returns()

    @staticmethod
    def backward(ctx, grad_back: torch.Tensor):
        ctx.run.start_returns_backward(grad_back)
        return (None, None, *[grad_back.new_zeros(0)] * ctx.num_links)


# ---- the block ----------------------------------------------------------------------------------------
class GroupedExperts(nn.Module):
    """This rank's experts: HF's parameter names and layout (gate_up_proj [L, 2I, H], down_proj [L, H, I]).

    A module of its own so that FSDP can wrap the experts separately from the dense layer (they are
    sharded over a different mesh axis), and so that the state dict keys stay transformers' keys. Its
    forward runs the block's whole expert schedule (every chunk) in one call, so that FSDP gathers the
    experts once per layer and reduces their gradients once every chunk's backward is done.
    """

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, schedule: Callable, *inputs: torch.Tensor):
        return schedule(self, *inputs)

    def anchored_empty(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Zero rows out of no rows, still depending on the weights (so they get a zero gradient, weight
        decay matches `single` and FSDP's reduce runs) and on the inputs (so this rank enters the
        exchange backwards every other rank enters); in the rows' dtype, as every rank's returned rows."""
        anchor = self.gate_up_proj.sum() + self.down_proj.sum() + sum(t.sum() for t in inputs[1:])
        return inputs[0] * 0 + (0 * anchor).to(inputs[0].dtype)


class ExpertParallelMoE(nn.Module):
    """Drop-in for transformers' Qwen3MoeSparseMoeBlock: same `gate` and `experts` children and keys.

    Each rank routes its own tokens, sends each token once to every rank holding one of its experts,
    runs its L local experts as one grouped GEMM, weights and sums a row's expert outputs there and sends
    one row back per (token, rank), where they add up.
    """

    def __init__(
        self,
        gate: nn.Module,
        experts: GroupedExperts,
        num_experts: int,
        ep_group: dist.ProcessGroup | None,
        ep_size: int,
        *,
        num_chunks: int = 1,
        layer_index: int = 0,
        max_rows_factor: float | None = None,
        count_group: dist.ProcessGroup | None = None,
        stats: DispatchStats | None = None,
        compile: bool = False,
        fp8: bool = False,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = ep_size
        self.num_chunks = num_chunks
        self.layer_index = layer_index
        self.max_rows_factor = max_rows_factor
        # The count exchange runs over every EP group at once (`count_group`, the world when experts are
        # replicated) so that all ranks see every rank's load and stop together.
        self.count_group = count_group if count_group is not None else ep_group
        self.stats = stats if stats is not None else DispatchStats()
        self.compile = compile
        self.fp8 = fp8  # FP8 grouped GEMMs (CUDA bf16 only)
        # Each expert's group of pairs starts at a multiple of this many rows, zero rows between groups.
        self.group_alignment = FP8_GROUP_ALIGNMENT if fp8 else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        self._tapes = TapeDeck()
        self._count_layout: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @torch.compiler.disable  # host sync and collectives; the tensor work inside compiles on its own
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores, expert_ids = route(self.gate, x)
        # Rows travel and meet the experts in the compute dtype (bf16 under train.precision=mixed, whose
        # autocast reaches neither the exchange nor the grouped GEMM); the router saw them as they came.
        x = x.to(compute_dtype(x))
        tape, replaying = self._tapes.start()
        if self.ep_size == 1:
            if replaying:
                expert_ids = tape.next()
            elif tape is not None:
                tape.items.append(expert_ids)
            out = self.experts(functools.partial(self._local_schedule, expert_ids), x, scores)
        else:
            if replaying:
                plan = tape.next()
            else:
                plan = self._plan(expert_ids, x.dtype)
                if tape is not None:
                    tape.items.append(plan)
            run = LayerRun(self, plan, tape, replaying)
            send = tensor_function(gather_send_rows, self.compile)(x, plan.send_token, plan.token_slots)
            send_weights = scores.index_select(0, plan.send_token).masked_fill(~plan.send_present, 0)
            link = _StartDispatch.apply(run, send, send_weights)
            return_links = self.experts(functools.partial(self._chunk_schedule, run, scores.dtype), link)
            back = _WaitReturns.apply(run, x.shape[1], *return_links)
            out = tensor_function(combine_rows, self.compile)(back, plan.token_slots, plan.send_token)
        return out.to(hidden_states.dtype).reshape(shape)

    # ---- expert compute -------------------------------------------------------------------------------
    def _expert_rows(
        self, experts: GroupedExperts, rows, weights, index: PairIndex, offsets, pairs_per_expert
    ) -> torch.Tensor:
        kernel = uses_grouped_kernel(rows)
        gaps = self.group_alignment > 1
        if gaps:
            index, offsets = align_groups(index, offsets, self.group_alignment)
            pairs_per_expert = None if kernel else torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        activation = _plain_activation(experts.act_fn)
        compile_it = self.compile and kernel and activation is not None
        function = tensor_function(expert_rows, compile_it)
        return function(
            rows,
            weights,
            index.pair_row,
            index.pair_choice,
            index.slots,
            offsets if kernel else None,
            # fp32 master weights (train.precision=mixed) are cast to the rows' dtype; their gradients
            # come back through the cast in fp32
            experts.gate_up_proj.to(rows.dtype),
            experts.down_proj.to(rows.dtype),
            activation or experts.act_fn,
            None if kernel else pairs_per_expert,
            self.fp8 and kernel,
            gaps,
        )

    def _local_schedule(self, expert_ids, experts: GroupedExperts, x, scores) -> torch.Tensor:
        """P = 1: every choice is local; no exchange and, on the grouped-GEMM path, no host sync."""
        num_pairs = expert_ids.numel()
        index = pair_index(expert_ids, self.num_experts, num_pairs)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, expert_ids.reshape(-1), torch.ones_like(expert_ids.reshape(-1)))
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        pairs_per_expert = None if uses_grouped_kernel(x) else counts.tolist()
        return self._expert_rows(experts, x, scores, index, offsets, pairs_per_expert)

    def _chunk_schedule(self, run: LayerRun, weights_dtype, experts: GroupedExperts, link) -> tuple:
        """Per chunk: wait for its rows, compute, send the results back; the next chunk's rows travel
        meanwhile (all were sent up front)."""
        return_links = []
        for index, chunk in enumerate(run.plan.chunks):
            rows, weights, ids = _WaitDispatch.apply(run, index, weights_dtype, link)
            if chunk.num_recv_pairs == 0:
                out_rows = experts.anchored_empty(rows, weights)
            else:
                pairs = pair_index(ids, self.num_local, chunk.num_recv_pairs)
                out_rows = self._expert_rows(
                    experts, rows, weights, pairs, chunk.pair_offsets, chunk.pairs_per_local_expert
                )
            return_links.append(_StartReturn.apply(run, index, out_rows))
        return tuple(return_links)

    # ---- planning -------------------------------------------------------------------------------------
    def _layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(this EP group's rows in the count exchange, every EP group's rows [groups, P], the count
        group's global ranks), built once. EP groups are consecutive ranks of the count group."""
        if self._count_layout is None:
            count_ranks = dist.get_process_group_ranks(self.count_group)
            ep_ranks = dist.get_process_group_ranks(self.ep_group)
            first = count_ranks.index(ep_ranks[0])
            members = torch.arange(first, first + self.ep_size, device=device)
            groups = torch.arange(len(count_ranks), device=device).view(-1, self.ep_size)
            self._count_layout = (members, groups, count_ranks)
        return self._count_layout

    def _free_bytes(self, device: torch.device) -> int:
        """What this rank could still allocate (CUDA, when no factor is set); -1: no limit known."""
        if self.max_rows_factor is not None or device.type != "cuda":
            return -1
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

    def load_limit(self, dtype: torch.dtype) -> LoadLimit:
        hidden = self.experts.down_proj.shape[-2]
        width = self.experts.down_proj.shape[-1]
        top_k = getattr(self.gate, "top_k", 1)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        # A pair: its gathered input and weighted output (2H) and the GEMMs' gate, up and product (3I); a
        # row: its receive buffer, its combined output and the transient [rows, k, H] gather.
        return LoadLimit(
            self.max_rows_factor, itemsize * (2 * hidden + 3 * width), itemsize * (top_k + 2) * hidden
        )

    def _plan(self, expert_ids: torch.Tensor, rows_dtype: torch.dtype) -> LayerPlan:
        """Count what goes where, exchange the counts of every chunk (one collective, one host sync), check
        the load, and build the send order and index tensors on the device."""
        num_tokens, top_k = expert_ids.shape
        num_ranks, num_local, device = self.ep_size, self.num_local, expert_ids.device
        bounds = chunk_bounds(num_tokens, self.num_chunks)
        destination = expert_ids // num_local
        goes_to = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
        goes_to.scatter_(1, destination, True)

        # Per chunk and destination rank: pairs per local expert, then rows: [C, P, L + 1].
        per_chunk = []
        for start, stop in bounds:
            ids = expert_ids[start:stop].reshape(-1)
            pairs = torch.zeros(self.num_experts, dtype=torch.long, device=device)
            pairs.scatter_add_(0, ids, torch.ones_like(ids))
            rows = goes_to[start:stop].sum(0)
            per_chunk.append(torch.cat([pairs.view(num_ranks, num_local), rows.unsqueeze(1)], dim=1))
        counts = torch.stack(per_chunk)
        free = torch.full((1,), self._free_bytes(device), dtype=torch.long, device=device)
        mine = torch.cat([counts.reshape(-1), free])
        members, groups, count_ranks = self._layout(device)
        gathered = mine.new_empty(len(count_ranks) * mine.numel())  # flat: gloo takes no stacked output
        self.stats.collectives += 1
        _all_gather_single(gathered, mine, group=self.count_group)
        gathered = gathered.view(len(count_ranks), mine.numel())

        every = gathered[:, :-1].view(len(count_ranks), self.num_chunks, num_ranks, num_local + 1)
        group_counts = every.index_select(0, members)  # [P sources, C, P destinations, L + 1]
        received = group_counts[:, :, self.ep_rank]  # [P, C, L + 1]
        pairs_received = received[..., :num_local].sum(0)  # [C, L]
        # Every rank's load, for every EP group (the same verdict everywhere): [groups, P] pairs and rows.
        per_source = every[..., :num_local].sum((1, 3)), every[..., num_local].sum(1)
        load_pairs, load_rows = (load[groups].sum(1) for load in per_source)
        host = torch.cat(
            [
                counts[:, :, num_local].reshape(-1),  # rows sent, [C, P]
                received[..., num_local].t().reshape(-1),  # rows received, [C, P]
                pairs_received.reshape(-1),  # [C, L]
                load_pairs.reshape(-1),
                load_rows.reshape(-1),
                gathered[:, -1],  # free bytes per rank
            ]
        ).tolist()  # the one host sync of the layer

        num_chunks, num_groups = self.num_chunks, groups.shape[0]
        sizes = [num_chunks * num_ranks, num_chunks * num_ranks, num_chunks * num_local]
        sizes += [num_groups * num_ranks, num_groups * num_ranks, len(count_ranks)]
        sent, recv, pairs_host, loads, rows_host, free_host = _split(host, sizes)
        self._check_load(loads, rows_host, free_host, count_ranks, num_groups, rows_dtype)

        # Send order: chunk-major, then destination rank, then token.
        rows_sent = counts[:, :, num_local].reshape(-1)  # [C·P] on the device
        num_send = sum(sent)
        slots = []
        for chunk, (start, stop) in enumerate(bounds):
            chosen = goes_to[start:stop]
            # One flat scan in send order (rank-major): a scan down the token dim of [tokens, P] runs one
            # thread per column on CUDA (0.76 ms per layer on an H200 at 8,192 tokens).
            in_send_order = chosen.t().reshape(-1).long()
            position = sum(sent[: chunk * num_ranks]) + torch.cumsum(in_send_order, 0) - 1
            slots.append(torch.where(chosen, position.view(num_ranks, -1).t(), num_send))
        token_slots = torch.cat(slots)
        tokens = torch.arange(num_tokens, device=device).repeat_interleave(num_ranks)
        send_token = torch.zeros(num_send + 1, dtype=torch.long, device=device)
        send_token = send_token.scatter_(0, token_slots.reshape(-1), tokens)[:num_send]
        rank_of_row = torch.arange(num_ranks, device=device).repeat(num_chunks)
        rank_of_row = rank_of_row.repeat_interleave(rows_sent, output_size=num_send).unsqueeze(1)
        send_present = destination.index_select(0, send_token) == rank_of_row
        local_ids = expert_ids.index_select(0, send_token) - rank_of_row * num_local
        send_ids = torch.where(send_present, local_ids, -1).to(torch.int32)

        offsets = torch.cumsum(pairs_received, 1, dtype=torch.int32)
        chunks, row = [], 0
        for chunk in range(num_chunks):
            chunk_sent = sent[chunk * num_ranks : (chunk + 1) * num_ranks]
            chunks.append(
                ChunkPlan(
                    send_rows=(row, row + sum(chunk_sent)),
                    send_splits=chunk_sent,
                    recv_splits=recv[chunk * num_ranks : (chunk + 1) * num_ranks],
                    pairs_per_local_expert=pairs_host[chunk * num_local : (chunk + 1) * num_local],
                    pair_offsets=offsets[chunk],
                )
            )
            row += sum(chunk_sent)
        return LayerPlan(chunks, send_token, token_slots, send_ids, send_present, num_send)

    def _check_load(
        self, loads, rows, free, count_ranks, num_groups, rows_dtype: torch.dtype | None = None
    ) -> None:
        """Stop every rank, at this layer, if any rank of any EP group would take more than allowed
        (rows and their activations in `rows_dtype`, default the experts' dtype)."""
        limit = self.load_limit(rows_dtype or self.experts.down_proj.dtype)
        for group in range(num_groups):
            pairs = loads[group * self.ep_size : (group + 1) * self.ep_size]
            share = sum(pairs) / self.ep_size
            for ep_rank, received in enumerate(pairs):
                count_index = group * self.ep_size + ep_rank
                ratio = received / share if share else 0.0
                needed = received * limit.bytes_per_pair + rows[count_index] * limit.bytes_per_row
                where = (
                    f"expert-parallel overload in layer {self.layer_index}: EP rank {ep_rank} (rank "
                    f"{count_ranks[count_index]}) would receive {received:,} (token, expert) rows, "
                    f"{ratio:.2f}× its balanced share of {share:,.0f}"
                )
                if limit.factor is not None and ratio > limit.factor:
                    raise ExpertOverload(
                        f"{where}, past parallel.ep_max_rows_factor={limit.factor:g}; the router sends "
                        "too many tokens to its experts: balance it (auxiliary loss, router bias) or raise "
                        "parallel.ep_max_rows_factor"
                    )
                if limit.factor is None and free[count_index] >= 0 and needed > free[count_index]:
                    raise ExpertOverload(
                        f"{where}, about {needed / 2**30:.1f} GiB where {free[count_index] / 2**30:.1f} GiB "
                        "are free; balance the router (auxiliary loss, router bias), lower --micro-batch or "
                        "cap the load with parallel.ep_max_rows_factor"
                    )


# torch 2.13 renames all_gather_into_tensor (deprecated there); 2.11 knows only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _split(values: list[int], sizes: list[int]) -> list[list[int]]:
    parts, start = [], 0
    for size in sizes:
        parts.append(values[start : start + size])
        start += size
    return parts


__all__ = [
    "FP8_GROUP_ALIGNMENT",
    "DispatchStats",
    "ExpertParallelMoE",
    "GroupedExperts",
    "align_groups",
    "chunk_bounds",
    "grouped_linear",
    "grouped_mm_kernel",
    "pair_index",
    "route",
]
