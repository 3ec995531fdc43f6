"""`moectl plan`: predict every parallel layout's speed and memory before running any, from a small model.

Memory is the dry-run's estimate (`moectl.model.sizing.estimate_memory_gib`, fitted to H200 peaks) with the
parameters each rank holds and the gradients alive at the peak, plus the buffers a strategy adds: ep's
exchange buffers (and under checkpointing the rows each layer records for its recompute), DDP's gradient
buckets, FSDP's unsharded gradients under accumulation and its gathered layers.

Time per optimizer step on one GPU is compute plus the communication the step waits for:

- compute: the step's FLOPs per kernel class (dense GEMMs, flash attention, the experts' grouped GEMM)
  over an achieved efficiency measured on H200s, plus memory-bound work per token and layer, the loss
  per token, the GPU's idle time per layer and micro-batch, ep's dispatch work per (token, expert) pair
  when tokens cross ranks, and the passes over the parameters (gradient accumulation, optimizer step) at
  the achieved HBM bandwidth;
- communication: the bytes ep's exchanges send (each token once to every other rank that holds one of
  its experts), gathers and reduce-scatters (fsdp), activation all-reduces (tp), gradient reductions
  (ddp, ep's replicated part), each over NVLink within a node and the network between nodes, times the
  share each strategy leaves exposed (moectl/plan/calibration.py says what was measured and what was fitted).

Nothing here starts a process group or needs a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import comb

from moectl.config import ModelConfig, ParallelConfig, TrainConfig, build_config, checkpointing_mode
from moectl.errors import UsageError
from moectl.model.sizing import count_params, estimate_memory_gib, flops_per_token
from moectl.plan.calibration import CALIBRATION, GPU_KINDS, Calibration, GpuKind, MeasuredRun
from moectl.registry import get_strategy

STRATEGIES = ("single", "ddp", "fsdp", "tp", "mixed", "ep")
#: Left free on each GPU beyond the predicted peak: CUDA context, NCCL buffers, allocator fragmentation
#: (torch's peak counts none of them). Not measured: the largest run peaked at 120 GiB of 139.8.
HEADROOM_GIB = 6.0
#: Below this hidden size layers are launch-bound and the calibrated figures do not apply.
SMALLEST_CALIBRATED_HIDDEN = 1024
BYTES_PER_PARAM = 2  # bf16 weights, gradients and optimizer state, as runs on GPUs hold them


@dataclass(frozen=True)
class Layout:
    """One way to run: world = dp × tp; ep groups consecutive ranks inside dp (every ep rank reads its own data)."""

    strategy: str
    dp: int = 1
    tp: int = 1
    ep: int = 1
    ep_fsdp: bool = False  # ep: dense part and expert replicas sharded with FSDP2
    mixed_dp: str = "fsdp"  # mixed: what runs over dp
    micro_batch: int = 1
    activation_checkpointing: bool = False
    compile: bool = True

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def label(self) -> str:
        name = {"ep": "ep+fsdp" if self.ep_fsdp else "ep", "mixed": f"mixed/{self.mixed_dp}"}
        return name.get(self.strategy, self.strategy)


@dataclass(frozen=True)
class MemoryParts:
    weights_and_optimizer: float  # GiB: weights, gradients, optimizer state (and the strategy's copies)
    activations: float
    logits: float
    buffers: float  # ep's exchange buffers

    @property
    def total(self) -> float:
        return self.weights_and_optimizer + self.activations + self.logits + self.buffers


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
    ep_dispatch_s: float = 0.0  # of compute_s: ep's dispatch work when tokens cross ranks


# ---- the rules a layout must satisfy --------------------------------------------------------------
def parallel_config(layout: Layout) -> ParallelConfig:
    """The `parallel` section of the `moectl train` config that runs `layout`."""
    return ParallelConfig(
        strategy=layout.strategy,
        nproc=layout.world,
        dp_size=layout.dp if layout.strategy == "mixed" else None,
        tp_size=layout.tp,
        ep_size=layout.ep,
        fsdp=layout.ep_fsdp,
        mixed_dp=layout.mixed_dp,
    )


def layout_problem(model: ModelConfig, global_batch: int, layout: Layout, num_gpus: int) -> str | None:
    """The first rule the layout breaks, naming the numbers; None when it is allowed.

    The degree rules are the ones `moectl train` applies (each strategy's `parallel_dims`, then
    `ParallelDims.check`); plan adds only what it will not offer (mixed with dp 1 is `tp`)."""
    if layout.strategy not in STRATEGIES:
        return f"unknown strategy {layout.strategy!r}; one of {', '.join(STRATEGIES)}"
    if layout.world != num_gpus:
        return f"dp {layout.dp} × tp {layout.tp} = {layout.world} must equal the {num_gpus} GPUs"
    if layout.strategy == "mixed" and layout.dp < 2:
        return f"mixed needs dp ≥ 2 and tp ≥ 2 (got dp {layout.dp}, tp {layout.tp}); use tp or fsdp"
    strategy_cls = get_strategy(layout.strategy)
    try:
        dims = strategy_cls.parallel_dims(parallel_config(layout), num_gpus)
        dims.check(model, layout.strategy)
    except UsageError as exc:
        return str(exc)
    if (dims.dp, dims.tp, dims.ep) != (layout.dp, layout.tp, layout.ep):
        return f"{layout.strategy} runs dp {dims.dp} × tp {dims.tp}, ep {dims.ep} on {num_gpus} GPUs, not this layout"
    per_step = layout.micro_batch * layout.dp
    if global_batch % per_step:
        return f"global batch {global_batch} must be divisible by micro-batch {layout.micro_batch} × dp {layout.dp} = {per_step}"
    return None


# ---- ep's exchange ------------------------------------------------------------------------------------
#: Bytes that travel with each of a row's top-k choices: its local expert id (int32) and router weight
#: (the fp32 bits), one int32 tensor; in backward each weight's gradient (bf16).
CHOICE_BYTES, CHOICE_GRAD_BYTES = 8, BYTES_PER_PARAM


def ranks_per_token(num_experts: int, top_k: int, ep: int) -> float:
    """Expected distinct ranks among a token's top_k experts, experts chosen uniformly without repeats
    (1.99 / 3.63 / 5.34 of 2 / 4 / 8 ranks for Qwen3-30B-A3B's 8 of 128)."""
    local = num_experts // ep
    return ep * (1 - comb(num_experts - local, top_k) / comb(num_experts, top_k))


def exchange_rows(model: ModelConfig, tokens: int, ep: int) -> float:
    """Rows one rank sends to other ranks per MoE layer and micro-batch: each token goes once to every rank
    holding one of its experts, its own rank among them with probability ranks / ep."""
    if ep == 1:
        return 0.0
    return tokens * ranks_per_token(model.num_experts, model.top_k, ep) * (ep - 1) / ep


def exchange_bytes(model: ModelConfig, tokens: int, ep: int) -> float:
    """Bytes one rank sends to other ranks per MoE layer and micro-batch, forward and backward, as
    summary.json's `a2a_bytes_per_step` counts them: the rows with their choices, the rows back, and in
    backward the returned rows' gradients and the rows' and weights' gradients."""
    row = model.hidden_size * BYTES_PER_PARAM
    per_row = (row + model.top_k * CHOICE_BYTES) + row + row + (row + model.top_k * CHOICE_GRAD_BYTES)
    return exchange_rows(model, tokens, ep) * per_row


def a2a_bytes_per_step(model: ModelConfig, train: TrainConfig, layout: Layout) -> float:
    """Bytes one rank sends in ep's exchanges per optimizer step: summary.json's `a2a_bytes_per_step`."""
    if layout.strategy != "ep":
        return 0.0
    num_micro = train.global_batch // (layout.micro_batch * layout.dp)
    return num_micro * model.num_layers * exchange_bytes(model, layout.micro_batch * train.seq_len, layout.ep)


# ---- memory -----------------------------------------------------------------------------------------
def _params(model: ModelConfig, layout: Layout) -> tuple[float, float, float]:
    """(parameters each rank holds sharded, parameters whose gradients it holds whole when it accumulates
    micro-batches, parameters of one FSDP unit gathered whole); as strategies/*.py count them."""
    counts = count_params(model)
    q_width, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    tp_sharded = model.num_layers * 2 * model.hidden_size * (q_width + kv_width) + counts.experts
    per_tp_rank = counts.total - tp_sharded + tp_sharded / layout.tp
    layer = (counts.total - counts.embedding) / model.num_layers
    world = layout.world
    if layout.strategy in ("single", "ddp"):
        return counts.total, counts.total, 0.0
    if layout.strategy == "fsdp":
        return counts.total / world, counts.total, layer
    if layout.strategy == "tp" or (layout.strategy == "mixed" and layout.mixed_dp == "ddp"):
        return per_tp_rank, per_tp_rank, 0.0
    if layout.strategy == "mixed":
        return per_tp_rank / layout.dp, per_tp_rank, layer / layout.tp
    held = counts.dense + counts.experts / layout.ep
    if layout.ep_fsdp:
        return counts.total / world, held, layer / layout.ep
    return held, held, 0.0


def predict_memory(model: ModelConfig, train: TrainConfig, layout: Layout) -> MemoryParts:
    """Peak GiB per GPU, split into what the dry-run's estimate sizes and what the strategy adds."""
    train = _train_for(train, layout)
    counts = count_params(model)
    sharded, whole_grads, gathered_unit = _params(model, layout)
    num_micro = train.global_batch // (layout.micro_batch * layout.dp)
    grads = sharded
    if num_micro == 1:
        # Gradients are freed after every step (zero_grad(set_to_none=True)), so with one micro-batch none
        # exists at the end of the forward, where activations peak, but the head's: made in forward by the
        # chunked loss (whose term in the estimate counts it), or in the loss's backward while the logits'
        # gradient is alive. (Accumulating, the earlier micro-batches' gradients are all alive.)
        head = counts.embedding * sharded / counts.total if gathered_unit else counts.embedding
        grads = 0.0 if train.loss_chunk_tokens > 0 else head
    no_batch = dataclasses.replace(train, micro_batch=0)
    static = estimate_memory_gib(model, no_batch, sharded, BYTES_PER_PARAM, grads)
    no_layers = dataclasses.replace(model, num_layers=0)
    logits = estimate_memory_gib(no_layers, train, 0, BYTES_PER_PARAM)
    activations = estimate_memory_gib(model, train, sharded, BYTES_PER_PARAM, grads) - static - logits
    extra_params = 0.0
    if layout.strategy == "ddp" and layout.world > 1:
        extra_params = whole_grads  # DDP's gradient buckets are a second copy of the gradients
    if gathered_unit and layout.dp > 1:
        embedding = counts.embedding / layout.tp
        # Two layers gathered (the current one and the prefetched one), the root (embeddings, lm_head)
        # stays gathered, and accumulation keeps whole gradients until the last micro-batch.
        extra_params = 2 * gathered_unit + embedding + (whole_grads - sharded if num_micro > 1 else 0)
    buffers = 0.0
    if layout.strategy == "ep" and layout.ep > 1:
        tokens = layout.micro_batch * train.seq_len
        rows = tokens * ranks_per_token(model.num_experts, model.top_k, layout.ep)
        # One layer's exchange buffers at their fullest, when the expert rank starts the return trip: the
        # rows sent (with their choices) and received (with theirs), the expert rank's results for them,
        # and the buffer the returned rows land in.
        row = model.hidden_size * BYTES_PER_PARAM
        buffers = 4 * rows * row + 2 * rows * model.top_k * CHOICE_BYTES
        if layout.activation_checkpointing:
            # Each layer records what it received (rows, weights, expert ids) for its recompute to replay.
            recorded = model.hidden_size * BYTES_PER_PARAM + model.top_k * (BYTES_PER_PARAM + 4)
            activations += model.num_layers * rows * recorded / 2**30
    parts = MemoryParts(static + extra_params * BYTES_PER_PARAM / 2**30, activations, logits, buffers / 2**30)
    if num_micro == 1:  # the other candidate peak: every gradient made, the activations freed
        after_backward = estimate_memory_gib(model, no_batch, sharded, BYTES_PER_PARAM)
        after_backward += extra_params * BYTES_PER_PARAM / 2**30
        if after_backward > parts.total:
            return MemoryParts(after_backward, 0.0, 0.0, 0.0)
    return parts


# ---- time ------------------------------------------------------------------------------------------
def _link(gpu: GpuKind, group: int, spans_nodes: bool) -> float:
    return 0.0 if group == 1 else (gpu.network_bytes_per_s if spans_nodes else gpu.allreduce_bytes_per_s)


def compute_seconds(
    model: ModelConfig, train: TrainConfig, layout: Layout, gpu: GpuKind, cal: Calibration
) -> float:
    """Busy and idle GPU time of one optimizer step on one rank, without communication."""
    train = _train_for(train, layout)
    layers, hidden, tp = model.num_layers, model.hidden_size, layout.tp
    tokens = layout.micro_batch * train.seq_len
    num_micro = train.global_batch // (layout.micro_batch * layout.dp)
    q_width, kv_width = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    projections = 2 * hidden * (q_width + kv_width) / tp + model.num_experts * hidden
    recompute = 4 / 3 if layout.activation_checkpointing else 1.0  # one more forward of every layer
    rows_per_expert = tokens * model.top_k * layout.ep / model.num_experts / tp  # tp narrows each GEMM
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
        cal.seconds_per_token_layer_compiled if layout.compile else cal.seconds_per_token_layer_eager
    )
    per_token_loss = (
        cal.seconds_per_token_loss_compiled if layout.compile else cal.seconds_per_token_loss_eager
    )
    memory_bound = tokens * (layers * per_token_layer * recompute + per_token_loss)
    per_micro_batch = flop_seconds + memory_bound + layers * cal.seconds_per_layer_sync
    sharded, whole_grads, _ = _params(model, layout)
    states = 2 if train.optimizer == "adamw" else (1 if train.momentum else 0)
    # Optimizer: read weights and gradients, write weights, read and write each state; one more read of
    # the gradients for the norm and finiteness check. Accumulation: read, add, write the gradients.
    streamed = sharded * (4 + 2 * states) + (num_micro - 1) * whole_grads * 3
    dispatch = ep_dispatch_seconds(model, train, layout, cal)
    return num_micro * per_micro_batch + streamed * BYTES_PER_PARAM / gpu.hbm_bytes_per_s + dispatch


def ep_dispatch_seconds(model: ModelConfig, train: TrainConfig, layout: Layout, cal: Calibration) -> float:
    """ep > 1: the dispatch's GPU time per step beyond one GPU's (index building, gathers, the gather-reduce
    of a row's pairs, the combine, the host sync), at the fitted `ep_dispatch_seconds_per_pair` for every
    (token, chosen expert) pair of every layer and micro-batch; recomputed with the layer under full
    checkpointing like the other per-token work. Part of compute_seconds."""
    if layout.strategy != "ep" or layout.ep == 1:
        return 0.0
    train = _train_for(train, layout)
    num_micro = train.global_batch // (layout.micro_batch * layout.dp)
    pairs = layout.micro_batch * train.seq_len * model.top_k
    recompute = 4 / 3 if layout.activation_checkpointing else 1.0
    return num_micro * model.num_layers * pairs * cal.ep_dispatch_seconds_per_pair * recompute


def comm_seconds(
    model: ModelConfig, train: TrainConfig, layout: Layout, gpu: GpuKind, nodes: int, cal: Calibration
) -> dict[str, float]:
    """Exposed communication per step on one rank, by collective. Groups of consecutive ranks (tp, ep)
    stay on NVLink while they fit in a node; strided ones (dp, ep replicas) cross nodes when there are several."""
    train = _train_for(train, layout)
    world, dp, tp, ep = layout.world, layout.dp, layout.tp, layout.ep
    counts = count_params(model)
    num_micro = train.global_batch // (layout.micro_batch * dp)
    tokens = layout.micro_batch * train.seq_len
    across_nodes, gpus_per_node = nodes > 1, world // nodes
    _, whole_grads, _ = _params(model, layout)
    nbytes = BYTES_PER_PARAM
    out: dict[str, float] = {}

    def ring(group: int) -> float:  # bytes each rank sends per byte of an all-reduce
        return 2 * (group - 1) / group

    def gather_and_scatter(params: float, group: int, spans: bool) -> float:
        """FSDP: a gather in forward and one in backward per micro-batch, one reduce-scatter per step."""
        link = _link(gpu, group, spans)
        if not link:
            return 0.0
        return (2 * num_micro + 1) * params * nbytes * (group - 1) / group / link * cal.fsdp_exposure

    if layout.strategy == "ddp" and world > 1:
        link = _link(gpu, world, across_nodes)
        out["gradient all-reduce"] = whole_grads * nbytes * ring(world) / link * (1 - cal.ddp_overlap)
    if layout.strategy == "fsdp":
        out["fsdp gather/scatter"] = gather_and_scatter(counts.total, world, across_nodes)
    if layout.strategy in ("tp", "mixed") and tp > 1:
        link = _link(gpu, tp, tp > gpus_per_node)
        activation = tokens * model.hidden_size * nbytes * ring(tp)
        out["tp all-reduce"] = num_micro * model.num_layers * 4 * activation / link * (1 - cal.tp_overlap)
    if layout.strategy == "mixed" and dp > 1:
        if layout.mixed_dp == "fsdp":
            out["fsdp gather/scatter"] = gather_and_scatter(whole_grads, dp, across_nodes)
        else:
            out["gradient all-reduce"] = whole_grads * nbytes * ring(dp) / _link(gpu, dp, across_nodes)
    if layout.strategy == "ep" and world > 1:
        ep_spans = ep > gpus_per_node
        if ep > 1:
            # Dispatch and return, forward and backward: each token once to every other rank that holds one
            # of its experts (with its choices), one row back per (token, rank); nothing overlaps.
            sent = a2a_bytes_per_step(model, train, layout)
            a2a = cal.all_to_all_bytes_per_s
            if ep_spans:  # the network at the share of its bandwidth the exchange reaches on NVLink
                a2a *= gpu.network_bytes_per_s / gpu.allreduce_bytes_per_s
            out["all-to-all"] = sent / a2a
        replicas = world // ep
        if layout.ep_fsdp:
            out["fsdp gather/scatter"] = gather_and_scatter(counts.dense, world, across_nodes)
            out["fsdp gather/scatter"] += gather_and_scatter(counts.experts / ep, replicas, across_nodes)
        else:  # by hand after backward: nothing left to overlap with
            link = _link(gpu, world, across_nodes)
            out["gradient all-reduce"] = counts.dense * nbytes * ring(world) / link
            if replicas > 1:
                link = _link(gpu, replicas, across_nodes)
                out["gradient all-reduce"] += counts.experts / ep * nbytes * ring(replicas) / link
    return {name: seconds for name, seconds in out.items() if seconds > 0}


def predict(
    model: ModelConfig,
    train: TrainConfig,
    layout: Layout,
    gpu: str = "h200",
    num_gpus: int | None = None,
    nodes: int = 1,
    cal: Calibration = CALIBRATION,
) -> Prediction:
    """Predicted tokens/s per GPU, peak memory per GPU and MFU of one layout, for bf16 weights (what GPU
    runs hold). `num_gpus` is the world (all nodes); it defaults to the layout's. Raises ValueError for a
    layout `layout_problem` rejects (a plugin strategy among them)."""
    kind = GPU_KINDS[gpu]
    num_gpus = num_gpus or layout.world
    problem = layout_problem(model, train.global_batch, layout, num_gpus)
    if problem:
        raise ValueError(problem)
    compute = compute_seconds(model, train, layout, kind, cal)
    comm = comm_seconds(model, train, layout, kind, nodes, cal)
    step = compute + sum(comm.values())
    tokens_per_s = train.global_batch * train.seq_len / step / num_gpus
    memory = predict_memory(model, train, layout)
    mfu = flops_per_token(model, train.seq_len) * tokens_per_s / kind.peak_flops
    dispatch = ep_dispatch_seconds(model, train, layout, cal)
    exposed = sum(comm.values())
    return Prediction(tokens_per_s, memory.total, mfu, step, compute, exposed, memory, comm, dispatch)


def layout_from_config(parallel: ParallelConfig, train: TrainConfig, world_size: int) -> Layout:
    """The layout a `moectl train` config runs, for `predict` (what the training loop can call)."""
    tp = parallel.tp_size if parallel.strategy in ("tp", "mixed") else 1
    return Layout(
        strategy=parallel.strategy,
        dp=world_size // tp,
        tp=tp,
        ep=parallel.ep_size if parallel.strategy == "ep" else 1,
        ep_fsdp=parallel.strategy == "ep" and parallel.fsdp,
        mixed_dp=parallel.mixed_dp,
        micro_batch=train.micro_batch,
        # The plan has time figures for full checkpointing only; a selective run is planned as one without.
        activation_checkpointing=checkpointing_mode(train.activation_checkpointing) == "full",
        compile=train.compile,
    )


def gpu_kind_for_device(device_name: str) -> str | None:
    """'h200' for "NVIDIA H200" and the like; None for a GPU the model has no figures for."""
    name = device_name.upper()
    return next((key for key, kind in GPU_KINDS.items() if kind.name.upper() in name), None)


def _train_for(train: TrainConfig, layout: Layout) -> TrainConfig:
    selective = checkpointing_mode(train.activation_checkpointing) == "selective" and layout.compile
    return dataclasses.replace(
        train,
        micro_batch=layout.micro_batch,
        # selective (compiled) changes memory, not the layout: the estimate sizes it
        activation_checkpointing="full"
        if layout.activation_checkpointing
        else ("selective" if selective else "none"),
        compile=layout.compile,
    )


def run_config(run: MeasuredRun) -> tuple[ModelConfig, TrainConfig, Layout]:
    """The model, training settings and layout of one measured run (moectl/plan/calibration.py)."""
    train = {**run.train, "seq_len": run.seq_len, "global_batch": run.global_batch}
    cfg = build_config("qwen3-30b-a3b", {"model": dict(run.model), "train": train})
    layout = Layout(
        run.strategy, run.world // run.tp, run.tp, run.ep, micro_batch=run.micro_batch,
        activation_checkpointing=run.activation_checkpointing, compile=run.compile,
    )  # fmt: skip
    return cfg.model, cfg.train, layout
