"""`tp`: DTensor tensor parallelism over attention heads and the experts' intermediate dimension.

Every tp rank reads the same sequences; each holds 1/tp of the attention heads and 1/tp of every
expert's intermediate width (Megatron layout), so per decoder layer the forward costs two
all-reduces over `tp` (after o_proj, after the experts) and the backward two more (into the
attention input, into the experts' input). Embedding, norms, router and lm_head stay replicated.

Why parameters are DTensors (not plain local slices): the sharding is then stated by the parameter
itself, so `materialize`, FSDP2 over a `dp` axis (see mixed.py), full-state-dict gathering and
`torch.distributed.checkpoint` all handle it without per-strategy bookkeeping.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moectl.checkpoint import LocalBoxes, permuted_blocks_view
from moectl.config import ModelConfig, ParallelConfig, TrainConfig
from moectl.errors import UsageError
from moectl.metrics import ParamCounts
from moectl.model import apply_layer_wrappers, decoder_layers, local_shard
from strategies.base import Materialize, SameDataOnEveryRank, Strategy

GATE_UP_SUFFIX = "mlp.experts.gate_up_proj"
#: expert weight -> the tensor dim that holds the intermediate width (the dim TP splits)
EXPERT_INTERMEDIATE_DIMS = {"gate_up_proj": 1, "down_proj": 2}


# ---- checks ------------------------------------------------------------------------------------
def check_tp_divides_model(strategy: str, model: ModelConfig, tp_size: int) -> None:
    """tp must split query heads, KV heads and the expert intermediate width evenly."""
    sizes = {
        "num_heads": model.num_heads,
        "num_kv_heads": model.num_kv_heads,
        "moe_intermediate_size": model.moe_intermediate_size,
    }
    common = math.gcd(*sizes.values())
    fitting = [str(d) for d in range(2, common + 1) if common % d == 0]
    if fitting:
        fix = f"use --tp-size {' or '.join(fitting)} (divides heads, KV heads and expert width)"
    else:
        fix = "heads, KV heads and expert width share no factor above 1; use ddp or fsdp"
    for key, size in sizes.items():
        if size % tp_size:
            raise UsageError(f"{strategy}: --tp-size {tp_size} does not divide model.{key} = {size}; {fix}")


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


# ---- Megatron's f and g for the experts ----------------------------------------------------------
def _all_reduce_sum(tensor: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    reduced = funcol.all_reduce(tensor.contiguous(), "sum", tp_mesh)
    return reduced.wait() if isinstance(reduced, funcol.AsyncCollectiveTensor) else reduced


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, all-reduce backward: a replicated input feeding rank-local (partial) math."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
        ctx.tp_mesh = tp_mesh
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce_sum(grad, ctx.tp_mesh), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward, identity backward: partial sums become the replicated result.

    Why not `torch.distributed.nn.functional.all_reduce` or the differentiable functional
    collective: their backward all-reduces again, which is right for a sum whose consumers are
    distinct per rank, but here every rank consumes the same replicated result, so the gradient
    would come out tp times too large.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
        return _all_reduce_sum(tensor, tp_mesh)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


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
        _CopyToTensorParallel.apply(flat, tp_mesh),
        selected_experts,
        _CopyToTensorParallel.apply(routing_weights, tp_mesh),
    )
    partial = torch.func.functional_call(experts, local_weights, inputs)
    return _ReduceFromTensorParallel.apply(partial, tp_mesh).reshape(batch, seq_len, hidden)


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


# ---- the strategy -------------------------------------------------------------------------------
class TensorParallel(SameDataOnEveryRank, Strategy):
    """Tensor parallel only: world size = tp size, one data shard (every rank reads the same data).

    The mesh is (dp=1, tp): the size-1 `dp` axis gives the loop a loss group over which summing
    does not multiply the loss, and lets `mixed` reuse everything here with dp > 1.
    """

    name = "tp"
    summary = "tensor parallel (DTensor): attention heads and expert intermediate width split over tp"

    def __init__(self, parallel: ParallelConfig, world_size: int):
        super().__init__(parallel, world_size)
        self.model_config: ModelConfig | None = None

    @classmethod
    def default_world_size(cls, parallel: ParallelConfig) -> int:
        return parallel.tp_size

    @property
    def tp_size(self) -> int:
        return self.parallel.tp_size

    def validate(self, model: ModelConfig, train: TrainConfig) -> None:
        self.model_config = model
        if self.parallel.ep_size != 1:
            raise UsageError(f"{self.name} has no expert parallelism; drop --ep-size or pick --strategy ep")
        if self.parallel.dp_size not in (None, 1):
            raise UsageError(
                f"tp has no data parallelism (--dp-size {self.parallel.dp_size}); "
                f"use --strategy mixed --dp-size {self.parallel.dp_size} --tp-size {self.tp_size}"
            )
        if self.tp_size < 2:
            raise UsageError("tp needs --tp-size 2 or more; for one process use --strategy single")
        if self.world_size != self.tp_size:
            raise UsageError(
                f"tp: --tp-size {self.tp_size} must equal the world size {self.world_size}; "
                f"drop --nproc, or use --strategy mixed --tp-size {self.tp_size} for dp × tp"
            )
        check_tp_divides_model(self.name, model, self.tp_size)

    def params_per_rank(self, counts: ParamCounts) -> float:
        return tensor_parallel_params_per_rank(self.model_config, counts, self.tp_size)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(device_type, (self.dp_size, self.tp_size), mesh_dim_names=("dp", "tp"))

    def parallelize(self, model: nn.Module, materialize: Materialize, train: TrainConfig) -> nn.Module:
        apply_tensor_parallel(model, self.mesh["tp"])
        apply_layer_wrappers(model, train)
        materialize(model)
        return model

    def after_backward(self, model: nn.Module) -> None:
        finish_partial_gradients(model)

    def shard(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        if name.endswith(GATE_UP_SUFFIX):
            full = gate_up_to_rank_blocks(full, self.tp_size)
        return local_shard(param, full)

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor | LocalBoxes:
        """gate_up (and its optimizer state) in HF's [gate; up] row order, so any layout resumes it:
        rank r's rows [gate_r; up_r] are two boxes of it, saved and loaded in place (no gather)."""
        if not (param_name.endswith(GATE_UP_SUFFIX) and isinstance(tensor, DTensor) and tensor.ndim == 3):
            return tensor  # AdamW's scalar `step` shares the parameter's name
        stored_order = [half * self.tp_size + rank for rank in range(self.tp_size) for half in (0, 1)]
        return permuted_blocks_view(tensor, 1, stored_order)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        state = super().full_state_dict(model)
        if state is None:
            return None
        return {
            key: gate_up_from_rank_blocks(value, self.tp_size) if key.endswith(GATE_UP_SUFFIX) else value
            for key, value in state.items()
        }
