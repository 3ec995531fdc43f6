"""The learning-rate schedule: the learning rate of every step as a pure function of the step index.

Why a function of the step and no scheduler object: the step is already what a checkpoint restores
(the data of step s is a pure function of (seed, s)), so a resumed run takes the same learning rates
as an uninterrupted one with nothing more to save, and every rank computes the same value.
"""

from __future__ import annotations

import math

import torch

from moectl.config import TrainConfig


def lr_at(train: TrainConfig, step: int) -> float:
    """The learning rate of the optimizer step with 0-based index `step` (metrics.jsonl, the console and
    the README count steps from 1: this is their step `step + 1`).

    Warm-up: index s < W = `lr_warmup_steps` uses lr · (s + 1) / W, a linear ramp from 0 that reaches
    lr at index W − 1 (step W). Then `constant` keeps lr; `cosine` and `linear` decay from lr at index W
    to `min_lr_ratio` · lr at the last step (index steps − 1).
    """
    warmup = train.lr_warmup_steps
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return train.lr
    decay_steps = max(1, train.steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if train.lr_schedule == "cosine":
        remaining = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        remaining = 1 - progress
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * remaining)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
