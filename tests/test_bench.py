"""`moectl bench`: every strategy in one run, verification, bench.json schema, failures, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from moectl.bench.one_run import run_one
from moectl.bench.record import BenchResult, RunRecord
from moectl.bench.report import PLOT_SKIPPED, write_plot
from moectl.bench.run_list import (
    BenchOptions,
    RunSpec,
    choose_reference,
    default_strategies,
    degrees_for,
    plan_bench,
)
from moectl.bench.runner import bench_command
from moectl.config import build_config
from moectl.errors import UsageError
from moectl.registry import get_strategy, short_name
from moectl.run.faults import last_error_line
from tests.util import (
    README_BENCH_SHOWCASE,
    REPO,
    assert_same_training,
    losses,
    run_moectl,
    run_moectl_in_process,
)

SMALL = ["--steps", "3", "--warmup", "1", "--global-batch", "8", "--micro-batch", "2"]
#: written out here, not discovered: the test of discovery must not take its answer from discovery
BUILTINS = ["single", "ddp", "fsdp", "tp", "mixed", "ep"]

BROKEN_PLUGIN = """
from strategies.ddp import DDP


class Broken(DDP):
    name = "broken"

    def parallelize(self, model, materialize, train):
        raise RuntimeError("broken plugin: parallelize refused on purpose")
"""

# Trains a different model: every gradient scaled by 0.97 (one process, like the single it derives from).
DRIFT_PLUGIN = """
from strategies.single import Single


class Drift(Single):
    name = "drift"

    def after_backward(self, model):
        super().after_backward(model)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(0.97)
"""

SLEEPY_PLUGIN = """
import time

from strategies.ddp import DDP


class Sleepy(DDP):
    name = "sleepy"

    def parallelize(self, model, materialize, train):
        time.sleep(600)
"""

# The documented bench.json schema (README "moectl bench"), written out independently of the code: key ->
# allowed JSON types.
NUM, NULL = (int, float), type(None)
TOP_LEVEL = {
    "schema_version": (int,),
    "complete": (bool,),
    "exit_code": (int, NULL),
    "created": (str,),
    "moectl_version": (str,),
    "settings": (dict,),
    "verify": (dict,),
    "rows": (list,),
}
SETTINGS = {
    "config": (str, NULL),
    "nproc": (int,),
    "steps": (int,),
    "warmup_steps": (int,),
    "global_batch": (int,),
    "micro_batch": (int,),
    "seq_len": (int,),
    "lr": NUM,
    "sets": (list,),
    "device": (str,),
    "precision": (str,),
}
VERIFY = {
    "enabled": (bool,),
    "reference": (str, NULL),
    "reference_why": (str, NULL),
    "rtol": (*NUM, NULL),
    "reference_run": (dict, NULL),
}
RUN = {
    "name": (str,),
    "strategy": (str,),
    "nproc": (int,),
    "args": (list,),
    "command": (list,),
    "run_dir": (str,),
    "status": (str,),
    "reason": (str, NULL),
    "exit_code": (int, NULL),
    "wall_s": (*NUM, NULL),
    "world_size": (int, NULL),
    "device": (str, NULL),
    "median_step_time_s": (*NUM, NULL),
    "tokens_per_s": (*NUM, NULL),
    "tokens_per_s_per_device": (*NUM, NULL),
    "mfu": (*NUM, NULL),
    "mfu_seed": (*NUM, NULL),
    "peak_mem_gib": (*NUM, NULL),
    "final_loss": (*NUM, NULL),
    "loss_curve": (list,),
    "verify": (dict, NULL),
}
RUN_VERIFY = {
    "status": (str,),
    "rel_err": (*NUM, NULL),
    "rtol": NUM,
    "reason": (str, NULL),
    "steps": (int,),
    "max_loss_diff": (*NUM, NULL),
    "worst_tensor": (str, NULL),
    "worst_tensor_rel_err": (*NUM, NULL),
}


def check_keys(obj: dict, schema: dict, where: str) -> None:
    assert set(obj) == set(schema), f"{where}: keys {sorted(set(obj) ^ set(schema))} differ from the schema"
    for key, types in schema.items():
        value = obj[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        assert ok, f"{where}.{key} = {value!r} is not one of {types}"


def check_run(run: dict, where: str) -> None:
    check_keys(run, RUN, where)
    assert run["status"] in ("pending", "ok", "failed", "skipped")
    assert all(isinstance(a, str) for a in run["args"] + run["command"])
    for point in run["loss_curve"]:
        check_keys(point, {"step": (int,), "loss": (*NUM, NULL)}, f"{where}.loss_curve[]")
    if run["verify"] is not None:
        check_keys(run["verify"], RUN_VERIFY, f"{where}.verify")
        assert run["verify"]["status"] in ("pass", "fail", "error", "reference")


def check_bench_json(payload: dict) -> None:
    check_keys(payload, TOP_LEVEL, "bench.json")
    assert payload["schema_version"] == 2
    check_keys(payload["settings"], SETTINGS, "settings")
    check_keys(payload["verify"], VERIFY, "verify")
    if payload["verify"]["reference_run"] is not None:
        check_run(payload["verify"]["reference_run"], "verify.reference_run")
    for index, run in enumerate(payload["rows"]):
        check_run(run, f"rows[{index}]")


@pytest.fixture(scope="module")
def full_bench(readme_run):
    """The README's bench showcase (every built-in on 4 processes, the default 40 steps, --verify), run
    once per session and shared with the test that runs the README's commands as printed."""
    result = readme_run(README_BENCH_SHOWCASE)
    out = readme_run.cwd / "runs" / "bench1"
    payload = json.loads((out / "bench.json").read_text())
    return result, out, payload, BUILTINS


@pytest.mark.readme(README_BENCH_SHOWCASE)
def test_every_strategy_runs_and_matches_the_reference(full_bench):
    result, out, payload, builtins = full_bench
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["name"]: row for row in payload["rows"]}
    assert list(rows) == builtins
    assert payload["complete"] and payload["exit_code"] == 0
    assert payload["verify"]["reference"] == "single" and payload["verify"]["rtol"] == 1e-5
    assert payload["verify"]["reference_run"] is None  # single is a row: its run is the reference
    for name in builtins:
        row = rows[name]
        assert row["status"] == "ok", (name, row["reason"])
        assert row["world_size"] == (1 if name == "single" else 4), name
        assert row["verify"]["status"] == ("reference" if name == "single" else "pass"), (name, row["verify"])
        assert row["verify"]["rel_err"] <= 1e-5 and row["verify"]["max_loss_diff"] <= 1e-5, name
        run_dir = out / row["run_dir"]
        assert_same_training(run_dir, out / rows["single"]["run_dir"])  # and the suite's per-tensor check
        summary = json.loads((run_dir / "summary.json").read_text())
        for key in ("tokens_per_s", "tokens_per_s_per_device", "median_step_time_s", "peak_mem_gib"):
            assert row[key] == summary[key] > 0, (name, key)
        assert row["final_loss"] == summary["final_loss"]
        assert [p["loss"] for p in row["loss_curve"]] == losses(run_dir)
        assert row["mfu"] is None and row["mfu_seed"] is None  # CPU: peak unknown, n/a
        assert (run_dir / "stdout.log").is_file() and (run_dir / "stderr.log").is_file()
        assert (run_dir / "model").is_dir()
        assert re.search(rf"\[\d/{len(rows)}\] {name}", result.stdout), name
        assert re.search(rf"{name} .* (pass|reference)", result.stdout), name
    assert f"[1/{len(rows)}] single (reference): 1 process" in result.stdout  # the reference runs first
    assert rows["tp"]["args"] == ["--nproc", "4", "--tp-size", "4"]
    assert rows["ep"]["args"] == ["--nproc", "4", "--ep-size", "4"]
    assert (out / "bench.png").stat().st_size > 10_000  # matplotlib is installed in the dev extra


@pytest.mark.readme(README_BENCH_SHOWCASE)
def test_bench_json_matches_the_documented_schema(full_bench):
    _, _, payload, _ = full_bench
    check_bench_json(payload)
    # Each key must appear as a key, in backticks, in the README's bench.json section (the schema's one
    # description), and each run object's key is a field of the record the bench writes.
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("`bench.json`, `schema_version` 2") :]
    section = section[: section.index("\n## ")]
    for key in {*TOP_LEVEL, *SETTINGS, *VERIFY, *RUN, *RUN_VERIFY}:
        assert f"`{key}`" in section, f"bench.json key {key} is not in the README's bench.json tables"
    assert [f.name for f in dataclasses.fields(RunRecord)] == list(RUN)


def test_the_default_strategies_are_the_builtins_single_first():
    found = default_strategies()  # (and any installed plugin's)
    assert found[0] == "single" and set(BUILTINS) <= set(found), found


def _drift_and_broken_bench(tmp_path_factory) -> Callable[[], tuple]:
    """A plugin that fails, then one that trains another model, with --verify and --prune-models."""
    root = tmp_path_factory.mktemp("drift_bench")
    drift, broken = root / "drift.py", root / "broken_plugin.py"
    drift.write_text(DRIFT_PLUGIN)
    broken.write_text(BROKEN_PLUGIN)
    out = root / "out"
    strategies = ["--strategies", f"{broken},{drift}", "--strategy-args", "drift:--nproc 1", "--nproc", "2"]

    def bench() -> tuple:
        result = run_moectl("bench", *strategies, *SMALL, "--verify", "--prune-models", "--out", str(out))
        return result, out, json.loads((out / "bench.json").read_text())

    return bench


def start_ahead(lane, request, items) -> None:
    factory = request.getfixturevalue("tmp_path_factory")
    lane.start_if_read(
        items, "drift_and_broken_bench", "drift-bench", lambda: _drift_and_broken_bench(factory)
    )


@pytest.fixture(scope="module")
def drift_and_broken_bench(background_lane, tmp_path_factory):
    return background_lane.result_or_run("drift-bench", lambda: _drift_and_broken_bench(tmp_path_factory)())


def test_separate_reference_a_model_that_trains_differently_and_pruned_models(drift_and_broken_bench):
    """A plugin that trains another model, with --verify: the reference runs on its own, first; the
    plugin's row is FAIL with its error and the bench exits 1 (rows that pass: the showcase above);
    --prune-models deletes the weights."""
    result, out, payload = drift_and_broken_bench
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    check_bench_json(payload)
    assert payload["exit_code"] == 1
    reference, (_, drift) = payload["verify"]["reference_run"], payload["rows"]
    assert reference["name"] == "reference-single" and reference["status"] == "ok"
    assert reference["nproc"] == 1 and reference["verify"]["status"] == "reference"
    assert drift["status"] == "ok" and drift["world_size"] == 1  # it ran; it trained something else
    assert drift["verify"]["status"] == "fail" and drift["verify"]["rel_err"] > 1e-4, drift["verify"]
    assert re.search(r"drift .* FAIL", result.stdout), result.stdout[-3000:]
    assert "[1/3] reference-single (reference)" in result.stdout
    for name in ("drift", "reference-single"):
        assert not (out / "runs" / name / "model").exists(), name
    assert (out / "runs" / "drift" / "summary.json").is_file()


def test_failing_strategy_shows_its_reason_and_others_still_run(drift_and_broken_bench):
    result, out, payload = drift_and_broken_bench
    broken, drift = payload["rows"]
    assert drift["status"] == "ok"  # the row after the failed one still ran
    assert broken["status"] == "failed" and broken["exit_code"] == 1
    assert "RuntimeError: broken plugin: parallelize refused on purpose" in broken["reason"]
    assert broken["verify"] is None and broken["tokens_per_s"] is None
    assert "parallelize refused on purpose" in (out / broken["run_dir"] / "stderr.log").read_text()
    # the table and the notes under it
    assert re.search(r"broken_plugin .* failed", result.stdout)
    assert re.search(
        r"broken_plugin failed: worker rank \d exited with code 1: .*parallelize refused", result.stdout
    )


def test_a_failed_reference_fails_the_bench(tmp_path, monkeypatch):
    """In-process: the reference diverges (a learning rate of 1e6, exit 3); the row that trained
    cannot be verified, says why, and the bench exits 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(REPO)
    console = Console(record=True, width=200)
    out = tmp_path / "out"
    options = BenchOptions(
        strategies=["ddp"],
        nproc=1,
        out=out,
        steps=4,
        warmup=1,
        global_batch=8,
        micro_batch=2,
        sets=["train.lr=1e6"],
        strategy_args="ddp:--lr 0.2",  # a flag beats --set: only the reference diverges
        verify=True,
    )
    assert bench_command(options, console) == 1
    payload = json.loads((out / "bench.json").read_text())
    check_bench_json(payload)
    reference, (ddp,) = payload["verify"]["reference_run"], payload["rows"]
    assert reference["status"] == "failed" and reference["exit_code"] == 3, reference
    assert "not finite" in reference["reason"] or "loss is" in reference["reason"], reference["reason"]
    assert ddp["status"] == "ok" and ddp["verify"]["status"] == "error"
    assert ddp["verify"]["reason"].startswith("the reference failed: "), ddp["verify"]
    assert payload["exit_code"] == 1


def test_skip_without_verify_and_the_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    """In-process: mixed at 2 processes is skipped with its reason, single runs, no weights are written,
    and with matplotlib absent the plot is skipped with one line while the exit code stays 0."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(REPO)
    console = Console(record=True, width=200)
    out = tmp_path / "out"
    options = BenchOptions(
        strategies=["single", "mixed"], nproc=2, out=out, steps=3, warmup=1, global_batch=8, micro_batch=2
    )
    assert bench_command(options, console) == 0
    text = console.export_text()
    assert PLOT_SKIPPED in text.splitlines()
    assert not (out / "bench.png").exists()
    payload = json.loads((out / "bench.json").read_text())
    check_bench_json(payload)
    single, mixed = payload["rows"]
    assert single["status"] == "ok" and single["verify"] is None and not payload["verify"]["enabled"]
    assert not (out / "runs" / "single" / "model").exists()  # train.save_model=false when not verifying
    assert mixed["status"] == "skipped" and "mixed needs --tp-size 2 or more" in mixed["reason"]
    assert "skip mixed:" in text and "[1/1] single" in text


def test_a_run_that_hangs_is_stopped_with_its_workers(tmp_path, monkeypatch):
    plugin = tmp_path / "sleepy.py"
    plugin.write_text(SLEEPY_PLUGIN)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = RunSpec("sleepy", str(plugin), 2, ["--nproc", "2"])
    record = run_one(spec, SMALL[:2], tmp_path / "out", timeout_s=10)
    assert record.status == "failed" and record.reason == "timed out after 10 s (--run-timeout)"
    assert record.wall_s < 60
    assert (tmp_path / "out" / "runs" / "sleepy" / "stdout.log").is_file()
    assert not _processes_mentioning(str(tmp_path / "out")), "workers were left running"


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the launcher and workers name the run dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ---- input checks: one line, exit code 2, nothing written ------------------------------------------
def test_unknown_strategy_is_exit_2_with_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    result = run_moectl_in_process("bench", "--strategies", "single,warp", "--out", str(out))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "unknown strategy 'warp'" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy_args": "zz:--tp-size 2"}, "names no strategy of --strategies"),
        ({"strategy_args": "tp:--run-dir /x"}, "sets --run-dir, which the bench sets itself"),
        ({"strategy_args": "tp:--tp-size 2;tp:--nproc 2"}, "gives flags for tp twice"),
        ({"strategies": ["tp", "tp"]}, "names tp twice"),
        ({"sets": ["train.nope=1"]}, "unknown key 'train.nope'"),
        ({"steps": 2, "warmup": 2}, "leaves none of the 2 steps timed"),
        ({"nproc": 0}, "--nproc must be from 1 to 1,024"),
        ({"reference": "ddp"}, "--reference must be one of"),
        ({"verify": True, "sets": ["train.save_model=false"]}, "--verify compares saved weights"),
        ({"strategies": ["no_such_file.py"]}, "does not exist"),
        ({"sets": ["parallel.fsdp=true"]}, "--set parallel.fsdp is not an option of single, tp; give it to"),
        ({"strategy_args": "tp:--tp-size"}, "--strategy-args for tp: --tp-size needs a value"),
        ({"strategy_args": "tp:--tp-sise 2"}, "'--tp-sise' is not a moectl train flag"),
    ],
)
def test_bad_input_raises_before_anything_runs(tmp_path, change, message):
    options = BenchOptions(**{"strategies": ["single", "tp"], "nproc": 2, "out": tmp_path / "o", **change})
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_bench(options)
    assert not (tmp_path / "o").exists()


def test_non_empty_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        plan_bench(BenchOptions(strategies=["single"], nproc=2, out=tmp_path))


# ---- planning ----------------------------------------------------------------------------------------
def test_default_degrees_follow_nproc():
    cfg = build_config("tiny", {"model": {"num_kv_heads": 4}})  # 8 experts, 4 heads, 4 KV heads

    def degrees(name: str, nproc: int):
        return degrees_for(get_strategy(name), nproc, [], cfg)

    assert degrees("single", 4) == (1, [], None)
    assert degrees("tp", 4) == (4, ["--tp-size", "4"], None)
    assert degrees("mixed", 4) == (4, ["--dp-size", "2", "--tp-size", "2"], None)
    assert degrees("mixed", 8)[1] == ["--dp-size", "2", "--tp-size", "4"]
    assert "mixed needs --tp-size 2 or more" in degrees("mixed", 2)[2]
    assert "does not divide model.num_heads" in degrees("mixed", 6)[2]  # tp 3 of 4 heads: the shared check
    assert degrees("ep", 4)[1] == ["--ep-size", "4"]
    assert degrees("ep", 6) == (6, ["--ep-size", "2"], None)  # divides both 8 experts and 6 ranks
    assert degrees("fsdp", 4) == (4, [], None)
    assert degrees("ddp", 4) == (4, [], None)
    # The user's flags replace the strategy's own and are checked the same way.
    assert degrees_for(get_strategy("tp"), 4, ["--tp-size", "3"], cfg)[2].startswith("tp: --tp-size 3 must")


def test_strategy_args_set_a_strategys_own_options_and_are_checked_like_train():
    cfg = build_config("tiny")
    chunked = ["--set", "parallel.ep_chunks=2", "--ep-size=2"]
    assert degrees_for(get_strategy("ep"), 4, chunked, cfg) == (4, chunked, None)
    world, _, skip = degrees_for(
        get_strategy("ddp"), 4, ["--nproc", "2", "--set", "parallel.ep_chunks=2"], cfg
    )
    assert world == 2 and skip == "parallel.ep_chunks belongs to --strategy ep, not ddp; drop it"
    fsdp_ep = get_strategy("ep").layouts(4, cfg.model)[1]
    assert fsdp_ep.args() == ["--ep-size", "4", "--set", "parallel.fsdp=true"]


def test_strategy_args_replace_defaults_and_lift_a_skip(tmp_path):
    plan = plan_bench(
        BenchOptions(
            strategies=["mixed", "tp"],
            nproc=2,
            out=tmp_path / "o",
            strategy_args="mixed: --dp-size 1 --tp-size 2 ; tp:--nproc 2 --set train.lr=0.05;ddp:--nproc 2",
        )
    )
    assert plan.ignored_args == ["ddp"]  # a known strategy that is not benchmarked: ignored, not an error
    mixed, tp = plan.specs
    assert mixed.skip_reason is None and mixed.args == ["--nproc", "2", "--dp-size", "1", "--tp-size", "2"]
    assert tp.args[-4:] == ["--nproc", "2", "--set", "train.lr=0.05"]
    assert "train.save_model=false" in " ".join(plan.common_args)


def test_plugin_rows_and_run_directories_are_named_after_the_file(tmp_path):
    assert short_name("plugins/my_layout.py") == "my_layout"
    assert short_name("plugins/my_layout.py:Layout") == "my_layout"
    assert short_name("pkg.layouts:Fast") == "layouts"
    assert short_name("ddp") == "ddp"


def test_reference_auto_picks_fsdp_when_the_model_does_not_fit(monkeypatch):
    import moectl.bench.run_list as run_list

    monkeypatch.setattr(run_list, "gpu_memory_gib", lambda: 139.8)
    available = ["fsdp", "single"]
    big, tiny = build_config("qwen3-30b-a3b"), build_config("tiny")
    assert choose_reference("auto", big, True, available)[0] == "fsdp"
    assert choose_reference("auto", tiny, True, available)[0] == "single"
    assert choose_reference("auto", big, False, available)[0] == "single"  # CPU: always single
    with pytest.raises(UsageError, match="reference fsdp .* is not an available strategy"):
        choose_reference("auto", big, True, ["single", "ddp"])


def test_reference_auto_sizes_single_in_the_runs_precision(monkeypatch):
    """The 8-layer cut with AdamW: 48.6 GiB as a bf16 run, 101.3 GiB under mixed (fp32 weights, gradients
    and state, bf16 copies and activations, the fp32 residual stream), as the dry-run estimates them: on
    an 80 GiB GPU (64 by the 80 % rule) single is the reference under bf16 only."""
    import moectl.bench.run_list as run_list

    monkeypatch.setattr(run_list, "gpu_memory_gib", lambda: 80.0)
    cut = {"model": {"num_layers": 8}, "train": {"optimizer": "adamw"}}
    picks = {}
    for precision in ("auto", "mixed", "bf16"):
        cfg = build_config("qwen3-30b-a3b", {**cut, "train": {**cut["train"], "precision": precision}})
        picks[precision] = choose_reference("auto", cfg, True, ["single", "fsdp"])
    assert {precision: name for precision, (name, _) in picks.items()} == {
        "auto": "fsdp",
        "mixed": "fsdp",
        "bf16": "single",
    }
    assert "about 101.3 GiB is too much" in picks["mixed"][1] and "about 48.6 GiB fits" in picks["bf16"][1]


def test_bench_json_settings_name_the_runs_precision(tmp_path):
    """settings.precision: the runs' train.precision, `auto` resolved where they run (fp32 on the CPU,
    mixed on GPUs)."""

    def precision(uses_gpu: bool, *sets: str) -> str:
        options = BenchOptions(strategies=["single"], nproc=1, out=tmp_path / "out", steps=5, sets=list(sets))
        plan = dataclasses.replace(plan_bench(options), uses_gpu=uses_gpu)
        return BenchResult(plan, [], None, "2026-12-08T00:00:00").to_json()["settings"]["precision"]

    assert precision(False) == "fp32" and precision(True) == "mixed"
    assert precision(True, "train.precision=bf16") == precision(False, "train.precision=bf16") == "bf16"


def test_last_error_line_skips_traceback_framing():
    stderr = 'Traceback (most recent call last):\n  File "x.py", line 1\n    raise X\nValueError: bad\n'
    assert last_error_line(stderr) == "ValueError: bad"
    assert (
        last_error_line("warn\nerror: ep: --ep-size 3 must divide 8\n")
        == "error: ep: --ep-size 3 must divide 8"
    )
    assert last_error_line("") == ""


def test_plot_is_drawn_from_bench_json(tmp_path):
    pytest.importorskip("matplotlib")
    row = {
        "name": "ddp",
        "status": "ok",
        "tokens_per_s_per_device": 100.0,
        "mfu": 0.4,
        "mfu_seed": 0.3,
        "loss_curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
    }
    payload = {"rows": [row, {**row, "name": "x", "status": "failed"}], "verify": {"reference_run": None}}
    assert write_plot(payload, tmp_path / "bench.png", Console(file=open(os.devnull, "w")))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")]
