"""Weights & Biases logging of a run (`train.wandb=true`), by rank 0: what TensorBoard gets (the same
scalars under the same names), the resolved config, and at the end what summary.json holds.

wandb is an optional extra (`pip install 'moectl[wandb]'`); `moectl train` refuses the key without it
before anything runs (`check`). Its files go under RUN_DIR/wandb/ (an offline run there is uploaded
later with `wandb sync`).

A resume continues the same W&B run: its id is kept in RUN_DIR/wandb/moectl-run.json with the last step
logged. W&B keeps one value per step and only accepts increasing steps, so the steps a resume redoes
(those after the checkpoint that were logged before the stop: they train bit-identically) are not sent
again, and logging goes on from the first step past them; TensorBoard instead rewrites them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from moectl.config import RunConfig, TrainConfig
from moectl.errors import UsageError
from moectl.run.tensorboard_log import SCALARS

WANDB_DIR = "wandb"
STATE_FILE = "moectl-run.json"
MODES = ("online", "offline")


def check(train: TrainConfig) -> None:
    """The W&B keys make sense and wandb is installed (only when train.wandb is on)."""
    if not train.wandb:
        return
    if train.wandb_mode is not None and train.wandb_mode not in MODES:
        raise UsageError(f"train.wandb_mode must be one of {', '.join(MODES)}, got {train.wandb_mode!r}")
    if importlib.util.find_spec("wandb") is None:
        raise UsageError(
            "train.wandb=true needs the wandb package: pip install 'moectl[wandb]' (or pip install wandb), "
            "or drop the key"
        )


def tags(train: TrainConfig) -> list[str]:
    return [tag.strip() for tag in (train.wandb_tags or "").split(",") if tag.strip()]


class WandbLog:
    """One W&B run of this rank (enabled on rank 0 only); `finish` ends it with the run's summary."""

    def __init__(self, cfg: RunConfig, run_dir: Path | None, start_step: int, enabled: bool):
        self.run = None
        self.note = ""
        if not (enabled and run_dir is not None):
            return
        import wandb

        train = cfg.train
        self.state_path = run_dir / WANDB_DIR / STATE_FILE
        state = self._read_state() if start_step else {}
        self.last_step = int(state.get("last_step", -1))
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=train.wandb_project,
            name=train.wandb_run_name or run_dir.resolve().name,
            tags=tags(train),
            config=cfg.to_dict(),
            dir=str(run_dir),
            mode=train.wandb_mode,
            id=state.get("id"),
            resume="allow" if state.get("id") else None,
            # moectl owns the console (progress bar, summary): W&B neither wraps it nor prints banners
            settings=wandb.Settings(console="off", silent=True),
        )
        self._write_state()
        how = "resumed" if state.get("id") else "new"
        if self.run.settings.mode in ("offline", "dryrun"):
            where = f"offline; upload it with: wandb sync {Path(self.run.dir).parent}"
        else:
            where = self.run.url
        self.note = f"W&B run {self.run.name} ({how}): {where}"

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self) -> None:
        temporary = self.state_path.with_name(f".{STATE_FILE}.tmp")
        temporary.write_text(json.dumps({"id": self.run.id, "last_step": self.last_step}))
        os.replace(temporary, self.state_path)

    def step(self, record: dict[str, Any], imbalance_per_layer: list[float]) -> None:
        if self.run is None or record["step"] <= self.last_step:
            return
        values = {tag: record[key] for key, tag in SCALARS.items() if record.get(key) is not None}
        for layer, value in enumerate(imbalance_per_layer):
            values[f"experts/load_imbalance/layer_{layer:02d}"] = value
        self.run.log(values, step=record["step"])
        self.last_step = record["step"]
        self._write_state()

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        """End the W&B run: with summary.json's figures (nested ones as `a/b`), or as failed."""
        if self.run is None:
            return
        if summary:
            self.run.summary.update(_flat(summary))
        self.run.finish(exit_code=exit_code)
        self.run = None


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of summary.json, nested mappings as `a/b`; lists (the loss curve, in the history) left out."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif not isinstance(value, list | tuple) and value is not None:
            flat[f"{prefix}{key}"] = value
    return flat
