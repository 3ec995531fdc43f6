"""`moectl plan`'s table: every layout of a machine predicted by moectl/plan/predict.py, ranked, with the
`moectl train` command that runs it, what does not fit (and, where nothing does, what would), and the
degrees the model forbids."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from moectl.config import (
    MAX_NODES,
    MAX_PROCESSES_PER_NODE,
    ModelConfig,
    RunConfig,
    TrainConfig,
    build_config,
    checkpointing_mode,
    merge_overrides,
    parse_set_option,
)
from moectl.errors import UsageError
from moectl.model.sizing import FP32_RESIDUAL_BYTES
from moectl.plan.calibration import (
    CALIBRATED_ON,
    CALIBRATION,
    GPU_KINDS,
    Calibration,
    is_calibrated,
    precision_calibrated,
)
from moectl.plan.predict import (
    HEADROOM_GIB,
    LOSS_CHUNK_TOKENS,
    SMALLEST_CALIBRATED_HIDDEN,
    Prediction,
    batch_problem,
    layout_strategy,
    plan_precision,
    planned,
    predict,
)
from moectl.registry import available_strategies, get_strategy, option_owners
from moectl.strategy import Layout, Strategy
from moectl.tables import Column, output_console, show_table

MICRO_BATCHES = (1, 2, 4, 8, 16)
#: the most memory per GPU --gpu-mem takes, in GiB (far beyond any GPU)
MAX_GPU_MEM_GIB = 100_000
#: GPUs per node a plan where nothing fits tries, doubling up to it, before more nodes (one HGX node)
GPUS_PER_NODE_TRIED = 8
#: What `mixed` adds that no measured run checks yet, for the notes and --json
MIXED_UNCALIBRATED = (
    "mixed precision: uncalibrated (no mixed GPU run yet): its time terms (fp32 gradient reductions, the "
    "optimizer's pass over fp32 state, the casts of weights to bf16 and of gradients back) and its fp32 "
    f"residual stream outside FSDP ({FP32_RESIDUAL_BYTES} bytes per token, layer and hidden unit more "
    "activations, measured on the CPU) are the model's assumptions until mixed GPU runs refit them"
)


@dataclass(frozen=True)
class PlannedLayout:
    """A strategy's layout as plan shows it, with the training settings plan varies."""

    strategy: str
    label: str  # the strategy with its options (`ep+fsdp`, `mixed/ddp`)
    dp: int | None  # None: the strategy refused the degrees before stating them
    tp: int | None
    ep: int | None
    options: dict[str, Any] = field(default_factory=dict)
    micro_batch: int = 1
    activation_checkpointing: bool = False
    compile: bool = True
    loss_chunk_tokens: int = 0  # train.loss_chunk_tokens: 0 keeps the whole logits


@dataclass(frozen=True)
class PlanRow:
    layout: PlannedLayout
    prediction: Prediction
    does_not_fit: str | None  # what exceeds the memory; None when it fits
    command: str


@dataclass(frozen=True)
class Plan:
    rows: list[PlanRow]  # fitting layouts fastest first, then the others smallest first
    forbidden: list[tuple[PlannedLayout, str]]  # layouts the model, the batch or the strategy rules out
    usable_gib: float
    no_cost_model: list[tuple[PlannedLayout, str]] = field(default_factory=list)  # with the command

    @property
    def fits(self) -> bool:
        return any(row.does_not_fit is None for row in self.rows)


@dataclass(frozen=True)
class Alternative:
    """A change with which a layout fits where none did, and the fastest layout that then fits."""

    change: str  # as the user makes it: "8 GPUs", "2 nodes", "--set train.optimizer=sgd"
    row: PlanRow


def layout_problem(model: ModelConfig, train: TrainConfig, strategy: str, layout: Layout) -> str | None:
    """The first rule `layout` of `strategy` breaks, naming the numbers; None when plan offers it: its
    degrees and options as `moectl train` checks them, the strategy's reason not to offer it (another
    strategy runs the same), the split of the global batch at `train.micro_batch`."""
    try:
        checked = layout_strategy(model, strategy, layout)
    except ValueError as exc:
        return str(exc)
    return checked.redundant() or batch_problem(train, checked.dims)


def _planned_layout(name: str, strategy_cls: type[Strategy], layout: Layout) -> PlannedLayout:
    """How plan shows `layout`: with the degrees the strategy states for it (also where the model's
    rules then refuse them; None where the strategy refuses them itself)."""
    try:
        dims = strategy_cls.parallel_dims(layout.apply(RunConfig()).parallel, layout.world_size)
        degrees = dims.dp, dims.tp, dims.ep
    except UsageError:
        degrees = None, None, None
    return PlannedLayout(name, layout.options.label(name), *degrees, layout.options.by_key())


def make_plan(
    model: ModelConfig,
    train: TrainConfig,
    config_name: str,
    gpu: str,
    gpus_per_node: int,
    nodes: int,
    gpu_mem_gib: float,
    sets: tuple[str, ...] = (),
    cal: Calibration = CALIBRATION,
) -> Plan:
    """Every registered strategy's layouts of the machine (micro-batch, checkpointing, compile and chunked
    loss variants of each) predicted; the ones it cannot run listed with the rule, the ones of a strategy
    without a cost model listed as such. Fitting rows rank fastest first; where two are predicted equally
    fast (the chunked loss has no time term), the one that holds less memory comes first."""
    num_gpus, usable = gpus_per_node * nodes, gpu_mem_gib - HEADROOM_GIB
    precision = plan_precision(train)
    rows, forbidden, no_cost_model = [], [], []
    chunks = sorted({0, train.loss_chunk_tokens or LOSS_CHUNK_TOKENS})
    for name in available_strategies():
        strategy_cls = get_strategy(name)
        for layout in strategy_cls.layouts(num_gpus, model):
            base = _planned_layout(name, strategy_cls, layout)
            try:
                strategy = layout_strategy(model, strategy_cls, layout)
            except ValueError as exc:
                forbidden.append((base, str(exc)))
                continue
            variants = [
                (dataclasses.replace(base, micro_batch=mb, activation_checkpointing=ac, compile=compiled,
                                     loss_chunk_tokens=chunk),
                 planned(train, mb, ac, compiled, chunk))
                for mb in MICRO_BATCHES
                for ac in (False, True)
                for compiled in (True, False)
                for chunk in chunks
            ]  # fmt: skip
            allowed = [(v, t) for v, t in variants if batch_problem(t, strategy.dims) is None]
            problem = strategy.redundant() or (
                None if allowed else batch_problem(dataclasses.replace(train, micro_batch=1), strategy.dims)
            )
            if problem:
                forbidden.append((base, problem))
                continue
            if strategy.step_cost(train, gpus_per_node, precision) is None:
                command = train_command(config_name, train, base, layout, gpus_per_node, nodes, sets)
                no_cost_model.append((base, command))
                continue
            for variant, variant_train in allowed:
                p = predict(strategy, variant_train, gpu, nodes, cal)
                why = None
                if p.peak_mem_gib > usable:
                    why = too_large(p, usable)
                    if precision.casts:  # what the fp32 master copy costs: whether pure bf16 would fit
                        bf16 = predict(
                            strategy, dataclasses.replace(variant_train, precision="bf16"), gpu, nodes, cal
                        )
                        if bf16.peak_mem_gib <= usable:
                            why += f"; under bf16 it fits ({bf16.peak_mem_gib:.1f} GiB)"
                command = train_command(config_name, train, variant, layout, gpus_per_node, nodes, sets)
                rows.append(PlanRow(variant, p, why, command))
    rows.sort(
        key=lambda r: (
            (1, r.prediction.peak_mem_gib, 0.0)
            if r.does_not_fit
            else (0, -r.prediction.tokens_per_s_per_gpu, r.prediction.peak_mem_gib)
        )
    )
    return Plan(rows, forbidden, usable, no_cost_model)


def too_large(p: Prediction, usable: float) -> str:
    """How far a prediction is over the usable memory, split into what holds it."""
    m = p.memory
    return (
        f"{p.peak_mem_gib:.1f} GiB > {usable:.1f} usable: weights + optimizer state "
        f"{m.weights_and_optimizer:.1f}"
        + (f", bf16 weight copies {m.compute_copies:.1f}" if m.compute_copies else "")
        + f", activations {m.activations:.1f}, logits {m.logits:.1f}"
        + (f", exchange buffers {m.buffers:.1f}" if m.buffers else "")
    )


def alternatives(
    model: ModelConfig,
    train: TrainConfig,
    config_name: str,
    gpu: str,
    gpus_per_node: int,
    nodes: int,
    gpu_mem_gib: float,
    sets: tuple[str, ...] = (),
    cal: Calibration = CALIBRATION,
) -> list[Alternative]:
    """Where no layout fits: the changes with which one would, each with its fastest fitting layout. More
    GPUs (doubling the GPUs per node up to `GPUS_PER_NODE_TRIED`, then the nodes, up to four times as
    many), plain SGD instead of AdamW or momentum (no optimizer state), pure bf16 instead of `mixed`; all
    of the last two at once where neither alone does. (Activation checkpointing, the chunked loss and
    every micro-batch are among the variants already tried.)"""
    found: list[Alternative] = []

    def fastest(change: str, train_: TrainConfig, per_node: int, nodes_: int, sets_: tuple[str, ...]) -> bool:
        plan = make_plan(model, train_, config_name, gpu, per_node, nodes_, gpu_mem_gib, sets_, cal)
        if plan.fits:
            found.append(Alternative(change, plan.rows[0]))
        return plan.fits

    machines = []
    per_node = gpus_per_node * 2
    while per_node <= max(GPUS_PER_NODE_TRIED, gpus_per_node):
        machines.append((per_node, nodes, f"{per_node} GPUs per node" if nodes > 1 else f"{per_node} GPUs"))
        per_node *= 2
    if gpus_per_node >= GPUS_PER_NODE_TRIED:
        machines += [(gpus_per_node, n, f"{n:,} nodes") for n in (2 * nodes, 4 * nodes) if n <= MAX_NODES]
    for per_node, nodes_, words in machines:
        if fastest(words, train, per_node, nodes_, sets):
            break
    lighter: list[tuple[dict[str, Any], tuple[str, ...]]] = []  # (train's changes, their --set items)
    if train.optimizer != "sgd" or train.momentum:
        sgd_sets = ("train.optimizer=sgd",) if train.optimizer != "sgd" else ()
        sgd_sets += ("train.momentum=0",) if train.momentum else ()
        lighter.append(({"optimizer": "sgd", "momentum": 0.0}, sgd_sets))
    if plan_precision(train).casts:
        lighter.append(({"precision": "bf16"}, ("train.precision=bf16",)))
    if len(lighter) > 1:  # both at once, where neither alone fits
        together = {key: value for changes, _ in lighter for key, value in changes.items()}
        lighter.append((together, tuple(item for _, items in lighter for item in items)))
    one_fits = False
    for number, (changes, more_sets) in enumerate(lighter):
        if number == 2 and one_fits:
            break
        change = " ".join(f"--set {item}" for item in more_sets)
        changed = dataclasses.replace(train, **changes)
        one_fits |= fastest(change, changed, gpus_per_node, nodes, (*sets, *more_sets))
    return found


def nothing_fits_line(plan: Plan, train: TrainConfig, machine: str, found: list[Alternative]) -> str:
    """One line: nothing fits this machine, the closest layout and its size, and what would fit."""
    precision = plan_precision(train)
    optimizer = train.optimizer + (f" (momentum {train.momentum:g})" if train.momentum else "")
    closest = min(plan.rows, key=lambda row: row.prediction.peak_mem_gib, default=None)
    line = f"Nothing fits {machine} ({plan.usable_gib:g} GiB usable per GPU) with {optimizer} in {precision.name} precision"
    if closest is not None:
        line += f": the smallest, {_variant_words(closest.layout)}, needs {closest.prediction.peak_mem_gib:.1f} GiB"
    if not found:
        return line + "; nor with more GPUs, plain SGD or bf16."
    fits = "; ".join(
        f"{alt.change} ({_variant_words(alt.row.layout)}: {alt.row.prediction.peak_mem_gib:.1f} GiB, "
        f"{alt.row.prediction.tokens_per_s_per_gpu:,.0f} tokens/s/GPU)"
        for alt in found
    )
    return f"{line}. It fits with {fits}."


def _variant_words(lay: PlannedLayout) -> str:
    checkpointing = ", activation checkpointing" if lay.activation_checkpointing else ""
    chunk = f", loss chunk {lay.loss_chunk_tokens:,}" if lay.loss_chunk_tokens else ""
    return f"{_degrees(lay)} at micro-batch {lay.micro_batch}{checkpointing}{chunk}"


def train_command(
    config_name: str,
    train: TrainConfig,
    variant: PlannedLayout,
    layout: Layout,
    gpus_per_node: int,
    nodes: int,
    sets: tuple[str, ...],
) -> str:
    """The `moectl train` command that runs the layout (on every node, each with its --node-rank)."""
    parts = ["moectl train", f"--config {config_name}", f"--strategy {variant.strategy}", *layout.args()]
    parts += [f"--nproc {gpus_per_node}"] if layout.world_size > 1 else []
    parts += [f"--nnodes {nodes} --node-rank RANK --rdzv-endpoint HOST:PORT"] if nodes > 1 else []
    parts += [
        f"--global-batch {train.global_batch} --micro-batch {variant.micro_batch} --seq-len {train.seq_len}"
    ]
    parts += [f"--set {item}" for item in sets]
    if variant.activation_checkpointing != (checkpointing_mode(train.activation_checkpointing) == "full"):
        parts.append(f"--set train.activation_checkpointing={str(variant.activation_checkpointing).lower()}")
    if variant.compile != train.compile:
        parts.append(f"--set train.compile={str(variant.compile).lower()}")
    if variant.loss_chunk_tokens != train.loss_chunk_tokens:
        parts.append(f"--set train.loss_chunk_tokens={variant.loss_chunk_tokens}")
    return " ".join(parts)


def uncalibrated_kind_note(gpu: str) -> str:
    kind, reference = GPU_KINDS[gpu].name, GPU_KINDS[CALIBRATED_ON].name
    return (
        f"{kind}: uncalibrated. No measured {kind} run checks these predictions yet: the figures are the "
        f"maker's (peak FLOP/s, memory and bandwidths), the kernels' efficiencies the ones measured on "
        f"{reference}s"
    )


def machine_words(gpu: str, gpus_per_node: int, nodes: int) -> str:
    """The machine as the title names it: "1 × H200", "8 × H100", "4 nodes × 8 H100"."""
    kind = GPU_KINDS[gpu].name
    return f"{gpus_per_node} × {kind}" if nodes == 1 else f"{nodes:,} nodes × {gpus_per_node} {kind}"


def _degrees(lay: PlannedLayout) -> str:
    return f"{lay.label} " + " ".join(f"{axis} {getattr(lay, axis) or '?'}" for axis in ("dp", "tp", "ep"))


def shown_rows(plan: Plan, every_variant: bool) -> list[PlanRow]:
    """The fastest fitting variant of each degree set (or every variant), then, for degree sets where
    nothing fits, the variant that comes closest."""
    seen, shown = set(), []
    for row in plan.rows:
        lay = row.layout
        key = (lay.label, lay.dp, lay.tp, lay.ep)
        if every_variant or key not in seen:
            shown.append(row)
        seen.add(key)
    return shown


def _row_json(row: PlanRow) -> dict:
    return {
        **dataclasses.asdict(row.layout),
        "fits": row.does_not_fit is None,
        "does_not_fit": row.does_not_fit,
        **dataclasses.asdict(row.prediction),
        "command": row.command,
    }


def plan_json(
    plan: Plan,
    settings: dict,
    every_variant: bool,
    nothing_fits: str | None = None,
    would_fit: list[Alternative] = (),
) -> dict:
    forbidden = [{**dataclasses.asdict(lay), "rule": rule} for lay, rule in plan.forbidden]
    no_cost_model = [{**dataclasses.asdict(lay), "command": command} for lay, command in plan.no_cost_model]
    return {
        "settings": settings,
        "usable_gib": plan.usable_gib,
        "layouts": [_row_json(row) for row in shown_rows(plan, every_variant)],
        "forbidden": forbidden,
        "no_cost_model": no_cost_model,
        "nothing_fits": nothing_fits,
        "would_fit": [{"change": alt.change, **_row_json(alt.row)} for alt in would_fit],
    }


def plan_command(
    config: str | None,
    gpus: int,
    nodes: int,
    gpu: str,
    gpu_mem_gib: float | None,
    seq_len: int | None,
    global_batch: int | None,
    sets: list[str],
    every_variant: bool,
    as_json: bool,
) -> None:
    """`moectl plan`: check the input, predict every layout, print the table (or JSON) on stdout."""
    if not 1 <= gpus <= MAX_PROCESSES_PER_NODE:
        raise UsageError(f"--gpus must be from 1 to {MAX_PROCESSES_PER_NODE:,} (GPUs per node), got {gpus}")
    if not 1 <= nodes <= MAX_NODES:
        raise UsageError(f"--nodes must be from 1 to {MAX_NODES:,}, got {nodes}")
    if gpu not in GPU_KINDS:
        raise UsageError(f"unknown --gpu {gpu!r}; give one of: {', '.join(GPU_KINDS)}")
    if gpu_mem_gib is not None and not HEADROOM_GIB < gpu_mem_gib <= MAX_GPU_MEM_GIB:
        if not math.isfinite(gpu_mem_gib):
            raise UsageError(f"--gpu-mem must be a finite number of GiB, got {gpu_mem_gib}")
        if gpu_mem_gib > MAX_GPU_MEM_GIB:
            raise UsageError(f"--gpu-mem must be at most {MAX_GPU_MEM_GIB:,} GiB, got {gpu_mem_gib:g}")
        raise UsageError(
            f"--gpu-mem {gpu_mem_gib:g} GiB leaves nothing beyond the {HEADROOM_GIB:g} GiB headroom; "
            f"give more than {HEADROOM_GIB:g}"
        )
    train_flags = {
        k: v for k, v in {"seq_len": seq_len, "global_batch": global_batch}.items() if v is not None
    }
    cfg = build_config(config, merge_overrides(parse_set_option(sets), {"train": train_flags}))
    for key in cfg.parallel.options:
        owners = option_owners(key)
        if not owners:
            raise UsageError(f"unknown key 'parallel.{key}'; no strategy owns it (see moectl train --help)")
        raise UsageError(
            f"--set parallel.{key} is an option of {' and '.join(owners)}, whose values moectl plan tries "
            "itself; drop it"
        )
    if cfg.model.path:  # the dimensions of a local checkpoint's config.json
        from pathlib import Path

        from moectl.model.build import model_config_from_hf_dir

        cfg.model = model_config_from_hf_dir(Path(cfg.model.path))
    try:
        precision = plan_precision(cfg.train)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    memory = gpu_mem_gib or GPU_KINDS[gpu].memory_gib
    name = config or "tiny"
    plan = make_plan(cfg.model, cfg.train, name, gpu, gpus, nodes, memory, tuple(sets))
    machine = machine_words(gpu, gpus, nodes)
    would_fit, nothing_fits = [], None
    if plan.rows and not plan.fits:  # (where every layout is forbidden, the rules say why)
        would_fit = alternatives(cfg.model, cfg.train, name, gpu, gpus, nodes, memory, tuple(sets))
        nothing_fits = nothing_fits_line(plan, cfg.train, machine, would_fit)
    calibrated = is_calibrated(gpu)
    mixed_calibrated = not precision.casts or precision_calibrated(precision.name)
    uncalibrated = [] if calibrated else [uncalibrated_kind_note(gpu)]
    uncalibrated += [] if mixed_calibrated else [MIXED_UNCALIBRATED]
    settings = {
        "config": name,
        "gpu": gpu,
        "gpu_calibrated": calibrated,
        "gpus_per_node": gpus,
        "nodes": nodes,
        "gpu_mem_gib": memory,
        "global_batch": cfg.train.global_batch,
        "seq_len": cfg.train.seq_len,
        "optimizer": cfg.train.optimizer,
        "precision": precision.name,
        "precision_setting": cfg.train.precision,
        "precision_calibrated": precision_calibrated(precision.name),
        "uncalibrated": uncalibrated,
    }
    if as_json:
        print(json.dumps(plan_json(plan, settings, every_variant, nothing_fits, would_fit), indent=1))
        return
    console = output_console()
    headers = ("#", "strategy", "dp", "tp", "ep", "micro", "AC", "compile", "loss chunk", "tokens/s/GPU", "MFU",
               "peak GiB", "comm", "fits")  # fmt: skip
    columns = [Column(h, "left" if h in ("strategy", "fits") else "right") for h in headers]
    rows = shown_rows(plan, every_variant)
    cells = [
        [
            str(number),
            row.layout.label,
            str(row.layout.dp),
            str(row.layout.tp),
            str(row.layout.ep),
            str(row.layout.micro_batch),
            "on" if row.layout.activation_checkpointing else "off",
            "on" if row.layout.compile else "off",
            f"{row.layout.loss_chunk_tokens:,}" if row.layout.loss_chunk_tokens else "off",
            f"{row.prediction.tokens_per_s_per_gpu:,.0f}",
            f"{100 * row.prediction.mfu:.1f}%",
            f"{row.prediction.peak_mem_gib:.1f}",
            f"{100 * row.prediction.exposed_comm_s / row.prediction.step_time_s:.0f}%",
            "yes" if row.does_not_fit is None else "NO",
        ]
        for number, row in enumerate(rows, 1)
    ]
    title = (
        f"{name}: {machine} ({'' if calibrated else 'uncalibrated; '}"
        f"{memory:g} GiB, {plan.usable_gib:g} usable), "
        f"global batch {cfg.train.global_batch} × {cfg.train.seq_len} tokens, {cfg.train.optimizer}, "
        f"{precision.name} precision"
    )
    show_table(console, columns, cells, title=title, keys=2)
    # Commands stay whole on one line (copied as they are); the notes below them wrap at words.
    for line in [f"{n:>3}. {row.does_not_fit or row.command}" for n, row in enumerate(rows, 1)]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    lines = [nothing_fits] if nothing_fits else []
    lines += [f"forbidden: {_degrees(lay)}: {rule}" for lay, rule in plan.forbidden]
    lines += [
        f"no cost model: {_degrees(lay)} runs ({command}), but the strategy states no cost for plan to predict"
        for lay, command in plan.no_cost_model
    ]
    lines.append(
        "comm = share of the step spent waiting for communication. The model and its calibration: "
        "moectl/plan/predict.py, moectl/plan/calibration.py, BENCHMARKS.md."
    )
    auto = " (train.precision=auto: mixed, as on a GPU)" if cfg.train.precision == "auto" else ""
    lines.append(f"Precision {precision.describe()}{auto}; measured runs trained in bf16.")
    lines += [f"{note[0].upper()}{note[1:]}." for note in uncalibrated]
    if nodes > 1:
        lines.append(
            f"Between nodes the model assumes {GPU_KINDS[gpu].network_bytes_per_s / 1e9:g} GB/s per GPU: "
            "no multi-node run has measured it."
        )
    if cfg.model.hidden_size < SMALLEST_CALIBRATED_HIDDEN:
        lines.append(
            f"Hidden size {cfg.model.hidden_size} is far below the calibrated runs' 2048: such small layers are "
            "launch-bound, and the speeds above are too high."
        )
    for line in lines:
        console.print(line, markup=False, highlight=False)
