"""Out of the box: the README's commands run as printed, the tiny preset admits every strategy and
trains smoothly, and each input the first users tripped over is refused in one line (exit code 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from moectl.bench.record import RunRecord
from moectl.bench.run_list import degrees_for
from moectl.bench.verify import loss_mismatch
from moectl.config import build_config
from moectl.registry import available_strategies, get_strategy
from tests.util import (
    README_BENCH_SHOWCASE,
    REPO,
    assert_outputs_complete,
    assert_same_training,
    refused_in_process,
    run_moectl,
)

TINY_RUN = ["--steps", "2", "--global-batch", "8", "--micro-batch", "2"]


def readme_commands() -> list[str]:
    """Every `moectl …` line of the README's bash blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith("moectl "):
                commands.append(" ".join(command.split()))
    return commands


def needs_a_gpu(command: str) -> bool:
    """The 30B preset trains only on GPUs; `moectl plan` only predicts, so it runs anywhere."""
    return "qwen3-30b-a3b" in command and not command.startswith("moectl plan")


def test_the_readme_prints_the_default_train_and_the_bench_showcase():
    commands = readme_commands()
    assert "moectl train" in commands
    assert README_BENCH_SHOWCASE in commands


@pytest.mark.readme(*[command for command in readme_commands() if not needs_a_gpu(command)])
def test_every_cpu_command_of_the_readme_runs_as_printed(readme_run):
    """From a fresh directory with only the repository's examples beside it, every README command that
    does not need a GPU exits 0 exactly as printed: `moectl train` (the default), the bench showcase
    over every strategy on 4 processes with weight verification, the plans, the plugin example."""
    cwd = readme_run.cwd
    ran = []
    for command in readme_commands():
        if needs_a_gpu(command) or command.startswith("pip "):
            continue
        result = readme_run(command)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ran.append(command)
        if command == "moectl train":
            assert "done: run directory runs/" in result.stdout
            (run_dir,) = (cwd / "runs").glob("*-single")
            losses = [
                json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            ]
            assert len(losses) == 40 and losses[-1] < 0.25 * losses[0], losses
        if command.startswith("moectl bench"):
            payload = json.loads((cwd / "runs/bench1/bench.json").read_text())
            rows = {row["name"]: row for row in payload["rows"]}
            assert list(rows) == ["single", "ddp", "fsdp", "tp", "mixed", "ep"]
            for name, row in rows.items():
                assert row["status"] == "ok" and row["world_size"] == (1 if name == "single" else 4), row
                verify = row["verify"]
                assert verify["status"] == ("reference" if name == "single" else "pass"), (name, verify)
                assert verify["steps"] == 40 and verify["max_loss_diff"] <= 1e-5, (name, verify)
                # and the suite's own check: every tensor's update over the 40 steps of the preset
                bench1 = cwd / "runs/bench1"
                assert_same_training(bench1 / row["run_dir"], bench1 / rows["single"]["run_dir"])
            assert re.search(r"tok/s/device .* steps .* max Δloss", result.stdout), result.stdout
            assert "GPU" not in result.stdout
    assert "moectl train" in ran and any(c.startswith("moectl bench") for c in ran), ran


def test_the_tiny_preset_admits_every_strategy_on_2_and_4_processes():
    """No built-in is skipped for its degrees at 2 or 4 processes, except mixed at 2 (dp 2 × tp 1)."""
    cfg = build_config("tiny")
    builtins = ["single", "ddp", "fsdp", "tp", "mixed", "ep"]
    assert set(builtins) <= set(available_strategies())
    for nproc in (2, 4):
        for name in builtins:
            world, flags, skip = degrees_for(get_strategy(name), nproc, [], cfg)
            if name == "mixed" and nproc == 2:
                assert skip is not None
                continue
            assert skip is None, (name, nproc, skip)
            assert world == (1 if name == "single" else nproc)
    assert degrees_for(get_strategy("tp"), 4, [], cfg)[1] == ["--tp-size", "4"]
    assert degrees_for(get_strategy("ep"), 4, [], cfg)[1] == ["--ep-size", "4"]


def test_the_tiny_preset_loss_falls_smoothly(tmp_path):
    """The default 40 steps: no step's loss rises by 1 % of the first loss (the old preset's rose by 10 %
    at steps 6–9). Beyond them, down at the loss floor, batch-to-batch noise stays under 2.5 % and nothing
    climbs back up."""
    from tests.util import losses, train_run

    run = train_run(tmp_path / "run", "--steps", "100", "--set", "train.save_model=false", in_process=True)
    curve = losses(run)
    rises = [later - earlier for earlier, later in zip(curve, curve[1:], strict=False)]
    assert max(rises[:39]) < 0.01 * curve[0], max(rises[:39])
    assert max(rises) < 0.025 * curve[0], max(rises)
    assert curve[39] < 0.25 * curve[0] and max(curve[60:]) < 0.1 * curve[0], curve


# ---- loss curves in bench's verification ---------------------------------------------------------
def _record(losses: list[float]) -> RunRecord:
    record = RunRecord("x", "x", 1, [])
    record.loss_curve = [{"step": step, "loss": loss} for step, loss in enumerate(losses, start=1)]
    return record


def test_bench_compares_the_loss_of_every_step():
    reference = _record([4.0, 2.0, 0.5])
    assert loss_mismatch(_record([4.0 + 3e-5, 2.0, 0.5 + 5e-6]), reference, 1e-5) == (
        pytest.approx(3e-5),
        None,
    )
    largest, why = loss_mismatch(_record([4.0, 2.0, 0.5 + 2e-5]), reference, 1e-5)
    assert largest == pytest.approx(2e-5)
    assert why.startswith("loss 0.50002 at step 3 differs from the reference's 0.5 by 2.00e-05"), why
    assert (
        "the run recorded 2 steps, the reference 3" in loss_mismatch(_record([4.0, 2.0]), reference, 1e-5)[1]
    )


def test_bench_passes_lr_to_every_run(tmp_path):
    from moectl.bench.run_list import BenchOptions, plan_bench

    plan = plan_bench(BenchOptions(strategies=["single", "ddp"], nproc=2, out=tmp_path / "out", lr=0.05))
    assert plan.cfg.train.lr == 0.05
    assert plan.common_args[plan.common_args.index("--lr") + 1] == "0.05"


# ---- each defect a first user hit ----------------------------------------------------------------
@pytest.mark.parametrize("array", [None, np.array([], dtype=np.int64)], ids=["zero-bytes", "no-tokens"])
def test_an_empty_npy_file_is_bad_input_not_an_interrupt(tmp_path, capsys, array):
    data = tmp_path / "empty.npy"
    if array is None:
        data.write_bytes(b"")
    else:
        np.save(data, array)
    refused_in_process(
        ["train", "--data", str(data), "--run-dir", str(tmp_path / "run")], capsys, "empty.npy"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--lr", "nan"], "train.lr must be a finite number"),
        (["--lr", "inf"], "train.lr must be a finite number"),
        (["--lr", "-0.1"], "train.lr must be positive"),
        (["--lr", "0"], "train.lr must be positive"),
        (["--set", "train.momentum=-0.5"], "train.momentum must not be negative"),
        (["--set", "train.weight_decay=.nan"], "train.weight_decay must be a finite number"),
        (["--set", "train.peak_tflops=-5"], "train.peak_tflops must be positive"),
        (["--set", "model.rms_norm_eps=0"], "model.rms_norm_eps must be positive"),
        (["--set", "data.noise=.inf"], "data.noise must be a finite number"),
    ],
)
def test_non_finite_and_negative_numbers_arerefused_in_process(tmp_path, capsys, flags, names):
    refused_in_process(["train", *flags, "--run-dir", str(tmp_path / "run")], capsys, names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("place", ["/proc", "/sys"])
def test_a_run_directory_under_a_pseudo_file_system_is_refused_as_unwritable(tmp_path, capsys, place):
    if not Path(place).is_dir():
        pytest.skip(f"no {place} here")
    line = refused_in_process(
        ["train", "--run-dir", f"{place}/moectl-run", *TINY_RUN], capsys, f"cannot write under {place}"
    )
    assert "GiB" not in line
    assert not Path(f"{place}/moectl-run").exists()


def test_a_disk_that_is_too_small_is_named_in_human_units():
    from moectl.model.sizing import format_bytes

    assert [format_bytes(n) for n in (0, 512, 3 * 2**20 + 2**19, 61 * 2**30)] == [
        "0 B",
        "512 B",
        "3.5 MiB",
        "61.0 GiB",
    ]


SYSTEM_EXIT_PLUGIN = """
import os, sys
from strategies.ddp import DDP

if {condition}:
    sys.exit(0)


class Quitter(DDP):
    name = "quitter"
"""


def test_a_plugin_that_exits_at_import_is_refused_in_one_line(tmp_path, capsys):
    plugin = tmp_path / "quitter.py"
    plugin.write_text(SYSTEM_EXIT_PLUGIN.format(condition="True"))
    refused_in_process(
        ["train", "--strategy", str(plugin), "--run-dir", str(tmp_path / "run")],
        capsys,
        "quitter.py",
        "exit(0)",
    )
    assert not (tmp_path / "run").exists()


def test_a_plugin_that_exits_at_import_only_in_the_workers_fails_the_run(tmp_path):
    """The launcher imports it fine; each worker's import calls sys.exit(0): exit code 2 and one line,
    never exit 0 having done nothing."""
    plugin = tmp_path / "quitter.py"
    plugin.write_text(SYSTEM_EXIT_PLUGIN.format(condition='"TORCHELASTIC_RUN_ID" in os.environ'))
    run_dir = tmp_path / "run"
    result = run_moectl(
        "train", "--strategy", str(plugin), "--nproc", "2", "--run-dir", str(run_dir), *TINY_RUN
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "quitter.py failed to import (exit(0))" in lines[0], result.stderr
    assert_outputs_complete(run_dir, 0, checkpoint=None, finished=False, ranks=2, logs_end_with="error: ")


def test_a_module_plugin_whose_import_raises_is_one_line(tmp_path):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "strategy.py").write_text("import math\nraise ValueError('plugin refuses to load')\n")
    result = run_moectl(
        "train", "--strategy", "brokenpkg.strategy:Thing", "--run-dir", str(tmp_path / "run"),
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "brokenpkg.strategy" in lines[0] and "ValueError: plugin refuses to load" in lines[0]
    assert not (tmp_path / "run").exists()


def test_usage_errors_from_click_are_one_line(tmp_path):
    for argv in (["train", "--steps", "abc"], ["train", "--no-such-flag"], ["compare-weights", "only-one"]):
        result = run_moectl(*argv, timeout=60)
        assert result.returncode == 2, (argv, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (argv, result.stderr)


def test_readme_flags_exist_in_help():
    """Every flag the README's train and bench tables name is one the CLI takes."""
    text = (REPO / "README.md").read_text()
    for command in ("train", "bench"):
        section = text[text.index(f"### `moectl {command}`") :]
        section = section[: section.index("\n### ", 5)]
        flags = set(re.findall(r"^\| `(--[a-z-]+)", section, flags=re.MULTILINE))
        help_text = run_moectl(command, "--help", timeout=60).stdout
        assert flags and all(flag in help_text for flag in flags), sorted(
            f for f in flags if f not in help_text
        )


# ---- --model: config fields moectl does not implement ----------------------------------------------
def _hf_checkpoint(directory: Path, **fields) -> Path:
    """A real transformers Qwen3-MoE checkpoint of the tiny shapes, with `fields` set in its config."""
    from transformers import Qwen3MoeForCausalLM

    from moectl.model.build import hf_config

    config = hf_config(build_config("tiny").model)
    for key, value in fields.items():
        setattr(config, key, value)
    Qwen3MoeForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"attention_bias": True}, "attention_bias = true"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers = [1]"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step = 2"),
        ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window = true"),
        ({"hidden_act": "gelu"}, 'hidden_act = "gelu"'),
        ({"attention_dropout": 0.1}, "attention_dropout = 0.1"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_a_checkpoint_config_moectl_does_not_implement_isrefused_in_process(tmp_path, capsys, fields, named):
    model = _hf_checkpoint(tmp_path / "hf", **fields)
    run_dir = tmp_path / "run"
    line = refused_in_process(
        ["train", "--model", str(model), "--run-dir", str(run_dir), *TINY_RUN], capsys, named
    )
    assert "does not implement" in line
    assert not run_dir.exists()


def test_a_scaled_rope_isrefused_in_process(tmp_path, capsys):
    model = _hf_checkpoint(tmp_path / "hf")
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    config["rope_scaling"] = config["rope_parameters"]
    (model / "config.json").write_text(json.dumps(config))
    refused_in_process(["train", "--model", str(model), "--run-dir", str(tmp_path / "run")], capsys, "yarn")
    assert not (tmp_path / "run").exists()


def test_weights_the_config_does_not_describe_are_refused_never_dropped(tmp_path, capsys):
    """A checkpoint with attention biases whose config.json was edited to say it has none: the 8 bias
    tensors have no place in the model, so the run is refused instead of training without them."""
    model = _hf_checkpoint(tmp_path / "hf", attention_bias=True)
    config = json.loads((model / "config.json").read_text())
    config["attention_bias"] = False
    (model / "config.json").write_text(json.dumps(config))
    line = refused_in_process(
        ["train", "--model", str(model), "--run-dir", str(tmp_path / "run")], capsys, "holds 8 tensor(s)"
    )
    assert ".bias" in line
    assert not (tmp_path / "run").exists()


def test_a_plain_transformers_checkpoint_still_trains(tmp_path):
    """The refusals leave a checkpoint transformers itself wrote, with nothing unusual, alone."""
    from tests.util import train_run

    model = _hf_checkpoint(tmp_path / "hf")
    run = train_run(tmp_path / "run", "--model", str(model), *TINY_RUN, in_process=True)
    assert (run / "model" / "config.json").is_file()


def test_the_plot_leaves_out_the_mfu_panel_where_no_device_peak_is_known(tmp_path):
    """On the CPU every MFU is n/a: the panel would be empty, so bench.png has two panels, not three."""
    import io
    import struct

    from rich.console import Console

    from moectl.bench.report import write_plot

    pytest.importorskip("matplotlib")
    row = {
        "name": "ddp",
        "status": "ok",
        "tokens_per_s_per_device": 100.0,
        "mfu": None,
        "mfu_seed": None,
        "loss_curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
    }
    widths = {}
    for name, mfu in (("cpu", None), ("gpu", 0.4)):
        payload = {"rows": [{**row, "mfu": mfu, "mfu_seed": mfu}], "verify": {"reference_run": None}}
        assert write_plot(payload, tmp_path / f"{name}.png", Console(file=io.StringIO()))
        widths[name] = struct.unpack(">I", (tmp_path / f"{name}.png").read_bytes()[16:20])[0]
    assert widths["cpu"] < 0.75 * widths["gpu"], widths
