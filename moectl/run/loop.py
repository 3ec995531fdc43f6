"""The one training loop. It never asks which strategy it runs: everything parallel sits behind
the Strategy contract (moectl/strategy.py)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from moectl.config import RunConfig, TrainConfig
from moectl.data.packing import Batch, PackedDocuments
from moectl.data.sources import open_data, rank_slice
from moectl.io import checkpoint
from moectl.io.checkpoint import is_due
from moectl.io.hf import HFCheckpoint
from moectl.io.hf_writer import HFModelWriter
from moectl.io.outputs import follow_umask, write_json_atomic
from moectl.model.build import build_meta_model, hf_config, materialize, random_init_source
from moectl.model.loss import TokenLoss, build_token_loss, token_loss_sum
from moectl.model.precision import Precision, save_dtype
from moectl.model.routing import Routing
from moectl.model.sizing import device_peak_flops, flops_per_token, mfu, peak_memory_gib, seed_flops_per_token
from moectl.parallel.gradients import clip_gradients_
from moectl.run import plots as run_plots
from moectl.run import runtime
from moectl.run.faults import Interrupted, NonFiniteLoss, StopSignals, agree_on_step
from moectl.run.report import StepProfiler, StepReporter
from moectl.run.schedule import lr_at, set_lr
from moectl.run.tensorboard_log import TensorBoardLog
from moectl.run.wandb_log import WandbLog
from moectl.strategy import Strategy, full_state_items

ROUTER_BIAS_FILE = "router_bias.safetensors"
EXPERT_LOAD_FILE = "expert_load.safetensors"
ROUTER_BIAS_NOTE = (
    f"{ROUTER_BIAS_FILE} holds the router bias the run trained with (train.router_bias_update); "
    "Qwen3-MoE's HF architecture has no place for it, so model/ routes without it"
)


@dataclass
class Summary:
    """What a run measured; medians are over the steps after warm-up. Steps count from 1 (step 1 is the
    first optimizer step), in metrics.jsonl, on the console, in the plots and in TensorBoard."""

    strategy: str
    world_size: int
    steps: int
    timing_warmup_steps: int
    tokens_per_step: int
    median_step_time_s: float | None  # None: no step was timed (see not_timed)
    tokens_per_s: float | None
    tokens_per_s_per_device: float | None
    mfu: float | None
    mfu_seed: float | None
    flops_per_token: float
    peak_mem_gib: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    final_val_loss: float | None = None  # the last evaluation's held-out loss (a validation set given)
    final_val_ppl: float | None = None
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
    not_timed: str | None = None  # why no speed was measured (every step of the session was warm-up)


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
    micro_batches: list[Batch],
    num_target_tokens: int,
    loss_fn: TokenLoss | None = None,
    routing: Routing | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss and
    summed auxiliary loss (None when train.aux_loss_coef is 0).

    Why the loss is divided by the token count of the *whole global batch* (not of the
    micro-batch): gradients then add up across micro-batches and data-parallel ranks to exactly the
    gradient of one big batch, so any accumulation or parallel layout trains the same model. The
    auxiliary loss is normalised the same way, by the global number of sequences (moectl/model/routing.py).
    `loss_fn(model, batch, grad_scale)` is `moectl.model.loss.build_token_loss`'s (default: the model's
    logits and `token_loss_sum`); grad_scale is the factor the summed loss is multiplied by here.
    num_target_tokens counts the target tokens of the whole global batch (packed documents and chat
    data leave some tokens out), so that every layout still sums to the gradient of one big batch.
    """
    loss_fn = loss_fn or build_token_loss(model, chunk_tokens=0, compiled=False)
    grad_scale = strategy.loss_scale / max(num_target_tokens, 1)
    loss_sum = torch.zeros((), device=micro_batches[0].tokens.device)
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


def run_training(
    cfg: RunConfig, strategy: Strategy, run_dir: Path | None, predicted: dict[str, float] | None = None
) -> Summary:
    """Build, train and save; every rank runs this, rank 0 reports and writes. `predicted`: what
    `moectl plan` predicts for the run (moectl.plan.predict.run_prediction), written beside what it measured."""
    train = cfg.train
    device = runtime.pick_device(train)
    precision = runtime.precision(train, device.type == "cuda")
    model_dtype = save_dtype(train.save_dtype, cfg.model.dtype)  # what model/ and an export are written in
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
    if train.attention != "sdpa":
        model.set_attn_implementation(train.attention)
    loss_fn = build_token_loss(model, train.loss_chunk_tokens, train.compile)  # before any wrapper
    loss_fn = precision.around(loss_fn, device.type)  # each micro-batch's forward in the compute dtype
    model = strategy.parallelize(model, lambda m: materialize(m, device, source, strategy.shard), train)
    model.train()
    optimizer = build_optimizer(model, train)
    routing = Routing(model, cfg.model, train, device)
    data = open_data(cfg.data, cfg.model.vocab_size, train.seed, train.seq_len)
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
    tokens_per_step = train.global_batch * train.seq_len
    flops_tok, seed_flops_tok = flops_per_token(cfg.model, train.seq_len), seed_flops_per_token(cfg.model)
    peak = device_peak_flops(device, train.peak_tflops)
    world = runtime.world_size()
    reporter = StepReporter(run_dir, train.steps, is_rank0, f"{strategy.name} ×{world}", world, start_step)
    if resume is not None:
        untimed = min(train.timing_warmup_steps, train.steps - start_step)
        reporter.message(
            f"resumed at step {start_step} of {train.steps} from {resume.path.name}"
            + (f"; the next {untimed} step(s) are warm-up again (not timed)" if untimed else "")
        )
        for note in resume_notes:
            reporter.message(note)
    for line in data.describe(train.global_batch):
        reporter.message(line)
    tensorboard = TensorBoardLog(run_dir, start_step, enabled=is_rank0 and train.tensorboard)
    wandb_log = WandbLog(cfg, run_dir, start_step, enabled=is_rank0 and train.wandb)
    if wandb_log.note:
        reporter.message(wandb_log.note)

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
                model_dtype=model_dtype,
            )

    step_times, step_figures = [], []
    try:
        with StopSignals() as stop, StepProfiler(run_dir, train, enabled=is_rank0, device=device) as profiler:
            for step in range(start_step, train.steps):
                batch = data.train.global_batch(step, train.global_batch, train.seq_len)
                num_target_tokens = batch.num_targets()  # of the whole global batch, known on every rank
                local = rank_slice(batch, dp_rank, dp_size).to(device)
                runtime.synchronize(device)
                started = time.perf_counter()
                loss_sum, aux_sum = train_step(
                    model, strategy, local.split(train.micro_batch), num_target_tokens, loss_fn, routing
                )
                loss_total, step_routing = routing.reduce_step(loss_sum, aux_sum, strategy.loss_group())
                loss = loss_total / max(num_target_tokens, 1)
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
                    tokens_per_s = tokens_per_step / elapsed
                    record = {
                        "step": step + 1,
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
                    if batch.masked:
                        record["target_tokens"] = num_target_tokens
                    if train.max_grad_norm > 0:
                        record["grad_clipped"] = clipped
                    if step_routing.load_imbalance is not None:
                        record["load_imbalance"] = step_routing.load_imbalance
                    if step_routing.aux_loss is not None:
                        record["aux_loss"] = step_routing.aux_loss
                    record.update(figures)
                    if data.validation is not None and (
                        step + 1 == train.steps or train.eval_every and (step + 1) % train.eval_every == 0
                    ):
                        record.update(evaluate(model, strategy, data.validation, train, loss_fn, device))
                    history.records.append(record)
                    reporter.step(record)
                    tensorboard.step(record, step_routing.imbalance_per_layer)
                    wandb_log.step(record, step_routing.imbalance_per_layer)
                profiler.step()
                if stop_now or is_due(step + 1, train):
                    save_checkpoint(step + 1)
                if stop_now and step + 1 < train.steps:  # at the last step, just finish
                    raise Interrupted(
                        stop.signum or signal.SIGTERM,
                        f"stopped by {stop.name} after step {step + 1}; " + checkpoint.resume_hint(run_dir),
                    )
    except BaseException as exc:
        wandb_log.finish(exit_code=getattr(exc, "exit_code", 1))
        raise
    finally:
        reporter.close()
        tensorboard.close()

    timed = step_times[train.timing_warmup_steps :]
    timed_figures = step_figures[train.timing_warmup_steps :] or step_figures
    median_time = statistics.median(timed) if timed else None
    peak_mem = torch.tensor(peak_memory_gib(device), device=device)
    if dist.is_initialized():
        dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    tokens_per_s = tokens_per_step / median_time if median_time else None
    per_device = tokens_per_s / world if tokens_per_s else None
    summary = Summary(
        strategy=strategy.name,
        world_size=world,
        steps=train.steps,
        timing_warmup_steps=train.timing_warmup_steps,
        tokens_per_step=tokens_per_step,
        median_step_time_s=median_time,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_device=per_device,
        mfu=mfu(flops_tok, per_device, peak) if per_device else None,
        mfu_seed=mfu(seed_flops_tok, per_device, peak) if per_device else None,
        flops_per_token=flops_tok,
        peak_mem_gib=float(peak_mem),
        final_loss=history.last("loss") if history.records else float("nan"),
        losses=history.values("loss"),
        final_val_loss=_last_value(history, "val_loss"),
        final_val_ppl=_last_value(history, "val_ppl"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision=precision.name,
        degrees={"dp": strategy.dims.dp, "tp": strategy.dims.tp, "ep": strategy.dims.ep},
        **_training_figures(train, history, routing),
        predicted=predicted,
        strategy_metrics={
            key: statistics.median(figures[key] for figures in timed_figures) for key in timed_figures[0]
        }
        if timed_figures
        else {},
        not_timed=None if timed else _not_timed(len(step_times), train.timing_warmup_steps),
    )
    try:
        save_outputs(
            cfg, strategy, model, run_dir, summary, is_rank0, routing, history, model_dtype=model_dtype
        )
    except BaseException as exc:
        wandb_log.finish(exit_code=getattr(exc, "exit_code", 1))
        raise
    wandb_log.finish(asdict(summary))
    return summary


def _not_timed(session_steps: int, warmup_steps: int) -> str:
    """Why a run measured no speed: it took no more steps than the warm-up leaves out."""
    if not session_steps:
        return "no step finished"
    return (
        f"all {session_steps} step(s) of this session were warm-up (train.timing_warmup_steps = "
        f"{warmup_steps}); run more steps than that to measure speed"
    )


def evaluate(
    model: nn.Module,
    strategy: Strategy,
    validation: PackedDocuments,
    train: TrainConfig,
    loss_fn: TokenLoss,
    device: torch.device,
) -> dict[str, float]:
    """The held-out loss: summed token loss over the validation batches / their target tokens, the sum
    over every data-parallel rank's slice, so every layout reports the same value.

    Forward passes only, in eval mode (no activation checkpointing), with the routers not recording:
    evaluation moves no router bias and adds nothing to the expert load; the strategy's per-step figures
    it caused are dropped. The loop times each step before it evaluates.
    """
    batches = validation.rows_per_epoch // train.global_batch
    if train.eval_batches:
        batches = min(batches, train.eval_batches)
    dp_rank, dp_size = strategy.dims.dp_rank, strategy.dims.dp
    runtime.synchronize(device)
    started = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    num_targets = 0
    model.eval()
    try:
        with torch.no_grad():
            for index in range(batches):
                batch = validation.batch(index * train.global_batch, train.global_batch)
                num_targets += batch.num_targets()
                for micro in rank_slice(batch, dp_rank, dp_size).to(device).split(train.micro_batch):
                    total += loss_fn(model, micro, 1.0).double()
    finally:
        model.train()
    if dist.is_initialized():
        dist.all_reduce(total, group=strategy.loss_group())
    strategy.step_metrics()
    val_loss = total.item() / max(num_targets, 1)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "val_tokens": num_targets,
        "val_time_s": time.perf_counter() - started,
    }


def _last_value(history: History, key: str) -> Any:
    values = [value for value in history.values(key) if value is not None]
    return values[-1] if values else None


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


def save_outputs(
    cfg: RunConfig,
    strategy: Strategy,
    model: nn.Module,
    run_dir: Path | None,
    summary: Summary,
    is_rank0: bool,
    routing: Routing | None = None,
    history: History | None = None,
    model_dtype: torch.dtype | None = None,
) -> None:
    if cfg.train.save_model:
        target = run_dir / "model" if is_rank0 and run_dir is not None else None
        dtype = model_dtype or next(model.parameters()).dtype
        write_model(
            strategy.full_state_dict(model), hf_config(cfg.model, dtype), dtype, target, cfg.data.tokenizer
        )
    if not is_rank0 or run_dir is None:
        return
    if routing is not None and routing.uses_bias:
        _save_tensors_atomic(routing.bias_tensors(), run_dir / ROUTER_BIAS_FILE)
    if routing is not None and routing.tracks_load:
        load = routing.total_load.cpu().round().long()  # token copies: whole numbers
        _save_tensors_atomic({"expert_load": load}, run_dir / EXPERT_LOAD_FILE)
    _write_plots(run_dir, routing, history)
    record = asdict(summary)
    record.update(record.pop("strategy_metrics"))
    write_json_atomic(run_dir / "summary.json", record)


def write_model(
    state: Iterable[tuple[str, torch.Tensor | None]] | Mapping[str, torch.Tensor] | None,
    config,
    dtype: torch.dtype,
    out_dir: Path | None,
    tokenizer: str | None = None,
) -> None:
    """Write a strategy's `full_state_dict`, tensor by tensor as it arrives, into `out_dir` (rank 0;
    None on the other ranks, which only drive their part of the gathers). Every rank drains the
    tensors to the end even after a failure, so no peer is left waiting in a gather; non-finite weights
    are never written (the staged directory is removed)."""
    writer, failure = None, None
    bad: list[str] = []
    try:
        if out_dir is not None:
            tokenizer_dir = Path(tokenizer) if tokenizer else None
            writer = HFModelWriter(out_dir, config, dtype, tokenizer_dir=tokenizer_dir)
    except Exception as exc:  # raised once the peers are done gathering
        failure = exc
    for name, tensor in full_state_items(state):
        if writer is None or tensor is None or failure is not None:
            continue
        if not torch.isfinite(tensor).all():
            bad.append(name)
            continue
        try:
            writer.add(name, tensor)
        except Exception as exc:
            failure = exc
    if writer is not None and (failure is not None or bad):
        writer.abort()
    if failure is not None:
        raise failure
    if bad:
        raise NonFiniteLoss(
            f"non-finite weights in {bad[0]} (and {len(bad) - 1} more); the model was not written"
        )
    if writer is not None:
        writer.commit()


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temporary))
    follow_umask(temporary)
    os.replace(temporary, path)


def _write_plots(run_dir: Path, routing: Routing | None, history: History | None) -> None:
    if not (history and history.records):
        return
    if not run_plots.matplotlib_available():
        print(run_plots.PLOTS_SKIPPED, flush=True)
        return
    run_plots.write_loss_plot(
        run_dir / "loss.png",
        history.values("step"),
        history.values("loss"),
        history.values("lr"),
        history.values("val_loss"),
    )
    if routing is not None and routing.tracks_load:
        run_plots.write_expert_load_plot(run_dir / "expert_load.png", routing.total_load.cpu())


__all__ = ["run_training", "Summary", "NonFiniteLoss", "token_loss_sum"]
