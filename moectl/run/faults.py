"""Faults the loop survives or reports cleanly: stop signals and non-finite numbers.

Why a stop request is only *recorded* by the signal handler: a rank interrupted inside a collective
or half-way through `optimizer.step` would leave its peers blocked and its state torn. The loop
instead finishes the current step, all ranks agree to stop (one tiny all-reduce per step, together
with the non-finite-gradient flag), write a checkpoint together and exit with a clear message.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moectl.errors import TrainingStopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLoss(TrainingStopped):
    exit_code = 3


#: label of stops every rank agrees on although their exit code (1) is also a crash's
AGREED_STOP_LABEL = "stopped"


class ExpertOverload(TrainingStopped):
    """One rank would receive more expert rows than it may take. Every rank sees every rank's load
    (the dispatch's count exchange), so all of them raise this at the same layer: nobody hangs."""

    label = AGREED_STOP_LABEL


class Interrupted(TrainingStopped):
    label = "interrupted"

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """Context manager: SIGINT/SIGTERM ask for a clean stop; a second one aborts at once.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum  # nothing else here: printing from a handler can hit a reentrant write

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc_info: object) -> None:
        self._restore()


def _local_grads(model: nn.Module) -> list[torch.Tensor]:
    return [
        p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        for p in model.parameters()
        if p.grad is not None
    ]


def agree_on_step(
    model: nn.Module, stop: StopSignals, device: torch.device, grad_norm: torch.Tensor | None = None
) -> tuple[bool, bool]:
    """(some gradient on some rank is non-finite, some rank was asked to stop), the same on every rank.

    With `grad_norm`, the global gradient norm the loop has computed anyway (Strategy.grad_norm: fp32,
    equal on every rank), a non-finite gradient is a non-finite norm and costs no further pass over the
    gradients. Without it, each rank checks only the gradient pieces it holds (the max-abs norm, which
    cannot overflow where an L2 norm of finite values could), so this works for replicated,
    DTensor-sharded and plain-local-shard strategies alike. One all-reduce (MAX) over all ranks makes
    the verdict common.
    """
    if grad_norm is not None:
        bad_grad = (~torch.isfinite(grad_norm)).float()
    elif grads := _local_grads(model):
        max_abs = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), foreach=True)
        bad_grad = (~torch.isfinite(max_abs)).float()
    else:
        bad_grad = torch.zeros((), device=device)
    flags = torch.stack([bad_grad.to(device), torch.tensor(float(stop.requested), device=device)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop_now = (flags > 0).tolist()
    return bad, stop_now


def last_error_line(text: str) -> str:
    """The line of a stderr that names the error: the last one that is not traceback framing."""
    framing = ("File ", "^", "~", "Traceback", "During handling", "The above exception", "raise ")
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not line.startswith(framing):
            return line[:400]
    return ""
