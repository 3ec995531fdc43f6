"""TensorBoard event files of a run (`train.tensorboard=true`), written by rank 0 under RUN_DIR/tensorboard/.

tensorboard is an optional extra (`pip install 'moectl[tensorboard]'`); `moectl train` refuses the key
without it before anything runs (`check_available`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from moectl.errors import UsageError

TENSORBOARD_DIR = "tensorboard"
#: metrics.jsonl key -> TensorBoard tag
SCALARS = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "val_ppl": "val/perplexity",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "aux_loss": "train/aux_loss",
    "load_imbalance": "experts/load_imbalance",
    "tokens_per_s": "speed/tokens_per_s",
    "tokens_per_s_per_device": "speed/tokens_per_s_per_device",
    "mfu": "speed/mfu",
    "mem_gib": "memory/peak_gib",
}


def check_available() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            "train.tensorboard=true needs the tensorboard package: pip install 'moectl[tensorboard]' "
            "(or pip install tensorboard), or drop the key"
        )


class TensorBoardLog:
    """One SummaryWriter; a resumed run drops the events of the steps it redoes (purge_step). Events are
    numbered as metrics.jsonl numbers its steps, from 1."""

    def __init__(self, run_dir: Path | None, start_step: int, enabled: bool):
        """`start_step`: the steps done before this session (a resume's checkpoint)."""
        self.writer = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
            )

    def step(self, record: dict[str, Any], imbalance_per_layer: list[float]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, tag in SCALARS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        for layer, value in enumerate(imbalance_per_layer):
            self.writer.add_scalar(f"experts/load_imbalance/layer_{layer:02d}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
