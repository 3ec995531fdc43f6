"""The one training loop. It never asks which strategy it runs: everything parallel sits behind
the Strategy contract (moectl/strategy.py)."""

from __future__ import annotations

import math
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moectl import checkpoint, runtime
from moectl.checkpoint import is_due
from moectl.config import RunConfig, TrainConfig
from moectl.data import build_data, rank_slice
from moectl.faults import Interrupted, NonFiniteLoss, StopSignals, agree_on_step
from moectl.hf_io import HFCheckpoint, save_hf_model
from moectl.loss import TokenLoss, build_token_loss, token_loss_sum
from moectl.metrics import device_peak_flops, flops_per_token, mfu, peak_memory_gib, seed_flops_per_token
from moectl.model import build_meta_model, hf_config, materialize, random_init_source
from moectl.outputs import write_json_atomic
from moectl.plan import gpu_kind_for_device, layout_from_config, predict
from moectl.report import StepProfiler, StepReporter
from moectl.strategy import Strategy


@dataclass
class Summary:
    """What a run measured; medians are over the steps after warm-up."""

    strategy: str
    world_size: int
    steps: int
    warmup_steps: int
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
    #: what `moectl plan` predicted for this run (GPU kinds it has figures for), beside what it measured
    predicted: dict[str, float] | None = None
    strategy_metrics: dict[str, float] = field(default_factory=dict)  # Strategy.step_metrics, medians


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
    model, strategy, micro_batches, num_target_tokens, loss_fn: TokenLoss | None = None
) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's summed token loss.

    Why the loss is divided by the token count of the *whole global batch* (not of the
    micro-batch): gradients then add up across micro-batches and data-parallel ranks to exactly the
    gradient of one big batch, so any accumulation or parallel layout trains the same model.
    `loss_fn(model, tokens, grad_scale)` is `moectl.loss.build_token_loss`'s (default: the model's
    logits and `token_loss_sum`); grad_scale is the factor the summed loss is multiplied by here.
    """
    loss_fn = loss_fn or build_token_loss(model, chunk_tokens=0, compiled=False)
    grad_scale = strategy.loss_scale / num_target_tokens
    loss_sum = torch.zeros((), device=micro_batches[0].device)
    for index, tokens in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        with strategy.no_sync(model, is_last):
            token_loss = loss_fn(model, tokens, grad_scale)
            (token_loss * grad_scale).backward()
        loss_sum += token_loss.detach()
    strategy.after_backward(model)
    return loss_sum


def run_training(cfg: RunConfig, strategy: Strategy, run_dir: Path | None) -> Summary:
    """Build, train and save; every rank runs this, rank 0 reports and writes."""
    train = cfg.train
    device = runtime.pick_device(train)
    dtype = runtime.training_dtype(train, device.type == "cuda")
    is_rank0 = runtime.rank() == 0
    torch.manual_seed(train.seed)

    resume = checkpoint.latest_checkpoint(run_dir) if run_dir else None
    if resume is not None:
        source = checkpoint.placeholder_source
    elif cfg.model.path:
        source = HFCheckpoint(Path(cfg.model.path))
    else:
        source = random_init_source(cfg.model, train.seed)
    model = build_meta_model(cfg.model, dtype)
    loss_fn = build_token_loss(model, train.loss_chunk_tokens, train.compile)  # before any wrapper
    model = strategy.parallelize(model, lambda m: materialize(m, device, source, strategy.shard), train)
    model.train()
    optimizer = build_optimizer(model, train)
    data = build_data(cfg.data, cfg.model.vocab_size, train.seed)
    start_step, losses = 0, []
    if resume is not None:
        start_step = checkpoint.load_checkpoint(resume, model, optimizer, strategy, train)
        losses = checkpoint.restore_metrics(run_dir, start_step, is_rank0)

    dp_rank, dp_size = strategy.dims.dp_rank, strategy.dims.dp
    num_target_tokens = train.global_batch * train.seq_len
    flops_tok, seed_flops_tok = flops_per_token(cfg.model, train.seq_len), seed_flops_per_token(cfg.model)
    peak = device_peak_flops(device, train.peak_tflops)
    world = runtime.world_size()
    reporter = StepReporter(run_dir, train.steps, is_rank0, f"{strategy.name} ×{world}")
    if resume is not None:
        reporter.message(f"resumed at step {start_step} of {train.steps} from {resume.path.name}")

    def save_checkpoint(steps_done: int) -> None:
        if run_dir is not None:
            checkpoint.save_checkpoint(
                run_dir, steps_done, model, optimizer, strategy, train.keep_checkpoints
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
                loss_sum = train_step(
                    model, strategy, local.split(train.micro_batch), num_target_tokens, loss_fn
                )
                if dist.is_initialized():
                    dist.all_reduce(loss_sum, group=strategy.loss_group())
                loss = loss_sum.item() / num_target_tokens
                figures = strategy.step_metrics()
                bad_grad, stop_now = agree_on_step(model, stop, device)
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
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    runtime.synchronize(device)
                    elapsed = time.perf_counter() - started
                    losses.append(loss)
                    step_times.append(elapsed)
                    step_figures.append(figures)
                    tokens_per_s = num_target_tokens / elapsed
                    reporter.step(
                        {
                            "step": step,
                            "loss": loss,
                            "step_time_s": elapsed,
                            "tokens_per_s": tokens_per_s,
                            "tokens_per_s_per_device": tokens_per_s / world,
                            "mfu": mfu(flops_tok, tokens_per_s / world, peak),
                            "mfu_seed": mfu(seed_flops_tok, tokens_per_s / world, peak),
                            "mem_gib": peak_memory_gib(device),
                            "warmup": step - start_step < train.warmup_steps,
                            **figures,
                        }
                    )
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

    timed = step_times[train.warmup_steps :] or step_times or [math.inf]  # a resume may have no steps left
    timed_figures = step_figures[train.warmup_steps :] or step_figures
    median_time = statistics.median(timed)
    peak_mem = torch.tensor(peak_memory_gib(device), device=device)
    if dist.is_initialized():
        dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
    tokens_per_s = num_target_tokens / median_time
    summary = Summary(
        strategy=strategy.name,
        world_size=world,
        steps=train.steps,
        warmup_steps=train.warmup_steps,
        tokens_per_step=num_target_tokens,
        median_step_time_s=median_time,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_device=tokens_per_s / world,
        mfu=mfu(flops_tok, tokens_per_s / world, peak),
        mfu_seed=mfu(seed_flops_tok, tokens_per_s / world, peak),
        flops_per_token=flops_tok,
        peak_mem_gib=float(peak_mem),
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        predicted=plan_prediction(cfg, world) if device.type == "cuda" else None,
        strategy_metrics={
            key: statistics.median(figures[key] for figures in timed_figures) for key in timed_figures[0]
        }
        if timed_figures
        else {},
    )
    save_outputs(cfg, strategy, model, run_dir, summary, is_rank0)
    return summary


def plan_prediction(cfg: RunConfig, world_size: int) -> dict[str, float] | None:
    """`moectl plan`'s prediction for this run, so every GPU run checks the plan's model; None where the
    plan has no figures (an unknown GPU, a plugin strategy, fp32 weights)."""
    kind = gpu_kind_for_device(torch.cuda.get_device_name())
    if kind is None or runtime.training_dtype(cfg.train, True) != torch.bfloat16:
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
        save_hf_model(state, hf_config(cfg.model), run_dir / "model")
    record = asdict(summary)
    record.update(record.pop("strategy_metrics"))
    write_json_atomic(run_dir / "summary.json", record)


__all__ = ["run_training", "Summary", "NonFiniteLoss", "token_loss_sum"]
