"""Tensor-parallel building blocks: DTensor TP over attention heads and over the experts'
intermediate dimension (Megatron layout), and Megatron's f / g autograd functions.

Each tp rank holds 1/tp of the attention heads and 1/tp of every expert's intermediate width, so per
decoder layer the forward costs two all-reduces over `tp` (after o_proj, after the experts) and the
backward two more (into the attention input, into the experts' input). Embedding, norms, router and
lm_head stay replicated.

Why parameters are DTensors (not plain local slices): the sharding is then stated by the parameter
itself, so `materialize`, FSDP2 over a `dp` axis, full-state-dict gathering and
`torch.distributed.checkpoint` all handle it without per-strategy bookkeeping.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moectl.config import ModelConfig
from moectl.io.dcp_layouts import LocalBoxes, permuted_blocks_view
from moectl.model.build import decoder_layers, local_shard
from moectl.model.sizing import ParamCounts
from moectl.parallel.cost import Collective, Exposure, ring

GATE_UP_SUFFIX = "mlp.experts.gate_up_proj"
#: expert weight -> the tensor dim that holds the intermediate width (the dim TP splits)
EXPERT_INTERMEDIATE_DIMS = {"gate_up_proj": 1, "down_proj": 2}


# ---- gate/up layout ----------------------------------------------------------------------------
def gate_up_to_rank_blocks(full: torch.Tensor, tp_size: int) -> torch.Tensor:
    """[E, 2I, H] rows [gate; up] -> [gate_0; up_0; gate_1; up_1; ...], one block per tp rank.

    Why: HF stores all gate rows, then all up rows, and the expert forward splits its local
    projection in two halves (gate, up). A plain Shard(1) would give rank 0 only gate rows; after
    this permutation Shard(1) gives rank r the matching pair [gate_r; up_r].
    """
    experts, double_width, hidden = full.shape
    blocks = full.reshape(experts, 2, tp_size, double_width // (2 * tp_size), hidden)
    return blocks.transpose(1, 2).reshape(experts, double_width, hidden)


def gate_up_from_rank_blocks(blocked: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Inverse of `gate_up_to_rank_blocks`: back to HF's [gate; up] row order."""
    experts, double_width, hidden = blocked.shape
    blocks = blocked.reshape(experts, tp_size, 2, double_width // (2 * tp_size), hidden)
    return blocks.transpose(1, 2).reshape(experts, double_width, hidden)


# ---- Megatron's f and g ------------------------------------------------------------------------
Group = DeviceMesh | dist.ProcessGroup


def _all_reduce_sum(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    reduced = funcol.all_reduce(tensor.contiguous(), "sum", group)
    return reduced.wait() if isinstance(reduced, funcol.AsyncCollectiveTensor) else reduced


class _CopyToParallelRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward: a replicated input feeding rank-local (partial) math."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce_sum(grad, ctx.group), None


class _ReduceFromParallelRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward: partial sums become the replicated result.

    Why not `torch.distributed.nn.functional.all_reduce` or the differentiable functional
    collective: their backward all-reduces again, which is right for a sum whose consumers are
    distinct per rank, but here every rank consumes the same replicated result, so the gradient
    would come out tp times too large.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce_sum(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_parallel_region(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's f over `group` (a 1-D mesh or a process group)."""
    return _CopyToParallelRegion.apply(tensor, group)


def reduce_from_parallel_region(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's g over `group` (a 1-D mesh or a process group)."""
    return _ReduceFromParallelRegion.apply(tensor, group)


def _tensor_parallel_moe_forward(block: nn.Module, tp_mesh: DeviceMesh, hidden_states: torch.Tensor):
    """Qwen3MoeSparseMoeBlock.forward with experts on their local intermediate slice.

    The router runs replicated. The routing weights pass through f too: the expert output they
    scale is partial, so their gradient is partial; reducing it there (a [tokens, top_k] tensor)
    keeps the whole router path, and the router weight's gradient, exact on every rank.
    The experts run through transformers' own implementation (grouped_mm, batched_mm or eager) on
    the local weights; act(gate_r) * up_r is exactly the r-th slice of the full activation.
    """
    batch, seq_len, hidden = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden)
    _, routing_weights, selected_experts = block.gate(flat)
    experts = block.experts
    local_weights = {name: getattr(experts, name).to_local() for name in EXPERT_INTERMEDIATE_DIMS}
    inputs = (
        copy_to_parallel_region(flat, tp_mesh),
        selected_experts,
        copy_to_parallel_region(routing_weights, tp_mesh),
    )
    partial = torch.func.functional_call(experts, local_weights, inputs)
    return reduce_from_parallel_region(partial, tp_mesh).reshape(batch, seq_len, hidden)


# ---- parallelising ------------------------------------------------------------------------------
def _shard_expert_weights(experts: nn.Module, tp_mesh: DeviceMesh) -> None:
    for weight_name, dim in EXPERT_INTERMEDIATE_DIMS.items():
        weight = experts.get_parameter(weight_name)
        experts.register_parameter(
            weight_name, nn.Parameter(distribute_tensor(weight, tp_mesh, [Shard(dim)]))
        )


def parallelize_attention(attention: nn.Module, tp_mesh: DeviceMesh) -> None:
    """q/k/v column-wise (local heads), o row-wise; q_norm/k_norm replicated DTensors.

    The attention input becomes one Replicate DTensor up front, so the three projections' partial
    input gradients add up as DTensors and are all-reduced once, not three times.
    q_norm/k_norm see local heads only, so their weight gradients are partial over tp. As Replicate
    DTensors with the input declared Shard on the heads dim (SequenceParallel with sequence_dim=2),
    DTensor tracks that: their gradients come out Partial, and whoever reads them reduces them
    (FSDP2 before its reduce-scatter, `finish_partial_gradients` otherwise). No hand-kept list of
    parameters, and one reduction per step, not per micro-batch.
    """
    parallelize_module(
        attention,
        tp_mesh,
        PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Replicate()},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
    )
    local_heads = SequenceParallel(sequence_dim=2, use_local_output=True)  # [batch, seq, heads, head_dim]
    plan = {
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(),
        "q_norm": local_heads,
        "k_norm": local_heads,
    }
    parallelize_module(attention, tp_mesh, plan)


def parallelize_moe(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Experts sharded on their intermediate dim; the block's forward adds f/g around them."""
    _shard_expert_weights(block.experts, tp_mesh)
    block.forward = types.MethodType(lambda self, x: _tensor_parallel_moe_forward(self, tp_mesh, x), block)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """TP on every decoder layer of the meta-device model (first in the wrap order)."""
    for layer in decoder_layers(model):
        parallelize_attention(layer.self_attn, tp_mesh)
        parallelize_moe(layer.mlp, tp_mesh)


def finish_partial_gradients(model: nn.Module) -> None:
    """Reduce DTensor gradients that autograd left Partial (q_norm/k_norm) to their parameter's layout.

    The optimizer would reduce them implicitly too, but once per op that touches them (momentum,
    weight decay, Adam's moments); doing it once here keeps every optimizer and gradient clipping
    on plain, final gradients.
    """
    for param in model.parameters():
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(placements=param.placements)


def tensor_parallel_params_per_rank(model: ModelConfig, counts: ParamCounts, tp_size: int) -> float:
    q_width, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    attention = model.num_layers * 2 * model.hidden_size * (q_width + kv_width)
    sharded = attention + counts.experts
    return counts.total - sharded + sharded / tp_size


def tensor_parallel_all_reduces(
    model: ModelConfig,
    tokens: int,
    num_micro_batches: int,
    tp_size: int,
    spans_nodes: bool,
    forward_bytes: int,
    backward_bytes: int,
) -> Collective:
    """The activation all-reduces of one step: two per decoder layer in forward, of partial outputs of
    `forward_bytes` each (the compute dtype), and two in backward, of the gradients of the layer's inputs of
    `backward_bytes` (the residual stream's dtype: fp32 under autocast, the compute dtype where FSDP2 casts
    the layer's input), of a micro-batch's `tokens` hidden states each."""
    activation = tokens * model.hidden_size * ring(tp_size)
    sent = num_micro_batches * model.num_layers * 2 * (forward_bytes + backward_bytes) * activation
    return Collective("tp all-reduce", sent, tp_size, spans_nodes, Exposure.ACTIVATIONS)


def tensor_parallel_shard(name: str, full: torch.Tensor, tp_size: int) -> torch.Tensor:
    """The full tensor as TP stores it before slicing: gate_up_proj rows in rank blocks."""
    return gate_up_to_rank_blocks(full, tp_size) if name.endswith(GATE_UP_SUFFIX) else full


def gate_up_checkpoint_view(param_name: str, tensor: torch.Tensor, tp_size: int) -> torch.Tensor | LocalBoxes:
    """gate_up (and its optimizer state) in HF's [gate; up] row order, so any layout resumes it:
    rank r's rows [gate_r; up_r] are two boxes of it, saved and loaded in place (no gather)."""
    if not (param_name.endswith(GATE_UP_SUFFIX) and isinstance(tensor, DTensor) and tensor.ndim == 3):
        return tensor  # AdamW's scalar `step` shares the parameter's name
    stored_order = [half * tp_size + rank for rank in range(tp_size) for half in (0, 1)]
    return permuted_blocks_view(tensor, 1, stored_order)


def gate_up_to_hf_order(
    state: Iterable[tuple[str, torch.Tensor | None]], tp_size: int
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Gathered (name, tensor) pairs with gate_up_proj back in HF's [gate; up] row order (None stays None)."""
    for key, value in state:
        if value is not None and key.endswith(GATE_UP_SUFFIX):
            value = gate_up_from_rank_blocks(value, tp_size)
        yield key, value


class TensorParallelState:
    """The strategy members of a model made tensor parallel by `apply_tensor_parallel` over
    `self.dims.tp`: its initial slices, its checkpoint layout and the gathered state dict, gate_up's rows
    in HF order. A mixin listed before `Strategy` (tp, mixed)."""

    def shard(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return local_shard(param, tensor_parallel_shard(name, full, self.dims.tp))

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor | LocalBoxes:
        return gate_up_checkpoint_view(param_name, tensor, self.dims.tp)

    def full_state_dict(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor | None]]:
        return gate_up_to_hf_order(super().full_state_dict(model), self.dims.tp)
