"""`moectl plan`: predict every parallel layout's speed and memory before running any, from a small model.

What a layout holds and sends is its strategy's own statement (`Strategy.step_cost`, moectl/parallel/cost.py);
a strategy without one is not predicted. This module keeps the hardware's figures (moectl/plan/calibration.py)
and the arithmetic.

The run's precision is `train.precision` (`auto`: `mixed`, as on a GPU; `plan_precision`). Under `bf16`
weights, gradients, optimizer state and compute are bf16, as in every measured run; under `mixed` the
weights, gradients and optimizer state are fp32 (4 bytes) and the compute bf16, and what that adds is
counted from what the strategy states: the bf16 copies of the weights it computes with, fp32 gradient
reductions, the optimizer's pass over fp32 state, the casts (`cast_seconds`), and the fp32 residual stream
where FSDP2 casts no layer input. No mixed GPU run checks these terms yet (`precision_calibrated`).

Memory is the dry-run's estimate (`moectl.model.sizing.estimate_memory_gib`, fitted to H200 peaks) with the
parameters each rank holds and the gradients alive at the peak, plus the buffers the strategy states: ep's
exchange buffers (and under checkpointing the rows each layer records for its recompute), DDP's gradient
buckets, FSDP's unsharded gradients under accumulation and its gathered layers.

Time per optimizer step on one GPU is compute plus the communication the step waits for:

- compute: the step's FLOPs per kernel class (dense GEMMs, flash attention, the experts' grouped GEMM)
  over an achieved efficiency measured on H200s, plus memory-bound work per token and layer, the loss
  per token, the GPU's idle time per layer and micro-batch, the dispatch work per (token, expert) pair
  whose rows cross ranks, and the passes over the parameters (gradient accumulation, optimizer step) at
  the achieved HBM bandwidth;
- communication: the bytes each collective the strategy states sends (ep's exchanges, FSDP's gathers and
  reduce-scatters, TP's activation all-reduces, gradient all-reduces), over NVLink within a node and the
  network between nodes, times the share its exposure class leaves exposed (moectl/plan/calibration.py
  says what was measured and what was fitted).

Other GPU kinds (H100, A100, B200) take the makers' figures (peak FLOP/s, memory, bandwidths) and the
H200's efficiencies; `compute_seconds` says which terms scale and which carry over. A kind is
"calibrated" once measured runs on it check the model (`calibration.is_calibrated`).

Nothing here starts a process group or needs a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moectl.config import ModelConfig, RunConfig, TrainConfig, build_config, checkpointing_mode
from moectl.errors import UsageError
from moectl.model.precision import Precision, resolve_precision
from moectl.model.sizing import count_params, estimate_memory_gib, flops_per_token
from moectl.parallel.cost import Collective, Exposure, StepCost
from moectl.parallel.dims import ParallelDims
from moectl.plan.calibration import (
    CALIBRATED_ON,
    CALIBRATION,
    GPU_KINDS,
    Calibration,
    GpuKind,
    MeasuredRun,
    is_calibrated,
    precision_calibrated,
)
from moectl.registry import build_strategy, get_strategy
from moectl.run import runtime
from moectl.strategy import Layout, Strategy

#: Left free on each GPU beyond the predicted peak: CUDA context, NCCL buffers, allocator fragmentation
#: (torch's peak counts none of them). Not measured: the largest run peaked at 120 GiB of 139.8.
HEADROOM_GIB = 6.0
#: Below this hidden size layers are launch-bound and the calibrated figures do not apply.
SMALLEST_CALIBRATED_HIDDEN = 1024
#: Pure bf16 (`train.precision=bf16`): what every measured run trained in (moectl/plan/calibration.py)
BF16 = resolve_precision("bf16", on_gpu=True)
#: The chunk plan tries for train.loss_chunk_tokens when the config sets none: the measured one (BENCHMARKS.md)
LOSS_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class MemoryParts:
    weights_and_optimizer: float  # GiB: weights, gradients, optimizer state (and the strategy's copies)
    activations: float
    logits: float
    buffers: float  # the strategy's exchange buffers
    compute_copies: float = 0.0  # under mixed: the bf16 copies of fp32 weights the compute runs on

    @property
    def total(self) -> float:
        return (
            self.weights_and_optimizer + self.activations + self.logits + self.buffers + self.compute_copies
        )


@dataclass(frozen=True)
class Prediction:
    tokens_per_s_per_gpu: float
    peak_mem_gib: float
    mfu: float
    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    memory: MemoryParts
    comm_s: dict[str, float]  # exposed seconds per step by collective
    ep_dispatch_s: float = 0.0  # of compute_s: the dispatch work of rows that cross ranks (ep)
    cast_s: float = 0.0  # of compute_s: under mixed, the casts of weights to bf16 and of gradients back
    precision: str = "bf16"


def plan_precision(train: TrainConfig) -> Precision:
    """The precision a GPU run of `train` trains in: `train.precision`, `auto` being `mixed` (the GPU
    default). ValueError for `fp32`: the model's figures are for bf16 compute."""
    precision = resolve_precision(train.precision, on_gpu=True)
    if precision.compute_dtype != torch.bfloat16:
        raise ValueError(
            f"moectl plan predicts bf16 compute, not train.precision={train.precision}: "
            "--set train.precision=mixed (fp32 weights, bf16 compute) or bf16"
        )
    return precision


def fsdp_wraps_layers(cost: StepCost, dims: ParallelDims) -> bool:
    """Whether FSDP2 wraps the decoder layers (gathers them whole, defers the reduce-scatter)."""
    return bool(cost.fsdp_unit) and dims.dp > 1


# ---- the rules a layout must satisfy --------------------------------------------------------------
def layout_strategy(model: ModelConfig, strategy: str | type[Strategy], layout: Layout) -> Strategy:
    """The strategy running `layout` on `model`, checked as `moectl train` checks a run; ValueError
    naming the rule it breaks."""
    strategy_cls = get_strategy(strategy) if isinstance(strategy, str) else strategy
    try:
        return build_strategy(layout.apply(RunConfig(model=model)), layout.world_size, strategy_cls)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def batch_problem(train: TrainConfig, dims: ParallelDims) -> str | None:
    """Why the global batch does not split into micro-batches of every data-parallel rank, or None."""
    per_step = train.micro_batch * dims.dp
    if train.global_batch % per_step:
        return (
            f"global batch {train.global_batch} must be divisible by micro-batch {train.micro_batch} "
            f"× dp {dims.dp} = {per_step}"
        )
    return None


def planned(
    train: TrainConfig,
    micro_batch: int,
    full_checkpointing: bool,
    compile: bool,
    loss_chunk_tokens: int | None = None,
) -> TrainConfig:
    """`train` with one of plan's variants: micro-batch, full activation checkpointing or not, compile, and
    the loss chunked over `loss_chunk_tokens` tokens (0: the whole logits; None: as `train` has it).
    The plan has time figures for full checkpointing only; selective (compiled) changes memory, which the
    estimate sizes, so a selective run keeps it where the variant compiles."""
    selective = checkpointing_mode(train.activation_checkpointing) == "selective" and compile
    checkpointing = "full" if full_checkpointing else ("selective" if selective else "none")
    chunk = train.loss_chunk_tokens if loss_chunk_tokens is None else loss_chunk_tokens
    return dataclasses.replace(
        train,
        micro_batch=micro_batch,
        activation_checkpointing=checkpointing,
        compile=compile,
        loss_chunk_tokens=chunk,
    )


def _as_planned(train: TrainConfig) -> TrainConfig:
    mode = checkpointing_mode(train.activation_checkpointing)
    return planned(train, train.micro_batch, mode == "full", train.compile)


# ---- memory -----------------------------------------------------------------------------------------
def predict_memory(
    strategy: Strategy, train: TrainConfig, cost: StepCost, precision: Precision
) -> MemoryParts:
    """Peak GiB per GPU of `strategy` (its `cost`) in `precision`, split into what the dry-run's estimate
    sizes and what the strategy adds. Weights, gradients and optimizer state take the precision's weight
    bytes (sharded as the cost states); activations and logits the compute's (bf16). Under `mixed` also the
    bf16 copies of the weights the compute runs on (`Strategy.compute_copy_params`: autocast's casts, or
    the units FSDP2 gathers in bf16), FSDP2's unsharded gradients under accumulation in fp32, and, where
    FSDP2 casts no layer's input, the fp32 residual stream (`estimate_memory_gib`'s `fp32_residual`: an
    assumption measured on the CPU). The logits term is one chunk's when train.loss_chunk_tokens chunks the
    loss (`estimate_memory_gib`)."""
    model, dims = strategy.model_config, strategy.dims
    param_bytes, compute_bytes = precision.param_bytes, precision.compute_bytes
    counts = count_params(model)
    sharded = cost.params
    num_micro = train.global_batch // (train.micro_batch * dims.dp)
    grads = sharded
    if num_micro == 1:
        # Gradients are freed after every step (zero_grad(set_to_none=True)), so with one micro-batch none
        # exists at the end of the forward, where activations peak, but the head's: made in forward by the
        # chunked loss (whose term in the estimate counts it), or in the loss's backward while the logits'
        # gradient is alive. (Accumulating, the earlier micro-batches' gradients are all alive.)
        head = counts.embedding * sharded / counts.total if cost.fsdp_unit else counts.embedding
        grads = 0.0 if train.loss_chunk_tokens > 0 else head
    no_batch = dataclasses.replace(train, micro_batch=0)
    static = estimate_memory_gib(model, no_batch, sharded, param_bytes, grads)
    no_layers = dataclasses.replace(model, num_layers=0)
    logits = estimate_memory_gib(no_layers, train, 0, compute_bytes)
    fp32_residual = precision.casts and not strategy.layer_inputs_in_compute_dtype(cost)
    activations = (
        estimate_memory_gib(model, train, 0, compute_bytes, 0, fp32_residual=fp32_residual)
        - estimate_memory_gib(model, no_batch, 0, compute_bytes, 0)
        - logits
    )
    activations += cost.recorded_bytes / 2**30
    fsdp = fsdp_wraps_layers(cost, dims)
    buffers = cost.buffer_bytes / 2**30
    if precision.casts:
        # The gathered units are FSDP2's bf16 copies (`compute_copy_params` counts them); what stays in
        # fp32 is DDP's buckets, or FSDP2's whole gradients while micro-batches accumulate.
        copies = strategy.compute_copy_params(cost, train) * compute_bytes / 2**30
        fp32_extra = ((cost.grads - sharded if num_micro > 1 else 0) if fsdp else cost.buckets) * param_bytes
        parts = MemoryParts(static + fp32_extra / 2**30, activations, logits, buffers, copies)
        if num_micro == 1:  # the other candidate peak: every gradient made, autocast's copies freed
            after_backward = estimate_memory_gib(model, no_batch, sharded, param_bytes) + fp32_extra / 2**30
            gathered = copies if fsdp else 0.0
            if after_backward + gathered > parts.total:
                return MemoryParts(after_backward, 0.0, 0.0, 0.0, gathered)
        return parts
    extra_params = cost.buckets
    if fsdp:
        # Two layers gathered (the current one and the prefetched one), the root (embeddings, lm_head)
        # stays gathered, and accumulation keeps whole gradients until the last micro-batch.
        extra_params = 2 * cost.fsdp_unit + cost.fsdp_root + (cost.grads - sharded if num_micro > 1 else 0)
    parts = MemoryParts(static + extra_params * param_bytes / 2**30, activations, logits, buffers)
    if num_micro == 1:  # the other candidate peak: every gradient made, the activations freed
        after_backward = estimate_memory_gib(model, no_batch, sharded, param_bytes)
        after_backward += extra_params * param_bytes / 2**30
        if after_backward > parts.total:
            return MemoryParts(after_backward, 0.0, 0.0, 0.0)
    return parts


# ---- time ------------------------------------------------------------------------------------------
def memory_bound_scale(gpu: GpuKind) -> float:
    """How many times longer memory-bound work takes on `gpu` than on the kind the figures were measured on
    (CALIBRATED_ON): the ratio of their HBM bandwidths (1 there)."""
    return GPU_KINDS[CALIBRATED_ON].hbm_bytes_per_s / gpu.hbm_bytes_per_s


def compute_seconds(
    model: ModelConfig,
    train: TrainConfig,
    dims: ParallelDims,
    cost: StepCost,
    gpu: GpuKind,
    cal: Calibration,
    *,
    precision: Precision,
    hf_experts: bool = False,
) -> float:
    """Busy and idle GPU time of one optimizer step on one rank, without communication. `hf_experts`: the
    experts run as transformers' own module (every strategy but ep), not as the dispatch's grouped GEMM.
    The passes over the parameters (optimizer, accumulation) move `precision`'s weight bytes; under `mixed`
    the casts between fp32 weights and bf16 compute are added (`cast_seconds`).

    The figures were measured on CALIBRATED_ON; on another kind the FLOP terms run at the same share of its
    peak (the efficiencies carry over: the same kernels on the same tensor cores for the H100, an assumption
    for other architectures), the memory-bound terms (per token and layer, the loss, transformers' experts,
    ep's dispatch, the optimizer and accumulation passes) scale by its HBM bandwidth, and the idle time per
    layer and micro-batch (launch gaps, host syncs: the host sets it) carries over unchanged.

    The chunked loss (train.loss_chunk_tokens) has no time term of its own: it runs the three GEMMs of the
    head at the same size class and one fused loss pass per chunk, as the compiled loss does (6 bytes per
    logit); what it adds, zeroing and rescaling the head's weight gradient (3 passes over vocab × hidden
    per micro-batch, 1.9 GB for Qwen3), is about 0.5 ms on an H200 against a micro-batch of 4,096 tokens
    in 45 ms, below what the model resolves (BENCHMARKS.md predicted −0.3 % for it). Its memory is counted
    (`predict_memory`)."""
    layers, hidden, tp = model.num_layers, model.hidden_size, dims.tp
    tokens = train.micro_batch * train.seq_len
    num_micro = train.global_batch // (train.micro_batch * dims.dp)
    full_checkpointing = checkpointing_mode(train.activation_checkpointing) == "full"
    q_width, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    projections = 2 * hidden * (q_width + kv_width) / tp + model.num_experts * hidden
    recompute = 4 / 3 if full_checkpointing else 1.0  # one more forward of every layer
    # Each local expert's GEMM gets the rows of its ep group's tokens; tp narrows each GEMM.
    rows_per_expert = tokens * model.top_k * dims.ep / model.num_experts / tp
    grouped = cal.grouped_gemm_max * rows_per_expert / (rows_per_expert + cal.grouped_gemm_half_rows)
    dense_flops = 6 * tokens * layers * projections
    lm_head_flops = 6 * tokens * model.vocab_size * hidden
    attention_flops = 12 * layers * model.num_heads / tp * model.head_dim * train.seq_len * tokens
    expert_flops = 6 * tokens * layers * model.top_k * 3 * hidden * model.moe_intermediate_size / tp
    flop_seconds = (
        (dense_flops * recompute + lm_head_flops) / cal.dense_gemm
        + attention_flops * recompute / cal.attention
        + expert_flops * recompute / grouped
    ) / gpu.peak_flops
    per_token_layer = (
        cal.seconds_per_token_layer_compiled if train.compile else cal.seconds_per_token_layer_eager
    )
    if hf_experts:
        per_token_layer += cal.seconds_per_token_layer_hf_experts
    per_token_loss = (
        cal.seconds_per_token_loss_compiled if train.compile else cal.seconds_per_token_loss_eager
    )
    slower = memory_bound_scale(gpu)
    memory_bound = tokens * (layers * per_token_layer * recompute + per_token_loss) * slower
    per_micro_batch = flop_seconds + memory_bound + layers * cal.seconds_per_layer_sync
    sharded, whole_grads = cost.params, cost.grads
    states = 2 if train.optimizer == "adamw" else (1 if train.momentum else 0)
    # Optimizer: read weights and gradients, write weights, read and write each state; one more read of
    # the gradients for the norm and finiteness check. Accumulation: read, add, write the gradients.
    streamed = sharded * (4 + 2 * states) + (num_micro - 1) * whole_grads * 3
    dispatch = dispatch_seconds(train, cost, cal, gpu)
    seconds = num_micro * per_micro_batch + streamed * precision.param_bytes / gpu.hbm_bytes_per_s + dispatch
    if precision.casts:
        seconds += cast_seconds(train, dims, cost, gpu, precision)
    return seconds


def cast_seconds(
    train: TrainConfig, dims: ParallelDims, cost: StepCost, gpu: GpuKind, precision: Precision
) -> float:
    """Under `mixed`, the casts between the fp32 weights and the bf16 compute per step, at the achieved HBM
    bandwidth: each micro-batch casts the weights it computes with to bf16 (read 4, write 2 bytes each:
    autocast every weight the rank holds in its forward, and again in the recompute under full
    checkpointing; FSDP2 its shards before each gather, forward and backward) and their gradients back to
    fp32 (read 2, write or accumulate 4: every gradient the rank makes, whole under FSDP2). 0 where nothing
    is cast. Uncalibrated: no mixed GPU run yet."""
    if not precision.casts:
        return 0.0
    num_micro = train.global_batch // (train.micro_batch * dims.dp)
    full_checkpointing = checkpointing_mode(train.activation_checkpointing) == "full"
    weight_casts = cost.params * (2 if fsdp_wraps_layers(cost, dims) or full_checkpointing else 1)
    cast_bytes = (weight_casts + cost.grads) * (precision.param_bytes + precision.compute_bytes)
    return num_micro * cast_bytes / gpu.hbm_bytes_per_s


def dispatch_seconds(train: TrainConfig, cost: StepCost, cal: Calibration, gpu: GpuKind) -> float:
    """The dispatch's GPU time per step beyond one GPU's (index building, gathers, the gather-reduce of a
    row's pairs, the combine, the host sync), at the fitted `ep_dispatch_seconds_per_pair` for every
    (token, chosen expert) pair whose rows cross ranks, of every layer and micro-batch; recomputed with
    the layer under full checkpointing like the other per-token work, and scaled by HBM bandwidth like
    it (gathers and index kernels are memory-bound). Part of compute_seconds."""
    recompute = 4 / 3 if checkpointing_mode(train.activation_checkpointing) == "full" else 1.0
    return cost.dispatch_pairs * cal.ep_dispatch_seconds_per_pair * recompute * memory_bound_scale(gpu)


def collective_seconds(collective: Collective, gpu: GpuKind, cal: Calibration) -> float:
    """The seconds of one step that wait for `collective`: its transfer over NVLink within a node or the
    network between nodes, times the share its exposure class leaves exposed."""
    if collective.group == 1:
        return 0.0
    if collective.exposure is Exposure.ALL_TO_ALL:
        # The bandwidth the exchange reached on CALIBRATED_ON's NVLink, scaled by this kind's NVLink.
        nvlink = gpu.allreduce_bytes_per_s / GPU_KINDS[CALIBRATED_ON].allreduce_bytes_per_s
        bandwidth = cal.all_to_all_bytes_per_s * nvlink
        if collective.spans_nodes:  # the network at the share of its bandwidth the exchange reaches on NVLink
            bandwidth *= gpu.network_bytes_per_s / gpu.allreduce_bytes_per_s
        return collective.bytes_sent / bandwidth
    link = gpu.network_bytes_per_s if collective.spans_nodes else gpu.allreduce_bytes_per_s
    seconds = collective.bytes_sent / link
    if collective.exposure is Exposure.BUCKETED:
        return seconds * (1 - cal.ddp_overlap)
    if collective.exposure is Exposure.SHARDED:
        return seconds * cal.fsdp_exposure
    if collective.exposure is Exposure.ACTIVATIONS:
        return seconds * (1 - cal.tp_overlap)
    return seconds


def comm_seconds(cost: StepCost, gpu: GpuKind, cal: Calibration) -> dict[str, float]:
    """Exposed communication per step on one rank, by collective name."""
    out: dict[str, float] = {}
    for collective in cost.collectives:
        out[collective.name] = out.get(collective.name, 0.0) + collective_seconds(collective, gpu, cal)
    return {name: seconds for name, seconds in out.items() if seconds > 0}


def collective_bytes(strategy: Strategy, train: TrainConfig, name: str, nodes: int = 1) -> float:
    """Bytes one rank sends per optimizer step in the strategy's collectives called `name` (ep's
    "all-to-all" is summary.json's `a2a_bytes_per_step`), as the plan counts them."""
    planned_train = _as_planned(train)
    cost = strategy.step_cost(planned_train, strategy.dims.world_size // nodes, plan_precision(planned_train))
    return sum((c.bytes_sent for c in (cost.collectives if cost else ()) if c.name == name), 0.0)


def predict(
    strategy: Strategy,
    train: TrainConfig,
    gpu: str = "h200",
    nodes: int = 1,
    cal: Calibration = CALIBRATION,
) -> Prediction:
    """Predicted tokens/s per GPU, peak memory per GPU and MFU of a checked strategy (its model, degrees
    and options) on `nodes` nodes of GPU kind `gpu`, in the run's precision (`plan_precision`: `auto` is
    `mixed`). Raises ValueError where the plan cannot predict: a strategy without a cost model, a batch its
    data-parallel ranks cannot split, fp32 compute."""
    kind, model, dims = GPU_KINDS[gpu], strategy.model_config, strategy.dims
    train = _as_planned(train)
    precision = plan_precision(train)
    problem = batch_problem(train, dims)
    if problem:
        raise ValueError(problem)
    cost = strategy.step_cost(train, dims.world_size // nodes, precision)
    if cost is None:
        raise ValueError(f"{strategy.name} has no cost model")
    hf_experts = not strategy.grouped_experts
    compute = compute_seconds(model, train, dims, cost, kind, cal, precision=precision, hf_experts=hf_experts)
    comm = comm_seconds(cost, kind, cal)
    step = compute + sum(comm.values())
    tokens_per_s = train.global_batch * train.seq_len / step / dims.world_size
    memory = predict_memory(strategy, train, cost, precision)
    mfu = flops_per_token(model, train.seq_len) * tokens_per_s / kind.peak_flops
    dispatch = dispatch_seconds(train, cost, cal, kind)
    casts = cast_seconds(train, dims, cost, kind, precision)
    exposed = sum(comm.values())
    return Prediction(
        tokens_per_s, memory.total, mfu, step, compute, exposed, memory, comm, dispatch, casts, precision.name
    )


def run_prediction(cfg: RunConfig, strategy: Strategy) -> dict[str, float | str | bool] | None:
    """`moectl plan`'s prediction for a run about to train with `strategy` (its own degrees and options) in
    its precision, for summary.json, so every GPU run checks the plan's model. None where the plan has no
    figures: a CPU run, an unknown GPU, fp32 compute, layers far smaller than the calibrated ones
    (launch-bound), a strategy without a cost model. `calibrated`: whether measured runs on this GPU kind
    and in this precision check the model."""
    if not runtime.uses_gpu(cfg.train):
        return None
    kind = gpu_kind_for_device(torch.cuda.get_device_name())
    if kind is None or cfg.model.hidden_size < SMALLEST_CALIBRATED_HIDDEN:
        return None
    try:
        prediction = predict(strategy, cfg.train, kind, cfg.parallel.nnodes)
    except ValueError:
        return None
    return {
        "gpu": kind,
        "precision": prediction.precision,
        "calibrated": is_calibrated(kind) and precision_calibrated(prediction.precision),
        "tokens_per_s_per_device": prediction.tokens_per_s_per_gpu,
        "peak_mem_gib": prediction.peak_mem_gib,
        "mfu": prediction.mfu,
    }


def gpu_kind_for_device(device_name: str) -> str | None:
    """'h200' for "NVIDIA H200", 'h100' for "NVIDIA H100 80GB HBM3" (the names torch reports); None for a
    GPU the model has no figures for, a variant of a known chip included (H100 PCIe, A100 40GB: other
    peaks, bandwidths or memory)."""
    return next((key for key, kind in GPU_KINDS.items() if device_name in kind.device_names), None)


def run_config(run: MeasuredRun) -> tuple[TrainConfig, Strategy]:
    """The training settings and the strategy (model, degrees) of one measured run (moectl/plan/calibration.py)."""
    train = {
        **run.train,
        "precision": run.precision,
        "seq_len": run.seq_len,
        "global_batch": run.global_batch,
    }
    cfg = build_config("qwen3-30b-a3b", {"model": dict(run.model), "train": train})
    layout = Layout(run.world, tp_size=run.tp, ep_size=run.ep)
    train = planned(cfg.train, run.micro_batch, run.activation_checkpointing, run.compile)
    return train, layout_strategy(cfg.model, run.strategy, layout)
