"""What the console tells: help without torch, one line per refusal or failure, rank 0's progress
unprefixed (a progress bar on a terminal, plain lines otherwise), the summary block at the end."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moectl.run.report import summary_lines
from tests.layouts import CHECKPOINT_EVERY
from tests.util import (
    NUMERICS_STEPS,
    REPO,
    assert_outputs_complete,
    console_output,
    run_moectl,
    run_moectl_in_process,
)

TINY_RUN = ["--steps", "3", "--global-batch", "8", "--micro-batch", "2"]

HEAVY_MODULES_AFTER = """
import sys
from moectl.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("HEAVY:", sorted(m for m in ("torch", "transformers", "numpy", "rich") if m in sys.modules), file=sys.stderr)
"""


def _loaded_after(argv: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", HEAVY_MODULES_AFTER.format(argv=argv)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "100"},
    )  # fmt: skip
    heavy = re.search(r"HEAVY: (\[.*\])", result.stderr)
    assert heavy, result.stderr
    return result, eval(heavy.group(1))


def test_help_and_usage_errors_load_neither_torch_nor_transformers():
    for argv in (["--help"], ["train", "--help"], ["bench", "--help"], ["train", "--steps", "abc"], []):
        result, heavy = _loaded_after(argv)
        assert heavy == [], (argv, heavy)
        assert "Usage:" in result.stdout + result.stderr or "error:" in result.stderr, (argv, result.stderr)


def test_help_shows_flags_plainly():
    root = run_moectl("--help", timeout=60).stdout
    assert "<bool>" not in root and "--help" in root
    for command in ("train", "compare-weights", "bench", "plan"):
        assert command in root
    compare = run_moectl("compare-weights", "--help", timeout=60).stdout
    assert "Usage: moectl compare-weights [OPTIONS] A B" in compare, compare
    train = run_moectl("train", "--help", timeout=60).stdout
    assert "--dry-run" in train and "--no-dry-run" not in train and "<bool>" not in train
    assert "--set SECTION.KEY=VALUE" in train


def _plain_run(tmp_path_factory) -> Callable[[], tuple[Path, subprocess.CompletedProcess]]:
    run_dir = tmp_path_factory.mktemp("console") / "run"

    def run() -> tuple[Path, subprocess.CompletedProcess]:
        result = run_moectl("train", "--run-dir", str(run_dir), *TINY_RUN, "--checkpoint-every", "3")
        assert result.returncode == 0, result.stderr
        return run_dir, result

    return run


def start_ahead(lane, request, items) -> None:
    factory = request.getfixturevalue("tmp_path_factory")
    lane.start_if_read(items, "plain_run", "console-plain-run", lambda: _plain_run(factory))


@pytest.fixture(scope="module")
def plain_run(background_lane, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `moectl train` of 3 steps as a subprocess (output not a terminal), with a checkpoint at the
    end: its console output and run directory, shared by the tests below (copy it to change it)."""
    return background_lane.result_or_run("console-plain-run", lambda: _plain_run(tmp_path_factory)())


def test_a_run_prints_nothing_but_its_progress(plain_run):
    """No import-time warnings before the first step (torchao's kernel libraries, pytree registrations)."""
    _, result = plain_run
    assert result.stderr == "", result.stderr
    assert result.stdout.startswith("step 1: "), result.stdout[:500]


def test_only_the_known_import_messages_are_dropped():
    import logging

    from moectl.import_noise import silence_known_import_noise

    silence_known_import_noise()
    silence_known_import_noise()  # twice: still one filter each
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        logger.addHandler(handler)
    try:
        logging.getLogger("torchao").warning("Failed to load /x/site-packages/torchao/_C_mxfp8.so: no GPU")
        logging.getLogger("torchao").warning("Failed to load the config")  # not a kernel library: kept
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
            "Calling register_constant() on Enum subclasses is deprecated and will be an error.",
            "<enum 'KernelPreference'>",
        )
        logging.getLogger("torch.utils._pytree").warning("another pytree warning")
    finally:
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).removeHandler(handler)
    assert seen == ["Failed to load the config", "another pytree warning"]


def test_step_lines_say_per_device_and_warm_up_is_not_timed(plain_run):
    run_dir, result = plain_run
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3
    # One numbering everywhere: step 1 is the first optimizer step, on the console and in metrics.jsonl.
    recorded = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(line.split(":")[0].split()[1]) for line in steps] == recorded == [1, 2, 3]
    assert all("tok/s/device" in line and "total" not in line for line in steps), steps  # one device
    assert [("warm-up (not timed)" in line) for line in steps] == [True, True, False]


def test_the_summary_block_ends_the_run(plain_run):
    run_dir, result = plain_run
    block = result.stdout[result.stdout.index("done: run directory") :]
    summary = json.loads((run_dir / "summary.json").read_text())
    first, last = summary["losses"][0], summary["losses"][-1]
    for expected in (
        f"done: run directory {run_dir}",
        "model        Qwen3-MoE, 2 layers, 8 experts (top-2):",
        "parameters,",
        "active per token",
        "strategy     single on 1 process",
        "steps        3",
        "tokens/s per device (median)",
        "MFU          n/a",
        "peak memory  ",
        f"loss         {first:.4f} → {last:.4f}",
        f"model dir    {run_dir / 'model'}",
    ):
        assert expected in block, (expected, block)
    assert f"plots        {run_dir / 'expert_load.png'}, {run_dir / 'loss.png'}" in block
    assert summary["degrees"] == {"dp": 1, "tp": 1, "ep": 1}


def test_the_summary_names_only_the_plots_that_exist(plain_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(plain_run[0], run_dir)
    for plot in run_dir.glob("*.png"):
        plot.unlink()
    assert "plots" not in dict(summary_lines(run_dir))
    (run_dir / "loss.png").write_bytes(b"png")
    assert dict(summary_lines(run_dir))["plots"] == str(run_dir / "loss.png")


def test_a_resumed_run_labels_its_first_steps_as_timing_warm_up(plain_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(plain_run[0], run_dir)
    result = run_moectl("train", "--resume", str(run_dir), "--steps", "6")
    assert result.returncode == 0, result.stderr
    assert (
        "resumed at step 3 of 6 from step_000003; the next 2 step(s) are warm-up again (not timed)"
        in result.stdout
    )
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 4", "step 5", "step 6"]
    recorded = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recorded == [1, 2, 3, 4, 5, 6]
    assert [("warm-up (not timed)" in line) for line in steps] == [True, True, False]


def test_a_run_shorter_than_its_warm_up_says_nothing_was_timed(tmp_path):
    """--steps 1 (timing_warmup_steps 2): no median of untimed steps, but null figures with the reason."""
    run_dir = tmp_path / "run"
    result = run_moectl_in_process("train", "--run-dir", str(run_dir), "--steps", "1", "--set",
                                   "train.save_model=false")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("median_step_time_s", "tokens_per_s", "tokens_per_s_per_device", "mfu", "mfu_seed"):
        assert summary[key] is None, key
    assert (
        "all 1 step(s) of this session were warm-up (train.timing_warmup_steps = 2)" in summary["not_timed"]
    )
    speed = dict(summary_lines(run_dir))["speed"]
    assert speed.startswith("not measured: all 1 step(s)") and "median" not in speed, speed
    assert "speed        not measured" in result.stdout and "tokens/s per device" not in result.stdout


RECORD = {"loss": 4.83491, "tokens_per_s_per_device": 3100.4, "tokens_per_s": 12401.6, "mfu": 0.412,
          "mem_gib": 0.41, "warmup": True}  # fmt: skip


def _progress_at(width: int, world_size: int) -> str:
    from rich.console import Console

    from moectl.run.report import progress_fields, progress_line

    fields = progress_fields(RECORD, world_size, 3, 40, 12.3, f"fsdp ×{world_size}")
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(progress_line(fields, width, 3, 40))
    return out.getvalue().rstrip("\n")


@pytest.mark.parametrize("width", [30, 60, 80, 100, 120, 200])
@pytest.mark.parametrize("world_size", [1, 4])
def test_the_progress_line_fits_the_terminal_keeping_the_count_and_eta(width, world_size):
    line = _progress_at(width, world_size)
    assert "\n" not in line and len(line) <= width, line
    assert "…" not in line, line  # nothing cut short
    assert "3/40" in line and line.endswith("ETA 0:00:12"), line
    whole = ["loss 4.8349", "3,100 tok/s/device", "(12,402 total)", "MFU 41.2%", "mem 0.41 GiB", "warm-up"]
    for field in whole:  # a field is shown whole or not at all
        assert field in line or field.split()[-1] not in line.split(), (field, line)
    if width >= 60:
        assert "loss 4.8349 · 3,100 tok/s/device" in line, line
    if width >= 200:
        assert line.startswith(f"fsdp ×{world_size} ━") and "mem 0.41 GiB · warm-up" in line, line
        assert ("(12,402 total)" in line) == (world_size > 1), line


def test_the_progress_line_drops_the_least_useful_fields_first():
    from moectl.run.report import DROP_ORDER, fit_progress_fields, progress_fields

    fields = progress_fields(RECORD, 4, 3, 40, 12.3, "fsdp ×4")
    shown_at = {
        width: {kind for kind, _ in fit_progress_fields(fields, width)[0]} for width in range(20, 200)
    }
    for width in range(21, 200):
        assert shown_at[width - 1] <= shown_at[width], width  # more room never shows less
    for width, shown in shown_at.items():
        dropped = [kind for kind in DROP_ORDER if kind not in shown]
        assert dropped == list(DROP_ORDER[: len(dropped)]), (width, dropped)
        assert {"count", "eta"} <= shown


def test_a_terminal_gets_a_progress_bar_with_eta(tmp_path):
    """Under a pseudo-terminal of 80 columns rank 0 draws its progress line (count and ETA kept)
    instead of plain lines."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "moectl", "train", "--run-dir", str(tmp_path / "run"), *TINY_RUN],
        stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TERM": "xterm", "COLUMNS": "80"},
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, output[-2000:]
    text = output.decode(errors="replace")
    assert "ETA" in text and "3/3" in text, text[-2000:]
    assert not re.search(r"^step 1: ", text, flags=re.MULTILINE), text[-2000:]
    assert "done: run directory" in text


@pytest.mark.layouts("ddp")
def test_a_launched_run_prints_rank_0_unprefixed_and_logs_each_rank(trained):
    """The suite's shared ddp run on 2 processes (tests/layouts.py): what its console showed, and
    everything it wrote complete after the launcher and its workers exited."""
    run_dir = trained("ddp")
    stdout, stderr = console_output(run_dir)
    assert "default_role" not in stdout + stderr
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == NUMERICS_STEPS, steps
    assert all("tok/s/device (" in line and " total)" in line for line in steps), steps
    assert stderr.strip() == "", stderr
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["launcher.log", "rank0.log", "rank1.log"]
    from moectl.run.worker import PROGRESS_LINE

    for rank in (0, 1):  # a rank's log holds its header and (rank 0) its steps: no import-time noise
        text = (logs / f"rank{rank}.log").read_text()
        assert all(PROGRESS_LINE.match(line) for line in text.splitlines()), text[:2000]
    assert f"step {NUMERICS_STEPS}:" in (logs / "rank0.log").read_text()
    assert "strategy     ddp on 2 processes (dp 2)" in stdout
    last_checkpoint = NUMERICS_STEPS // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert_outputs_complete(run_dir, NUMERICS_STEPS, checkpoint=last_checkpoint, finished=True, ranks=2)


BOOM_PLUGIN = """
import torch.distributed as dist

from strategies.ddp import DDP


class Boom(DDP):
    name = "boom"

    def after_backward(self, model):
        if dist.get_rank() == 1:
            raise RuntimeError("rank one exploded on purpose")
        super().after_backward(model)
"""


def test_a_dead_worker_is_one_last_line_and_its_traceback_stays_in_its_log(tmp_path):
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM_PLUGIN)
    run_dir = tmp_path / "run"
    flags = [
        "--strategy",
        str(plugin),
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
        "--set",
        "parallel.timeout_s=60",
    ]
    result = run_moectl("train", *flags, *TINY_RUN)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: worker rank 1 exited with code 1: RuntimeError: rank one exploded on purpose; "
        f"no complete checkpoint was written; its log: {run_dir / 'logs' / 'rank1.log'}"
    ], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "Traceback" in (run_dir / "logs" / "rank1.log").read_text()
    assert_outputs_complete(run_dir, 0, checkpoint=None, finished=False, ranks=2)
    last_line = (run_dir / "logs" / "rank1.log").read_text().splitlines()[-1]
    assert last_line.endswith("RuntimeError: rank one exploded on purpose"), last_line


def test_the_readme_describes_the_log_layout():
    text = (REPO / "README.md").read_text()
    assert "RUN_DIR/logs/rank<k>.log" in text and "logs/launcher.log" in text
    assert "attempt_0" not in text


def test_benchmarks_records_the_help_timing():
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text[text.index("## `moectl --help`") :]
    assert "import torch" in section and "median" in section


def test_the_readme_documents_every_flag_and_config_key():
    import dataclasses

    import typer

    from moectl.cli import app
    from moectl.config import SECTIONS, RunConfig

    text = (REPO / "README.md").read_text()
    command = typer.main.get_command(app)
    missing = []
    for name, sub in command.commands.items():
        for param in sub.params:
            for flag in getattr(param, "opts", []):
                if (
                    flag.startswith("--")
                    and flag != "--help"
                    and f"`{flag}" not in text
                    and f" {flag}`" not in text
                ):
                    missing.append(f"moectl {name} {flag}")
    for section in SECTIONS:
        for f in dataclasses.fields(type(getattr(RunConfig(), section))):
            if f.name not in text:
                missing.append(f"{section}.{f.name}")
    assert missing == [], missing
