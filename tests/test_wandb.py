"""Weights & Biases logging, offline (no network): rank 0 alone logs what TensorBoard gets, the resolved
config and the summary, read back from the run's .wandb file; a resume continues the same W&B run
without sending the steps it redoes; asked for without wandb installed, it is one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.util import NUMERICS_ARGS, refused_in_process, train_run

HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'moectl[wandb]')")
WANDB_ARGS = [
    *("--set", "train.wandb=true", "--set", "train.wandb_mode=offline"),
    *("--set", "train.wandb_project=moectl-tests", "--set", "train.wandb_run_name=two-ranks"),
    *("--set", "train.wandb_tags=ddp, cpu"),
]
# W&B's transaction log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of records, each
# a 7-byte header (checksum, length, kind: whole, first, middle or last piece) and a protobuf Record.
BLOCK, HEADER = 32768, 7
WHOLE, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_file(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pieces, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # the rest of a block is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        payload = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == WHOLE:
            records.append(payload)
        elif kind == FIRST:
            pieces = payload
        elif kind == MIDDLE:
            pieces += payload
        elif kind == LAST:
            records.append(pieces + payload)
        elif kind == 0 and length == 0:
            break
    return [wandb_internal_pb2.Record.FromString(record) for record in records]


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _config_value(item):
    """A config entry as logged: the value itself, or (some W&B versions) `{"value": ..., "desc": ...}`."""
    return (
        item["value"]
        if isinstance(item, dict) and set(item) <= {"value", "desc"} and "value" in item
        else item
    )


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B run directory under RUN_DIR/wandb/, oldest first, as what its log holds."""
    runs = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = directory.glob("*.wandb")
        found = {"history": {}, "config": {}, "summary": {}, "run": None, "exit": None}
        for record in read_wandb_file(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["run"] = record.run
                found["config"].update(_items(record.run.config.update))
            elif kind == "config":
                found["config"].update(_items(record.config.update))
            elif kind == "history":
                values = _items(record.history.item)
                found["history"][values["_step"]] = values
            elif kind == "summary":
                found["summary"].update(_items(record.summary.update))
            elif kind == "exit":
                found["exit"] = record.exit.exit_code
        runs.append(found)
    return runs


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TEST = "test_offline_run_logs_scalars_config_and_summary_and_a_resume_continues_it"


def _two_ranks(tmp_path_factory) -> Callable[[], Path]:
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    args = ["--strategy", "ddp", "--nproc", "2", "--checkpoint-every", "4", *NUMERICS_ARGS, *WANDB_ARGS]
    return lambda: train_run(run_dir, *args)


def start_ahead(lane, request, items) -> None:
    """The two-rank run starts on the background lane (its resume runs in the test, in-process)."""
    if HAS_WANDB and any(item.originalname == TEST for item in items):
        lane.start(TEST, _two_ranks(request.getfixturevalue("tmp_path_factory")))


@needs_wandb
def test_offline_run_logs_scalars_config_and_summary_and_a_resume_continues_it(
    background_lane, tmp_path_factory
):
    """Two ranks, one W&B run (rank 0's) holding every step's TensorBoard scalars as metrics.jsonl has
    them, the resolved config and summary.json's figures; a resume from step 4 to step 10 redoes steps
    5-8 without logging them again and adds 9 and 10 to the same W&B run (steps count from 1)."""
    run = background_lane.result_or_run(TEST, _two_ranks(tmp_path_factory))
    (first,) = offline_runs(run)
    assert (first["run"].project, first["run"].display_name) == ("moectl-tests", "two-ranks")
    assert list(first["run"].tags) == ["ddp", "cpu"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert {key: _config_value(first["config"][key]) for key in ("model", "train", "parallel")} == {
        key: config[key] for key in ("model", "train", "parallel")
    }
    metrics = _metrics(run)
    assert sorted(first["history"]) == [record["step"] for record in metrics] == list(range(1, 9))
    for record in metrics:
        logged = first["history"][record["step"]]
        for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                         ("load_imbalance", "experts/load_imbalance"), ("mem_gib", "memory/peak_gib"),
                         ("tokens_per_s", "speed/tokens_per_s")):  # fmt: skip
            assert logged[tag] == pytest.approx(record[key], rel=1e-6), (record["step"], tag)
        assert "experts/load_imbalance/layer_01" in logged and "speed/mfu" not in logged  # MFU n/a on a CPU
    summary = json.loads((run / "summary.json").read_text())
    for key in ("final_loss", "tokens_per_s_per_device", "peak_mem_gib", "median_step_time_s"):
        assert first["summary"][key] == pytest.approx(summary[key], rel=1e-6), key
    assert first["summary"]["degrees/dp"] == 2 and first["exit"] == 0
    run_id = first["run"].run_id

    # Resume from step 4 (the step-8 checkpoint is gone) and train on to step 10, on one process.
    shutil.rmtree(run / "checkpoints" / "step_000008")
    train_run(
        run, "--resume", str(run), "--steps", "10", "--strategy", "single", "--nproc", "1", in_process=True
    )
    import wandb

    wandb.teardown()  # the in-process run's W&B service
    _, second = offline_runs(run)
    assert second["run"].run_id == run_id
    assert sorted(second["history"]) == [9, 10]
    metrics = _metrics(run)
    assert [record["step"] for record in metrics] == list(range(1, 11))
    assert [second["history"][step]["train/loss"] for step in (9, 10)] == pytest.approx(
        [record["loss"] for record in metrics[8:]], rel=1e-6
    )
    assert json.loads((run / "wandb" / "moectl-run.json").read_text()) == {"id": run_id, "last_step": 10}


def test_wandb_asked_for_but_not_installed_or_a_bad_mode_is_one_line(tmp_path, capsys, monkeypatch):
    import moectl.run.wandb_log

    run_dir = tmp_path / "never"
    refused_in_process(
        ["train", "--run-dir", str(run_dir), "--set", "train.wandb=true", "--set", "train.wandb_mode=cloudy"],
        capsys,
        "train.wandb_mode must be one of online, offline",
    )
    monkeypatch.setattr(moectl.run.wandb_log.importlib.util, "find_spec", lambda name: None)
    refused_in_process(
        ["train", "--run-dir", str(run_dir), "--set", "train.wandb=true"],
        capsys,
        "pip install 'moectl[wandb]'",
    )
    assert not run_dir.exists()
