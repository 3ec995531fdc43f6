"""The one training loop. It never asks which strategy it runs: everything parallel sits behind
the Strategy contract (moectl/strategy.py)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from moectl.config import RunConfig, TrainConfig
from moectl.data.sources import build_data, rank_slice
from moectl.io import checkpoint
from moectl.io.checkpoint import is_due
from moectl.io.hf import HFCheckpoint, save_hf_model
from moectl.io.outputs import write_json_atomic
from moectl.model.build import build_meta_model, hf_config, materialize, random_init_source
from moectl.model.loss import TokenLoss, build_token_loss, token_loss_sum
from moectl.model.precision import Precision, save_dtype
from moectl.model.routing import Routing
from moectl.model.sizing import device_peak_flops, flops_per_token, mfu, peak_memory_gib, seed_flops_per_token
from moectl.parallel.gradients import clip_gradients_
from moectl.plan.predict import SMALLEST_CALIBRATED_HIDDEN, gpu_kind_for_device, layout_from_config, predict
from moectl.run import plots as run_plots
from moectl.run import runtime
from moectl.run.faults import Interrupted, NonFiniteLoss, StopSignals, agree_on_step
from moectl.run.report import StepProfiler, StepReporter
from moectl.run.schedule import lr_at, set_lr
from moectl.run.tensorboard_log import TensorBoardLog
from moectl.strategy import Strategy

ROUTER_BIAS_FILE = "router_bias.safetensors"
EXPERT_LOAD_FILE = "expert_load.safetensors"
ROUTER_BIAS_NOTE = (
    f"{ROUTER_BIAS_FILE} holds the router bias the run trained with (train.router_bias_update); "
    "Qwen3-MoE's HF architecture has no place for it, so model/ routes without it"
)


@dataclass
class Summary:
    """What a run measured; medians are over the steps after warm-up."""

    strategy: str
    world_size: int
    steps: int
    timing_warmup_steps: int
    tokens_per_step: int
    median_step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    mfu: float | None
    mfu_seed: float | None
    flops_per_token: float
    peak_mem_gib: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    device: str = "cpu"
    #: train.precision as run: bf16, mixed (fp32 weights and optimizer state, bf16 compute) or fp32
    precision: str = "fp32"
    degrees: dict[str, int] = field(default_factory=dict)  # dp, tp, ep
    final_lr: float | None = None
    last_grad_norm: float | None = None
    median_grad_norm: float | None = None
    clipped_steps: int | None = None  # steps whose gradients were clipped (train.max_grad_norm > 0)
    final_load_imbalance: float | None = None  # the last step's max over layers of max / mean expert load
    final_aux_loss: float | None = None
    router_bias: str | None = None  # where the router bias went, when train.router_bias_update is on
    #: what `moectl plan` predicted for this run (GPU kinds it has figures for), beside what it measured
    predicted: dict[str, float] | None = None
    strategy_metrics: dict[str, float] = field(default_factory=dict)  # Strategy.step_metrics, medians


@dataclass
class History:
    """The per-step figures of the whole run (a resume starts from the kept metrics.jsonl lines)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list:
        return [record.get(key) for record in self.records]

    def last(self, key: str) -> Any:
        return self.records[-1].get(key) if self.records else None


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD (or AdamW) over every trainable parameter, with one param group per tensor kind.

    Why groups: multi-tensor (foreach) kernels refuse a list that mixes DTensors and plain tensors,
    which `tp` has (sharded attention and experts, replicated embedding and norms); each group is
    updated by its own kernels. Plain CUDA tensors take the fused kernel (one launch per step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    plain = [p for p in params if not isinstance(p, DTensor)]
    distributed = [p for p in params if isinstance(p, DTensor)]
    groups = [{"params": plain, "fused": all(p.is_cuda for p in plain) or None}] if plain else []
    groups += [{"params": distributed}] if distributed else []
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def train_step(
    model,
    strategy,
    micro_batches,
    num_target_tokens,
    loss_fn: TokenLoss | None = None,
    routing: Routing | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss and
    summed auxiliary loss (None when train.aux_loss_coef is 0).

    Why the loss is divided by the token count of the *whole global batch* (not of the
    micro-batch): gradients then add up across micro-batches and data-parallel ranks to exactly the
    gradient of one big batch, so any accumulation or parallel layout trains the same model. The
    auxiliary loss is normalised the same way, by the global number of sequences (moectl/model/routing.py).
    `loss_fn(model, tokens, grad_scale)` is `moectl.model.loss.build_token_loss`'s (default: the model's
    logits and `token_loss_sum`); grad_scale is the factor the summed loss is multiplied by here.
    """
    loss_fn = loss_fn or build_token_loss(model, chunk_tokens=0, compiled=False)
    grad_scale = strategy.loss_scale / num_target_tokens
    loss_sum = torch.zeros((), device=micro_batches[0].device)
    aux_total = None
    for index, tokens in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        with strategy.no_sync(model, is_last):
            with routing.recording() if routing is not None else contextlib.nullcontext():
                token_loss = loss_fn(model, tokens, grad_scale)
            objective = token_loss * grad_scale
            aux_sum = routing.take_forward() if routing is not None else None
            if aux_sum is not None:
                objective = objective + routing.aux_loss_term(aux_sum) * strategy.loss_scale
                aux_total = aux_sum.detach() if aux_total is None else aux_total + aux_sum.detach()
            objective.backward()
        loss_sum += token_loss.detach()
    strategy.after_backward(model)
    return loss_sum, aux_total


def run_training(cfg: RunConfig, strategy: Strategy, run_dir: Path | None) -> Summary:
    """Build, train and save; every rank runs this, rank 0 reports and writes."""
    train = cfg.train
    device = runtime.pick_device(train)
    precision = runtime.precision(train, device.type == "cuda")
    is_rank0 = runtime.rank() == 0
    torch.manual_seed(train.seed)

    resume = checkpoint.latest_checkpoint(run_dir) if run_dir else None
    if resume is not None:
        source = checkpoint.placeholder_source
    elif cfg.model.path:
        source = HFCheckpoint(Path(cfg.model.path))
    else:
        source = random_init_source(cfg.model, train.seed)
    model = build_meta_model(cfg.model, precision.param_dtype)
    precision.apply_to(model)
    loss_fn = build_token_loss(model, train.loss_chunk_tokens, train.compile)  # before any wrapper
    loss_fn = precision.around(loss_fn, device.type)  # each micro-batch's forward in the compute dtype
    model = strategy.parallelize(model, lambda m: materialize(m, device, source, strategy.shard), train)
    model.train()
    optimizer = build_optimizer(model, train)
    routing = Routing(model, cfg.model, train, device)
    data = build_data(cfg.data, cfg.model.vocab_size, train.seed)
    start_step, history = 0, History()
    resume_notes = []
    if resume is not None:
        extra = routing.checkpoint_state()
        start_step = checkpoint.load_checkpoint(resume, model, optimizer, strategy, train, extra=extra)
        routing.load_checkpoint_state(extra)
        resume_notes = _resume_notes(set(resume.meta.get("extra", [])), routing)
        resume_notes += _precision_notes(resume.meta.get("param_dtype"), precision)
        history = History(checkpoint.restore_metrics(run_dir, start_step, is_rank0))

    dp_rank, dp_size = strategy.dims.dp_rank, strategy.dims.dp
    num_target_tokens = train.global_batch * train.seq_len
    flops_tok, seed_flops_tok = flops_per_token(cfg.model, train.seq_len), seed_flops_per_token(cfg.model)
    peak = device_peak_flops(device, train.peak_tflops)
    world = runtime.world_size()
    reporter = StepReporter(run_dir, train.steps, is_rank0, f"{strategy.name} ×{world}", world)
    if resume is not None:
        untimed = min(train.timing_warmup_steps, train.steps - start_step)
        reporter.message(
            f"resumed at step {start_step} of {train.steps} from {resume.path.name}"
            + (f"; the next {untimed} step(s) are warm-up again (not timed)" if untimed else "")
        )
        for note in resume_notes:
            reporter.message(note)
    tensorboard = TensorBoardLog(run_dir, start_step, enabled=is_rank0 and train.tensorboard)

    def save_checkpoint(steps_done: int) -> None:
        if run_dir is not None:
            checkpoint.save_checkpoint(
                run_dir,
                steps_done,
                model,
                optimizer,
                strategy,
                train.keep_checkpoints,
                extra=routing.checkpoint_state(),
            )

    step_times, step_figures = [], []
    try:
        with StopSignals() as stop, StepProfiler(run_dir, train, enabled=is_rank0, device=device) as profiler:
            for step in range(start_step, train.steps):
                local = rank_slice(
                    data.global_batch(step, train.global_batch, train.seq_len), dp_rank, dp_size
                ).to(device)
                runtime.synchronize(device)
                started = time.perf_counter()
                loss_sum, aux_sum = train_step(
                    model, strategy, local.split(train.micro_batch), num_target_tokens, loss_fn, routing
                )
                loss_total, step_routing = routing.reduce_step(loss_sum, aux_sum, strategy.loss_group())
                loss = loss_total / num_target_tokens
                # The global gradient norm (logged, clipped by) is also the finiteness check: a
                # non-finite gradient anywhere makes it non-finite, and it is the same on every rank.
                grad_norm_tensor = strategy.grad_norm(model)
                bad_grad, stop_now = agree_on_step(model, stop, device, grad_norm_tensor)
                grad_norm = grad_norm_tensor.item()
                figures = strategy.step_metrics()
                if bad_grad or not math.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    what = f"loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
                    if train.on_nonfinite == "stop":
                        if train.checkpoint_every and step and not is_due(step, train):
                            save_checkpoint(step)  # the last good state, for a resume with a lower --lr
                        raise NonFiniteLoss(
                            f"{what} at step {step + 1}; lower --lr or use --set train.on_nonfinite=skip; "
                            + checkpoint.resume_hint(run_dir)
                        )
                    reporter.message(f"step {step + 1}: {what}; step skipped")
                else:
                    clipped = 0 < train.max_grad_norm < grad_norm
                    if clipped:
                        clip_gradients_(model.parameters(), train.max_grad_norm, grad_norm)
                    lr = lr_at(train, step)
                    set_lr(optimizer, lr)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    routing.finish_step(step_routing)
                    runtime.synchronize(device)
                    elapsed = time.perf_counter() - started
                    step_times.append(elapsed)
                    step_figures.append(figures)
                    tokens_per_s = num_target_tokens / elapsed
                    record = {
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "step_time_s": elapsed,
                        "tokens_per_s": tokens_per_s,
                        "tokens_per_s_per_device": tokens_per_s / world,
                        "mfu": mfu(flops_tok, tokens_per_s / world, peak),
                        "mfu_seed": mfu(seed_flops_tok, tokens_per_s / world, peak),
                        "mem_gib": peak_memory_gib(device),
                        "warmup": step - start_step < train.timing_warmup_steps,
                    }
                    if train.max_grad_norm > 0:
                        record["grad_clipped"] = clipped
                    if step_routing.load_imbalance is not None:
                        record["load_imbalance"] = step_routing.load_imbalance
                    if step_routing.aux_loss is not None:
                        record["aux_loss"] = step_routing.aux_loss
                    record.update(figures)
                    history.records.append(record)
                    reporter.step(record)
                    tensorboard.step(record, step_routing.imbalance_per_layer)
                profiler.step()
                if stop_now or is_due(step + 1, train):
                    save_checkpoint(step + 1)
                if stop_now and step + 1 < train.steps:  # at the last step, just finish
                    raise Interrupted(
                        stop.signum or signal.SIGTERM,
                        f"stopped by {stop.name} after step {step + 1}; " + checkpoint.resume_hint(run_dir),
                    )
    finally:
        reporter.close()
        tensorboard.close()

    timed = step_times[train.timing_warmup_steps :] or step_times or [math.inf]  # a resume: maybe none
    timed_figures = step_figures[train.timing_warmup_steps :] or step_figures
    median_time = statistics.median(timed)
    peak_mem = torch.tensor(peak_memory_gib(device), device=device)
    if dist.is_initialized():
        dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    tokens_per_s = num_target_tokens / median_time
    summary = Summary(
        strategy=strategy.name,
        world_size=world,
        steps=train.steps,
        timing_warmup_steps=train.timing_warmup_steps,
        tokens_per_step=num_target_tokens,
        median_step_time_s=median_time,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_device=tokens_per_s / world,
        mfu=mfu(flops_tok, tokens_per_s / world, peak),
        mfu_seed=mfu(seed_flops_tok, tokens_per_s / world, peak),
        flops_per_token=flops_tok,
        peak_mem_gib=float(peak_mem),
        final_loss=history.last("loss") if history.records else float("nan"),
        losses=history.values("loss"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision=precision.name,
        degrees={"dp": strategy.dims.dp, "tp": strategy.dims.tp, "ep": strategy.dims.ep},
        **_training_figures(train, history, routing),
        predicted=plan_prediction(cfg, world) if device.type == "cuda" else None,
        strategy_metrics={
            key: statistics.median(figures[key] for figures in timed_figures) for key in timed_figures[0]
        }
        if timed_figures
        else {},
    )
    save_outputs(cfg, strategy, model, run_dir, summary, is_rank0, routing, history)
    return summary


def _training_figures(train: TrainConfig, history: History, routing: Routing) -> dict[str, Any]:
    """summary.json's figures of the learning rate, gradient norm and routing over the run."""
    grad_norms = [value for value in history.values("grad_norm") if value is not None]
    return {
        "final_lr": history.last("lr"),
        "last_grad_norm": grad_norms[-1] if grad_norms else None,
        "median_grad_norm": statistics.median(grad_norms) if grad_norms else None,
        "clipped_steps": sum(bool(v) for v in history.values("grad_clipped"))
        if train.max_grad_norm
        else None,
        "final_load_imbalance": history.last("load_imbalance"),
        "final_aux_loss": history.last("aux_loss"),
        "router_bias": ROUTER_BIAS_NOTE if routing.uses_bias else None,
    }


def _resume_notes(saved: set[str], routing: Routing) -> list[str]:
    """What a resume could not carry over, said rather than dropped silently."""
    notes = []
    if routing.uses_bias and "router_bias" not in saved:
        notes.append("the checkpoint holds no router bias: it starts from zero at this step")
    if "router_bias" in saved and not routing.uses_bias:
        notes.append("the checkpoint's router bias is not used: train.router_bias_update is 0 in this run")
    if routing.tracks_load and "expert_load" not in saved:
        notes.append("the checkpoint holds no expert load: expert_load.safetensors counts from this step on")
    return notes


def _precision_notes(saved_dtype: str | None, precision: Precision) -> list[str]:
    """A resume in another precision than the checkpoint's: said, as its weights change dtype."""
    if saved_dtype is None or saved_dtype == str(precision.param_dtype):
        return []
    return [
        f"the checkpoint holds {saved_dtype.removeprefix('torch.')} weights and optimizer state; this run "
        f"keeps them in {str(precision.param_dtype).removeprefix('torch.')} (train.precision={precision.name})"
    ]


def plan_prediction(cfg: RunConfig, world_size: int) -> dict[str, float] | None:
    """`moectl plan`'s prediction for this run, so every GPU run checks the plan's model; None where the
    plan has no figures (an unknown GPU, a plugin strategy, fp32 compute, layers far smaller than the
    calibrated ones, which are launch-bound). Its figures are bf16 runs: under train.precision=mixed it
    predicts the time of the same bf16 compute, and memory without the fp32 master copy until the plan
    counts it."""
    kind = gpu_kind_for_device(torch.cuda.get_device_name())
    if kind is None or runtime.training_dtype(cfg.train, True) != torch.bfloat16:
        return None
    if cfg.model.hidden_size < SMALLEST_CALIBRATED_HIDDEN:
        return None
    layout = layout_from_config(cfg.parallel, cfg.train, world_size)
    try:
        prediction = predict(cfg.model, cfg.train, layout, kind, world_size, cfg.parallel.nnodes)
    except ValueError:
        return None
    return {
        "gpu": kind,
        "tokens_per_s_per_device": prediction.tokens_per_s_per_gpu,
        "peak_mem_gib": prediction.peak_mem_gib,
        "mfu": prediction.mfu,
    }


def save_outputs(
    cfg: RunConfig,
    strategy: Strategy,
    model: nn.Module,
    run_dir: Path | None,
    summary: Summary,
    is_rank0: bool,
    routing: Routing | None = None,
    history: History | None = None,
) -> None:
    state = strategy.full_state_dict(model) if cfg.train.save_model else None
    if not is_rank0 or run_dir is None:
        return
    if state is not None:
        bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise NonFiniteLoss(
                f"non-finite weights in {bad[0]} (and {len(bad) - 1} more); the model was not written"
            )
        dtype = save_dtype(cfg.train.save_dtype, cfg.model.dtype)
        for name, tensor in state.items():  # one tensor at a time: never a second whole copy
            state[name] = tensor.to(dtype)
        save_hf_model(state, hf_config(cfg.model, dtype), run_dir / "model")
    if routing is not None and routing.uses_bias:
        _save_tensors_atomic(routing.bias_tensors(), run_dir / ROUTER_BIAS_FILE)
    if routing is not None and routing.tracks_load:
        load = routing.total_load.cpu().round().long()  # token copies: whole numbers
        _save_tensors_atomic({"expert_load": load}, run_dir / EXPERT_LOAD_FILE)
    _write_plots(run_dir, routing, history)
    record = asdict(summary)
    record.update(record.pop("strategy_metrics"))
    write_json_atomic(run_dir / "summary.json", record)


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)


def _write_plots(run_dir: Path, routing: Routing | None, history: History | None) -> None:
    if not (history and history.records):
        return
    if not run_plots.matplotlib_available():
        print(run_plots.PLOTS_SKIPPED, flush=True)
        return
    run_plots.write_loss_plot(
        run_dir / "loss.png", history.values("step"), history.values("loss"), history.values("lr")
    )
    if routing is not None and routing.tracks_load:
        run_plots.write_expert_load_plot(run_dir / "expert_load.png", routing.total_load.cpu())


__all__ = ["run_training", "Summary", "NonFiniteLoss", "token_loss_sum"]
