"""Activation checkpointing of expert-parallel layers without routing or communicating twice.

A checkpointed layer runs its forward twice: once for real, once during backward to rebuild what the
backward needs. Rerun naively, the MoE block would route again, exchange the counts again, sync with
the host again and run both token all-to-alls again: three more exchanges per layer, and if the
recomputed routing differs at all (bf16 ties) the row counts differ and one rank raises while the others
wait for the collective timeout. So, as torchtitan's selective checkpointing keeps the all-to-all
outputs, the block *records* what crosses ranks in its first forward — the routing decision and
exchange plan, the received rows with their expert ids and weights — and its recompute *replays* them:
the recompute neither routes (the router's arithmetic reruns for its gradient, its decision is the
recorded one) nor communicates, and the expert GEMMs are recomputed as usual.

How a block knows which run it is in: `checkpoint_contexts` is the `context_fn` of
`torch.utils.checkpoint`; it enters one context around the first forward and another around the
recompute (moectl.model.build.apply_layer_wrappers passes it through transformers' checkpointing switch).
Other code that must not act twice under checkpointing (say a router that counts expert loads) can ask
`checkpoint_phase()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

FORWARD = "forward"
RECOMPUTE = "recompute"


class _Phase(threading.local):
    # Thread-local: the recompute runs inside backward, on autograd's device thread for GPUs.
    name: str | None = None


_PHASE = _Phase()


def checkpoint_phase() -> str | None:
    """FORWARD inside a checkpointed layer's first forward, RECOMPUTE inside its recompute, else None."""
    return _PHASE.name


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    previous, _PHASE.name = _PHASE.name, name
    try:
        yield
    finally:
        _PHASE.name = previous


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: (around the first forward, around the recompute)."""
    return _phase(FORWARD), _phase(RECOMPUTE)


class Tape:
    """What one checkpointed forward of one block recorded, replayed in the same order by its recompute."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.cursor = 0

    def next(self) -> Any:
        item = self.items[self.cursor]
        self.cursor += 1
        return item


class TapeDeck:
    """A block's tapes, first in first out: each forward under checkpointing records one, the recompute of
    that forward (in its backward, before the next forward of the block) plays it back.

    A tape is taken off the deck whole when its recompute starts, so a recompute that torch stops early
    (once it has every tensor the backward needs) leaves nothing behind for the next micro-batch.
    """

    def __init__(self) -> None:
        self._tapes: deque[Tape] = deque()

    def start(self) -> tuple[Tape | None, bool]:
        """(tape, replaying) for the forward about to run: a new tape to record, the oldest to replay,
        or (None, False) outside checkpointing."""
        phase = checkpoint_phase()
        if phase == FORWARD:
            tape = Tape()
            self._tapes.append(tape)
            return tape, False
        if phase == RECOMPUTE:
            if not self._tapes:
                raise RuntimeError("an expert-parallel block is recomputed without a recorded forward")
            return self._tapes.popleft(), True
        return None, False

    def __len__(self) -> int:
        return len(self._tapes)
