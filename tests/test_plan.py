"""`moectl plan`: the model against every measured GPU run, the layout rules, and the command."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re
import shlex
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from moectl.cli import main
from moectl.config import TrainConfig, build_config
from moectl.model.sizing import count_params
from moectl.parallel.expert_parallel import ranks_per_token
from moectl.plan.calibration import (
    CALIBRATED_ON,
    CALIBRATION,
    GPU_KINDS,
    MEASURED_RUNS,
    OLD_DISPATCH,
    ONE_ROW_PER_CHOICE,
    MeasuredRun,
    is_calibrated,
    precision_calibrated,
)
from moectl.plan.predict import (
    BF16,
    collective_bytes,
    gpu_kind_for_device,
    layout_strategy,
    predict,
    run_config,
    run_prediction,
)
from moectl.plan.table import layout_problem
from moectl.registry import build_strategy, get_strategy
from moectl.strategy import Layout

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("fit", "holdout", "profiled")  # the roles held to the bounds
TOKENS_BOUND, MEMORY_BOUND = 0.15, 0.05
QWEN = build_config("qwen3-30b-a3b").model


def _predicted(run: MeasuredRun):
    train, strategy = run_config(run)
    return predict(strategy, train, run.gpu)


@pytest.mark.parametrize("run", [r for r in MEASURED_RUNS if r.role in CHECKED], ids=lambda r: r.name)
def test_prediction_within_bounds_of_measured(run):
    p = _predicted(run)
    assert abs(p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1) <= TOKENS_BOUND
    assert abs(p.peak_mem_gib / run.peak_mem_gib - 1) <= MEMORY_BOUND


def test_roles_notes_and_holdouts():
    roles = {r.role for r in MEASURED_RUNS}
    assert roles <= {*CHECKED, "superseded", "out of scope", "pending"}
    held_out = [r for r in MEASURED_RUNS if r.role == "holdout"]
    assert {r.strategy for r in held_out} >= {"ep", "fsdp", "ddp", "tp"}
    whole_model_ep4 = [r for r in held_out if r.strategy == "ep" and r.ep == 4 and not r.model]
    assert whole_model_ep4  # the check of the four-GPU prediction
    assert all(r.note for r in MEASURED_RUNS if r.role in ("superseded", "out of scope"))
    assert len({r.name for r in MEASURED_RUNS}) == len(MEASURED_RUNS)


def test_runs_of_the_dispatch_before_once_per_rank_are_bound_only_on_one_gpu():
    """Every exchange changed (one row per chosen expert before); on one GPU nothing is exchanged and the
    current dispatch measured +1.4 % on the same layout, so only one-GPU runs of the old one stay bound."""
    old = [r for r in MEASURED_RUNS if OLD_DISPATCH in r.note or r.note == ONE_ROW_PER_CHOICE]
    assert all(r.world == 1 for r in old if r.role in CHECKED)
    assert all(r.role == "superseded" for r in old if r.world > 1 and r.strategy == "ep")
    current = next(r for r in MEASURED_RUNS if r.name == "ep1 8l mb2 features off")
    previous = next(r for r in MEASURED_RUNS if r.name == "ep1 8l mb2")
    assert current.tokens_per_s_per_gpu / previous.tokens_per_s_per_gpu - 1 == pytest.approx(0.014, abs=0.001)


def _same_machine_groups() -> list[list[MeasuredRun]]:
    runs = [r for r in MEASURED_RUNS if r.role in ("fit", "holdout")]
    key = lambda r: (r.date, r.machine, json.dumps(r.model, sort_keys=True))  # noqa: E731
    return [list(group) for _, group in itertools.groupby(sorted(runs, key=key), key=key)]


def test_ranking_on_the_same_machine():
    """Wherever two measured layouts on one machine differ by more than 5 %, the faster is predicted faster."""
    compared = 0
    for group in _same_machine_groups():
        for a, b in itertools.combinations(group, 2):
            if abs(a.tokens_per_s_per_gpu / b.tokens_per_s_per_gpu - 1) <= 0.05:
                continue
            measured = a.tokens_per_s_per_gpu > b.tokens_per_s_per_gpu
            predicted = _predicted(a).tokens_per_s_per_gpu > _predicted(b).tokens_per_s_per_gpu
            assert measured == predicted, (a.name, b.name)
            compared += 1
    assert compared >= 15


def test_measured_figures_match_the_raw_results():
    for run in (r for r in MEASURED_RUNS if r.role != "pending"):
        path, _, row = run.source.partition("#")
        text = (ROOT / path).read_text()
        recipe = run.script.removeprefix("recipe ").split()[0]
        assert f"recipe_{recipe.replace('-', '_')}()" in (ROOT / "bench/recipes.sh").read_text(), run.script
        if path.endswith(".log"):  # the median of the timed steps' tokens/s, as the summary takes it
            timed = [line for line in text.splitlines() if line.startswith("step ") and "warm-up" not in line]
            speeds = [float(re.search(r"\| ([\d,]+) tok/s", line)[1].replace(",", "")) for line in timed]
            assert statistics.median(speeds) == run.tokens_per_s_per_gpu, run.name
            assert f"mem {run.peak_mem_gib:.2f} GiB" in timed[-1], run.name
            continue
        if path.endswith(".jsonl"):  # one summary.json per line, with its run name
            data = next(d for d in map(json.loads, text.splitlines()) if d["run"] == row)
        else:
            data = json.loads(text)
            if row:
                data = next(r for r in data["rows"] if r["name"] == row)
        assert data["tokens_per_s_per_device"] == pytest.approx(run.tokens_per_s_per_gpu, abs=1)
        assert data["peak_mem_gib"] == pytest.approx(run.peak_mem_gib, abs=0.01)
        assert data["world_size"] == run.world
        assert (data.get("a2a_bytes_per_step") or None) == run.a2a_bytes_per_step, run.name
        if path.endswith(".jsonl"):  # the run's own resolved config: the layout and settings as entered
            config = yaml.safe_load((ROOT / Path(path).parent / row / "config.yaml").read_text())
            train, strategy = run_config(run)
            assert config["parallel"]["strategy"] == run.strategy and config["parallel"]["ep_size"] == run.ep
            assert strategy.name == run.strategy and strategy.dims.ep == run.ep
            for key in ("global_batch", "seq_len", "loss_chunk_tokens", "micro_batch", "compile"):
                assert config["train"][key] == getattr(train, key), (run.name, key)
            # they trained in bf16 (`train.dtype: auto`, bf16 on a GPU before train.precision), as predicted
            assert config["train"]["dtype"] == "auto" and "precision" not in config["train"], run.name
            assert train.precision == run.precision == "bf16", run.name
            checkpointing = train.activation_checkpointing == "full"
            assert (config["train"]["activation_checkpointing"] != "none") == checkpointing
            for key in ("num_layers", "num_experts"):
                assert config["model"][key] == getattr(strategy.model_config, key), (run.name, key)
            # plan models ep_chunks 1 (the default) only: a chunked run is never held to the bounds
            if config["parallel"]["ep_chunks"] != 1:
                assert run.role == "out of scope", run.name


def test_exchange_bytes_are_what_the_runs_sent():
    """The once-per-rank byte model against summary.json's `a2a_bytes_per_step` (uniform routing)."""
    measured = [r for r in MEASURED_RUNS if r.a2a_bytes_per_step]
    assert {r.ep for r in measured} == {2, 4}
    for run in measured:
        train, strategy = run_config(run)
        sent = collective_bytes(strategy, train, "all-to-all")
        assert sent == pytest.approx(run.a2a_bytes_per_step, rel=0.01), run.name
    assert [round(ranks_per_token(128, 8, ep), 2) for ep in (2, 4, 8)] == [1.99, 3.63, 5.34]


def _fit_plan():
    spec = importlib.util.spec_from_file_location("fit_plan", ROOT / "bench" / "fit_plan.py")
    fit_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_plan)
    return fit_plan


def test_fitted_figures_are_what_the_fit_gives():
    fit_plan = _fit_plan()
    refit = fit_plan.fit(CALIBRATION, verbose=False)
    for names, _ in fit_plan.GROUPS:
        for name in names:
            assert getattr(refit, name) == pytest.approx(getattr(CALIBRATION, name), rel=0.02, abs=0.01), name
    assert CALIBRATION.ep_dispatch_seconds_per_pair > 0


def test_benchmarks_tables_are_the_fit_scripts_output():
    """BENCHMARKS.md's plan tables are bench/fit_plan.py's output for the runs and figures in moectl/plan/calibration.py
    (after a change to either, `python3 bench/fit_plan.py --fit` or `--docs` writes them)."""
    fit_plan = _fit_plan()
    assert fit_plan.documented_blocks() == fit_plan.blocks(CALIBRATION)


def test_refit_writes_its_figures_into_the_data_file(tmp_path):
    fit_plan = _fit_plan()
    data = tmp_path / "calibration.py"
    data.write_text((ROOT / "moectl" / "plan" / "calibration.py").read_text())
    changed = dataclasses.replace(CALIBRATION, ep_dispatch_seconds_per_pair=1.234567e-8, ddp_overlap=0.5)
    fit_plan.write_figures(fit_plan.rounded(changed), data)
    text = data.read_text()
    assert "    ep_dispatch_seconds_per_pair: float = 1.23e-8\n" in text
    assert "    ddp_overlap: float = 0.5\n" in text


# ---- the rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, layout, micro_batch, rule",
    [
        ("tp", Layout(8, tp_size=8), 1, "--tp-size 8 does not divide model.num_kv_heads = 4"),
        ("ep", Layout(6, ep_size=3), 1, "--ep-size 3 must divide model.num_experts 128"),
        ("ep", Layout(4, ep_size=8), 1, "--ep-size 8 must divide the world size 4"),
        ("mixed", Layout(4, dp_size=1, tp_size=4), 1, "mixed needs dp ≥ 2 and tp ≥ 2 (got dp 1, tp 4)"),
        ("fsdp", Layout(8, dp_size=4), 1, "--dp-size 4 must equal the world size 8"),
        ("ddp", Layout(8), 2, "global batch 8 must be divisible by micro-batch 2 × dp 8 = 16"),
    ],
)
def test_layout_problem_names_the_rule_and_numbers(strategy, layout, micro_batch, rule):
    assert rule in layout_problem(
        QWEN, TrainConfig(global_batch=8, micro_batch=micro_batch), strategy, layout
    )


def test_allowed_layout_has_no_problem_and_forbidden_one_does_not_predict():
    train = TrainConfig(global_batch=64, micro_batch=2)
    assert layout_problem(QWEN, train, "mixed", Layout(8, dp_size=4, tp_size=2)) is None
    with pytest.raises(ValueError, match="num_kv_heads"):
        layout_strategy(QWEN, "tp", Layout(8, tp_size=8))


def test_predict_from_a_train_config_as_the_loop_would():
    cfg = build_config(
        "qwen3-30b-a3b",
        {"parallel": {"strategy": "ep", "ep_size": 2, "nproc": 2},
         "train": {"global_batch": 8, "micro_batch": 2, "seq_len": 4096, "compile": True, "precision": "bf16"}},
    )  # fmt: skip
    strategy = build_strategy(cfg, 2)
    assert (strategy.dims.dp, strategy.dims.ep) == (2, 2)
    p = predict(strategy, cfg.train, gpu_kind_for_device("NVIDIA H200"))
    assert p == _predicted(next(r for r in MEASURED_RUNS if r.name == "ep2 full mb2"))
    assert p.comm_s["all-to-all"] > 0 and 0 < p.ep_dispatch_s < p.compute_s
    names = {"NVIDIA H200": "h200", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA B200": "b200"}  # fmt: skip
    assert {name: gpu_kind_for_device(name) for name in names} == names
    # other variants of the same chips have other peaks, bandwidths or memory: no figures, no guess
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-40GB", "NVIDIA A10G"):
        assert gpu_kind_for_device(other) is None, other


# ---- the command -----------------------------------------------------------------------------------
def _plan(capsys, *args: str) -> str:
    main(["plan", "--config", "qwen3-30b-a3b", *args])
    return capsys.readouterr().out


def test_plan_prints_the_table_best_first_with_commands(capsys):
    out = _plan(capsys, "--gpus", "8", "--gpu-mem", "141", "--global-batch", "64")
    assert "tokens/s/GPU" in out and "peak GiB" in out
    commands = re.findall(r"^\s*\d+\. (moectl train .*)$", out, re.MULTILINE)
    assert commands and all("--nproc 8" in c and "--global-batch 64" in c for c in commands)
    assert any("--strategy ep --ep-size 8" in c for c in commands)
    assert "forbidden: tp dp 1 tp 8 ep 1: tp: --tp-size 8 does not divide model.num_kv_heads = 4" in out
    assert re.search(r"^\s*\d+\. \d+\.\d GiB > 135\.0 usable: weights \+ optimizer state", out, re.MULTILINE)
    assert not torch.distributed.is_initialized()


def test_plan_json_parses_and_ranks_fitting_layouts_fastest_first(capsys):
    args = ("--gpus", "4", "--global-batch", "16", "--set", "train.precision=bf16", "--json", "--all")
    plan = json.loads(_plan(capsys, *args))
    assert set(plan) == {
        "settings",
        "usable_gib",
        "layouts",
        "forbidden",
        "no_cost_model",
        "nothing_fits",
        "would_fit",
    }  # as the README lists them
    assert plan["settings"] == {"config": "qwen3-30b-a3b", "gpu": "h200", "gpu_calibrated": True,
                                "gpus_per_node": 4, "nodes": 1, "gpu_mem_gib": 139.8, "global_batch": 16,
                                "seq_len": 4096, "optimizer": "sgd", "precision": "bf16",
                                "precision_setting": "bf16", "precision_calibrated": True,
                                "uncalibrated": []}  # fmt: skip
    assert plan["nothing_fits"] is None and plan["would_fit"] == []
    readme = (ROOT / "README.md").read_text()
    plan_section = readme[readme.index("## Planning layouts") :]
    assert all(
        f"`{key}`" in plan_section for key in [*plan, *plan["settings"], *plan["layouts"][0]["memory"]]
    )
    fitting = [row for row in plan["layouts"] if row["fits"]]
    speeds = [row["tokens_per_s_per_gpu"] for row in fitting]
    assert speeds == sorted(speeds, reverse=True) and len(fitting) > 20
    assert all(row["peak_mem_gib"] <= plan["usable_gib"] for row in fitting)
    assert all(row["does_not_fit"] for row in plan["layouts"] if not row["fits"])
    assert {row["rule"] for row in plan["forbidden"]} == {
        "mixed needs dp ≥ 2 and tp ≥ 2 (got dp 1, tp 4); use tp or fsdp"
    }
    ep4 = next(r for r in plan["layouts"] if r["label"] == "ep" and r["ep"] == 4 and r["micro_batch"] == 2
               and r["compile"] and not r["activation_checkpointing"])  # fmt: skip
    measured = next(r for r in MEASURED_RUNS if r.name == "ep4 full mb2")
    assert ep4["tokens_per_s_per_gpu"] == pytest.approx(_predicted(measured).tokens_per_s_per_gpu)


def test_plan_on_two_nodes_names_the_rendezvous_and_the_assumed_network(capsys):
    out = _plan(capsys, "--gpus", "8", "--nodes", "2", "--global-batch", "64")
    assert "--nproc 8 --nnodes 2 --node-rank RANK --rdzv-endpoint HOST:PORT" in out
    assert "no multi-node run has measured it" in out


def test_every_offered_layout_is_one_moectl_train_accepts(capsys):
    plan = json.loads(_plan(capsys, "--gpus", "8", "--global-batch", "64", "--json"))
    assert {row["label"] for row in plan["layouts"]} == {
        "ddp",
        "fsdp",
        "mixed/fsdp",
        "mixed/ddp",
        "ep",
        "ep+fsdp",
    }
    for row in plan["layouts"]:
        main(["train", *shlex.split(row["command"])[2:], "--dry-run"])
        assert "memory estimate per rank" in capsys.readouterr().out, row["command"]
    forbidden = next(f for f in plan["forbidden"] if f["label"] == "tp")  # strategies in registry order
    assert (forbidden["dp"], forbidden["tp"]) == (1, 8) and "num_kv_heads = 4" in forbidden["rule"]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", "qwen3-30b-a3b", "--strategy", "tp", "--tp-size", "8", "--dry-run"])
    assert exc.value.code == 2 and "num_kv_heads = 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0"], "--gpus must be from 1 to 1,024"),
        (["--gpu", "v100"], "unknown --gpu 'v100'; give one of: h200, h100, a100, b200"),
        (["--gpu", "H100"], "unknown --gpu 'H100'; give one of: h200, h100, a100, b200"),
        (["--gpu-mem", "4"], "leaves nothing beyond"),
        (["--set", "train.global_batch=0"], "global_batch"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _plan(capsys, *args)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err and err.count("\n") == 1


def _counts():

    counts = count_params(QWEN)
    q_width, kv_width = QWEN.num_heads * QWEN.head_dim, QWEN.num_kv_heads * QWEN.head_dim
    tp_sharded = QWEN.num_layers * 2 * QWEN.hidden_size * (q_width + kv_width) + counts.experts
    return counts, tp_sharded


@pytest.mark.parametrize(
    "strategy, layout, params, grads",
    [
        ("single", Layout(1), lambda c, t: c.total, lambda c, t: c.total),
        ("ddp", Layout(4), lambda c, t: c.total, lambda c, t: c.total),
        ("fsdp", Layout(8), lambda c, t: c.total / 8, lambda c, t: c.total),
        ("tp", Layout(4, tp_size=4), lambda c, t: c.total - t + t / 4, lambda c, t: c.total - t + t / 4),
        ("mixed", Layout(4, dp_size=2, tp_size=2), lambda c, t: (c.total - t + t / 2) / 2,
         lambda c, t: c.total - t + t / 2),
        ("mixed", Layout(4, dp_size=2, tp_size=2, options=get_strategy("mixed").Options(dp="ddp")),
         lambda c, t: c.total - t + t / 2, lambda c, t: c.total - t + t / 2),
        ("ep", Layout(8, ep_size=4), lambda c, t: c.dense + c.experts / 4, lambda c, t: c.dense + c.experts / 4),
        ("ep", Layout(8, ep_size=4, options=get_strategy("ep").Options(fsdp=True)), lambda c, t: c.total / 8,
         lambda c, t: c.dense + c.experts / 4),
    ],
    ids=["single", "ddp", "fsdp", "tp", "mixed/fsdp", "mixed/ddp", "ep", "ep+fsdp"],
)  # fmt: skip
def test_each_strategy_counts_what_a_rank_holds(strategy, layout, params, grads):
    """The per-rank parameters and the gradients alive while micro-batches accumulate, as each strategy
    states them (the plan's memory and the --dry-run's estimate both read them)."""
    counts, tp_sharded = _counts()
    cost = layout_strategy(QWEN, strategy, layout).step_cost(TrainConfig(global_batch=64), 8, BF16)
    assert cost.params == pytest.approx(params(counts, tp_sharded))
    assert cost.grads == pytest.approx(grads(counts, tp_sharded))


def test_a_gpu_run_writes_the_plans_prediction_beside_its_measurement(monkeypatch):
    """summary.json's `predicted` on an H200 is `predict` for the run's own strategy (its degrees and
    options) in the run's precision (`auto`: mixed on a GPU); calibrated only where measured runs of that
    kind and precision check the model; None where the plan has no figures (fp32, an unknown GPU)."""
    import torch

    def config(precision: str):
        return build_config(
            "qwen3-30b-a3b",
            {"parallel": {"strategy": "ep", "ep_size": 2},
             "train": {"micro_batch": 2, "device": "cuda", "precision": precision}},
        )  # fmt: skip

    cfg = config("auto")
    strategy = build_strategy(cfg, 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    predicted = run_prediction(cfg, strategy)
    expected = predict(strategy, cfg.train, "h200")
    assert expected.precision == "mixed" and expected == predict(strategy, config("mixed").train, "h200")
    assert predicted["tokens_per_s_per_device"] == expected.tokens_per_s_per_gpu
    assert predicted["peak_mem_gib"] == expected.peak_mem_gib
    assert predicted["gpu"] == "h200" and predicted["precision"] == "mixed"
    assert predicted["calibrated"] is False  # no mixed GPU run yet
    bf16 = run_prediction(config("bf16"), strategy)
    assert (bf16["precision"], bf16["calibrated"]) == ("bf16", True)
    assert bf16["peak_mem_gib"] == predict(strategy, config("bf16").train, "h200").peak_mem_gib
    assert bf16["peak_mem_gib"] < predicted["peak_mem_gib"]
    assert run_prediction(config("fp32"), strategy) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    predicted = run_prediction(cfg, strategy)
    expected = predict(strategy, cfg.train, "h100")
    assert predicted["tokens_per_s_per_device"] == expected.tokens_per_s_per_gpu
    assert (predicted["gpu"], predicted["calibrated"]) == ("h100", False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A10G")
    assert run_prediction(cfg, strategy) is None


def test_no_prediction_for_launch_bound_layers(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    cfg = build_config("tiny", {"train": {"device": "cuda"}})
    assert run_prediction(cfg, build_strategy(cfg, 1)) is None


def test_a_plugin_without_a_cost_model_is_listed_as_such(monkeypatch, capsys):
    """examples/naive_ep, installed as a plugin, states its layouts but no cost: plan lists it under
    "no cost model" with the command that runs it, instead of dropping it or failing."""
    from importlib.metadata import EntryPoint

    import moectl.registry as registry

    real = registry.entry_points
    plugin = EntryPoint("naive_ep", "naive_ep:NaiveEP", registry.ENTRY_POINT_GROUP)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "naive_ep"))
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), plugin])
    plan = json.loads(_plan(capsys, "--gpus", "4", "--global-batch", "16", "--json"))
    (unpriced,) = plan["no_cost_model"]
    assert (unpriced["strategy"], unpriced["dp"], unpriced["ep"]) == ("naive_ep", 1, 4)
    assert "--strategy naive_ep --ep-size 4 --nproc 4" in unpriced["command"]
    assert all(row["strategy"] != "naive_ep" for row in plan["layouts"] + plan["forbidden"])
    assert {row["strategy"] for row in plan["layouts"]} == {"ddp", "fsdp", "tp", "mixed", "ep"}
    out = _plan(capsys, "--gpus", "4", "--global-batch", "16")
    assert re.search(
        r"^no cost model: naive_ep dp 1 tp 1 ep 4 runs \(moectl train .*--strategy naive_ep", out, re.M
    )
    main(["train", *shlex.split(unpriced["command"])[2:], "--dry-run"])
    assert "naive_ep states no cost model" in capsys.readouterr().out


def test_plan_refuses_a_strategy_option_it_would_drop(capsys):
    with pytest.raises(SystemExit) as exc:
        _plan(capsys, "--gpus", "4", "--set", "parallel.ep_chunks=2")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert (
        "--set parallel.ep_chunks is an option of ep, whose values moectl plan tries itself; drop it" in err
    )


# ---- GPU kinds, the title, ep 1 and the chunked loss ------------------------------------------------
def _plan_json(capsys, *args: str) -> dict:
    return json.loads(_plan(capsys, *args, "--json"))


@pytest.mark.parametrize("kind", list(GPU_KINDS))
def test_every_gpu_kind_is_planned_with_its_memory_and_calibration_state(kind, capsys):
    plan = _plan_json(capsys, "--gpu", kind, "--gpus", "8", "--global-batch", "64")
    settings = plan["settings"]
    assert (settings["gpu"], settings["gpu_mem_gib"]) == (kind, GPU_KINDS[kind].memory_gib)
    assert settings["gpu_calibrated"] == is_calibrated(kind)
    assert plan["usable_gib"] == pytest.approx(GPU_KINDS[kind].memory_gib - 6)
    fitting = [row for row in plan["layouts"] if row["fits"]]
    assert fitting and all(row["peak_mem_gib"] <= plan["usable_gib"] for row in fitting)
    assert all(
        row["mfu"]
        == pytest.approx(row["tokens_per_s_per_gpu"] * fitting[0]["mfu"] / fitting[0]["tokens_per_s_per_gpu"])
        for row in fitting
    )  # fmt: skip  (one peak for the kind: MFU proportional to tokens/s)


def test_only_the_measured_kind_is_calibrated_until_runs_of_another_land(monkeypatch):
    """A kind counts as calibrated once a measured run on it checks the model; a pending one does not."""
    import moectl.plan.calibration as calibration

    assert is_calibrated(CALIBRATED_ON)
    assert not any(is_calibrated(kind) for kind in ("a100", "b200"))
    h100_runs = [r for r in MEASURED_RUNS if r.gpu == "h100"]
    assert h100_runs and all(r.role == "pending" for r in h100_runs) and not is_calibrated("h100")
    measured = dataclasses.replace(h100_runs[0], role="holdout", tokens_per_s_per_gpu=1.0, peak_mem_gib=1.0)
    monkeypatch.setattr(calibration, "MEASURED_RUNS", [*MEASURED_RUNS, measured])
    assert is_calibrated("h100") and not is_calibrated("a100")


def test_uncalibrated_kinds_say_so_in_the_title_and_notes(capsys):
    out = _plan(capsys, "--gpu", "b200", "--gpus", "8", "--global-batch", "64")
    assert out.splitlines()[0].startswith(
        "qwen3-30b-a3b: 8 × B200 (uncalibrated; 178.35 GiB, 172.35 usable), "
    )
    assert "B200: uncalibrated. No measured B200 run checks these predictions yet" in out
    out = _plan(capsys, "--gpus", "8", "--global-batch", "64", "--set", "train.precision=bf16")
    assert out.splitlines()[0].startswith("qwen3-30b-a3b: 8 × H200 (139.8 GiB, 133.8 usable), ")
    assert out.splitlines()[0].endswith(", sgd, bf16 precision")
    assert "uncalibrated" not in out
    # mixed, the default: what it adds is no measured run's, on a calibrated kind too
    out = _plan(capsys, "--gpus", "8", "--global-batch", "64")
    assert out.splitlines()[0].endswith(", sgd, mixed precision")
    assert "(train.precision=auto: mixed, as on a GPU)" in out
    assert "Mixed precision: uncalibrated (no mixed GPU run yet): its time terms" in out


@pytest.mark.parametrize(
    "args, title",
    [
        (["--gpus", "1"], "qwen3-30b-a3b: 1 × H200 (139.8 GiB"),
        (["--gpus", "8", "--gpu", "h100"], "qwen3-30b-a3b: 8 × H100 (uncalibrated; 79.11 GiB"),
        (["--gpus", "8", "--nodes", "4", "--gpu", "h100"], "qwen3-30b-a3b: 4 nodes × 8 H100 (uncalibrated; 79.11 GiB"),
        (["--gpus", "4", "--nodes", "2", "--gpu-mem", "100"], "qwen3-30b-a3b: 2 nodes × 4 H200 (100 GiB, 94 usable)"),
    ],
)  # fmt: skip
def test_the_title_names_nodes_and_gpus_per_node(args, title, capsys):
    assert _plan(capsys, *args, "--global-batch", "64").splitlines()[0].startswith(title)


def test_other_kinds_scale_bandwidth_bound_work_and_keep_flop_efficiencies():
    """H100: the H200's peak and NVLink, less HBM bandwidth: slower only by memory-bound work (within the
    HBM ratio), the same exchange; A100: NVLink 600 against 900 GB/s, the all-to-all 1.5× longer; B200 faster."""
    model = dataclasses.replace(QWEN, num_layers=8)
    train = dataclasses.replace(TrainConfig(global_batch=8, micro_batch=2, seq_len=4096), compile=True)
    one = layout_strategy(model, "ep", Layout(1, ep_size=1))
    h200, h100, a100, b200 = (predict(one, train, kind) for kind in ("h200", "h100", "a100", "b200"))
    hbm_ratio = GPU_KINDS["h100"].sheet_hbm_bytes_per_s / GPU_KINDS["h200"].sheet_hbm_bytes_per_s
    assert hbm_ratio < h100.tokens_per_s_per_gpu / h200.tokens_per_s_per_gpu < 1
    assert a100.tokens_per_s_per_gpu < h100.tokens_per_s_per_gpu < h200.tokens_per_s_per_gpu
    assert b200.tokens_per_s_per_gpu > h200.tokens_per_s_per_gpu
    # memory is the model's, not the kind's
    assert h100.peak_mem_gib == h200.peak_mem_gib == a100.peak_mem_gib
    ep4 = layout_strategy(model, "ep", Layout(4, ep_size=4))
    exchange = {kind: predict(ep4, dataclasses.replace(train, global_batch=32), kind).comm_s["all-to-all"]
                for kind in ("h200", "h100", "a100")}  # fmt: skip
    assert exchange["h100"] == exchange["h200"]
    assert exchange["a100"] == pytest.approx(1.5 * exchange["h200"])


def test_ep1_is_predicted_faster_than_single_on_one_gpu_as_measured():
    """On one GPU ep 1 (the dispatch's grouped GEMM) measured faster than single (transformers' experts):
    77,697 against 74,736 tokens/s at micro-batch 2; the model says the same."""
    ep1 = next(r for r in MEASURED_RUNS if r.name == "ep1 8l mb2 slot sums")
    single = next(r for r in MEASURED_RUNS if r.name == "single 8l mb2")
    assert ep1.tokens_per_s_per_gpu > single.tokens_per_s_per_gpu
    assert _predicted(ep1).tokens_per_s_per_gpu > _predicted(single).tokens_per_s_per_gpu


@pytest.mark.parametrize("kind, micro_batch", [("h200", 16), ("h100", 8)])
def test_one_gpu_of_the_8_layer_cut_recommends_ep1_with_the_chunked_loss(kind, micro_batch, capsys):
    """The measured fastest one-GPU layout of the 8-layer cut (ep 1, micro-batch 16, chunked loss, 92,397
    tokens/s on an H200) is plan's first row; on an H100 micro-batch 16 does not fit and 8 does with the
    chunked loss only."""
    args = ("--gpus", "1", "--gpu", kind, "--global-batch", "16", "--set", "train.precision=bf16")
    args += ("--set", "model.num_layers=8")
    plan = _plan_json(capsys, *args, "--all")
    best = plan["layouts"][0]
    chosen = (best["strategy"], best["ep"], best["micro_batch"], best["loss_chunk_tokens"])
    assert chosen == ("ep", 1, micro_batch, 4096)
    assert not best["activation_checkpointing"] and best["compile"]
    assert best["command"].startswith("moectl train --config qwen3-30b-a3b --strategy ep --global-batch 16 ")
    assert f"--micro-batch {micro_batch} " in best["command"]
    assert best["command"].endswith("--set model.num_layers=8 --set train.loss_chunk_tokens=4096")
    # both strategies offered on one GPU, each with and without the chunked loss; ep 1 faster than single
    rows = {(r["strategy"], r["micro_batch"], r["loss_chunk_tokens"]): r for r in plan["layouts"]
            if not r["activation_checkpointing"] and r["compile"]}  # fmt: skip
    assert {key[0] for key in rows} == {"ep", "single"}
    for chunk in (0, 4096):
        assert rows["ep", 8, chunk]["tokens_per_s_per_gpu"] > rows["single", 8, chunk]["tokens_per_s_per_gpu"]
    # the chunked loss: the same time, the logits of one chunk instead of all of them
    whole, chunked = rows["ep", micro_batch, 0], rows["ep", micro_batch, 4096]
    assert whole["tokens_per_s_per_gpu"] == chunked["tokens_per_s_per_gpu"]
    assert chunked["memory"]["logits"] < whole["memory"]["logits"] / 5
    assert chunked["fits"] and not whole["fits"] if kind == "h100" else whole["fits"]
    assert "--set train.loss_chunk_tokens" not in next(
        r["command"] for r in plan["layouts"] if r["loss_chunk_tokens"] == 0
    )
    out = _plan(capsys, *args)
    assert re.search(rf"^1\s+ep\s+1\s+1\s+1\s+{micro_batch}\s+off\s+on\s+4,096\s", out, re.MULTILINE)


def test_a_chunk_the_config_sets_is_the_one_plan_weighs(capsys):
    plan = _plan_json(capsys, "--gpus", "1", "--global-batch", "8", "--set", "model.num_layers=8",
                      "--set", "train.loss_chunk_tokens=2048", "--all")  # fmt: skip
    assert {row["loss_chunk_tokens"] for row in plan["layouts"]} == {0, 2048}
    whole = next(row for row in plan["layouts"] if row["loss_chunk_tokens"] == 0)
    assert whole["command"].endswith("--set train.loss_chunk_tokens=2048 --set train.loss_chunk_tokens=0")
    main(["train", *shlex.split(whole["command"])[2:], "--dry-run"])
    assert "memory estimate per rank" in capsys.readouterr().out


def test_cli_help_names_every_gpu_kind(capsys):
    main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(kind in out for kind in GPU_KINDS)


# ---- precision ----------------------------------------------------------------------------------------
def test_every_measured_run_is_predicted_in_bf16_as_it_ran():
    assert all(run.precision == "bf16" for run in MEASURED_RUNS)
    for run in (r for r in MEASURED_RUNS if r.role in CHECKED):
        train, _ = run_config(run)
        assert train.precision == "bf16" and _predicted(run).precision == "bf16", run.name
    assert precision_calibrated("bf16") and not precision_calibrated("mixed")


def _mixed_and_bf16(strategy: str, layout: Layout, model=QWEN, **train):
    train = TrainConfig(**{"seq_len": 4096, "compile": True, "optimizer": "adamw", **train})
    built = layout_strategy(model, strategy, layout)
    mixed, bf16 = (predict(built, dataclasses.replace(train, precision=p)) for p in ("mixed", "bf16"))
    return built, train, mixed, bf16


GIB = 2**30


def test_mixed_memory_of_a_layout_without_fsdp():
    """ep 2 without FSDP, accumulating (two micro-batches), AdamW: the weights, gradients and both moments
    double (4 bytes), autocast holds a bf16 copy of every weight the rank holds, the residual stream stays
    fp32 (8 bytes per token, layer and hidden unit more), the logits and exchange buffers stay bf16."""
    model = dataclasses.replace(QWEN, num_layers=8)
    built, train, mixed, bf16 = _mixed_and_bf16(
        "ep", Layout(2, ep_size=2), model, global_batch=8, micro_batch=2
    )
    counts = count_params(model)
    held = counts.dense + counts.experts / 2
    assert mixed.memory.weights_and_optimizer == pytest.approx(2 * bf16.memory.weights_and_optimizer)
    assert bf16.memory.weights_and_optimizer == pytest.approx(held * 2 * (1 + 2 + 1) / GIB)
    assert mixed.memory.compute_copies == pytest.approx(held * 2 / GIB) and bf16.memory.compute_copies == 0
    tokens = train.micro_batch * train.seq_len
    fp32_residual = tokens * 8 * model.hidden_size * model.num_layers / GIB
    assert mixed.memory.activations - bf16.memory.activations == pytest.approx(fp32_residual)
    assert (mixed.memory.logits, mixed.memory.buffers) == (bf16.memory.logits, bf16.memory.buffers)
    # time: the exchange stays bf16, the replicas' all-reduce is fp32; the optimizer's and accumulation's
    # passes move 4 bytes; each micro-batch casts every held weight and gradient (6 bytes each way)
    row = 2 * model.hidden_size  # the exchange's rows stay bf16; the routing weights' gradients are fp32
    per_row = (row + 8 * model.top_k) + row + row + (row + 2 * model.top_k)  # bf16: rows, choices, gradients
    assert mixed.comm_s["all-to-all"] == pytest.approx(
        bf16.comm_s["all-to-all"] * (per_row + 2 * model.top_k) / per_row
    )
    assert mixed.comm_s["gradient all-reduce"] == pytest.approx(2 * bf16.comm_s["gradient all-reduce"])
    hbm = GPU_KINDS["h200"].hbm_bytes_per_s
    assert mixed.cast_s == pytest.approx(2 * (held + held) * 6 / hbm) and bf16.cast_s == 0
    streamed = held * (4 + 2 * 2) + (2 - 1) * held * 3
    assert mixed.compute_s - bf16.compute_s == pytest.approx(streamed * 2 / hbm + mixed.cast_s)
    # under full checkpointing a layer drops its casts after the forward: the embedding, lm_head and one
    # layer's stay; the layer inputs kept for the recompute are fp32
    _, _, mixed_ac, bf16_ac = _mixed_and_bf16(
        "ep", Layout(2, ep_size=2), model, global_batch=8, micro_batch=2, activation_checkpointing="full"
    )
    layer = (held - counts.embedding) / model.num_layers
    assert mixed_ac.memory.compute_copies == pytest.approx((counts.embedding + layer) * 2 / GIB)
    kept_inputs = tokens * model.hidden_size * 2 * model.num_layers / GIB
    # and each layer records the routing weights it received for its recompute in fp32 (the rows in bf16)
    received = tokens * ranks_per_token(model.num_experts, model.top_k, 2)
    weights = model.num_layers * received * model.top_k * 2 / GIB
    assert mixed_ac.memory.activations - bf16_ac.memory.activations == pytest.approx(
        tokens * 8 * model.hidden_size / GIB + kept_inputs + weights
    )


def test_mixed_memory_of_a_layout_under_fsdp():
    """fsdp over 4 ranks, accumulating: the sharded weights, gradients and moments double; the gathered
    units (the root, two layers) are FSDP2's bf16 copies, the whole gradients kept between micro-batches
    fp32; FSDP2 casts each layer's input, so no fp32 residual stream. Gathers stay bf16, the reduce-scatter
    is fp32."""
    built, train, mixed, bf16 = _mixed_and_bf16("fsdp", Layout(4), global_batch=8, micro_batch=1)
    cost = built.step_cost(train, 4, BF16)
    counts = count_params(QWEN)
    gathered = cost.fsdp_root + 2 * cost.fsdp_unit
    accumulated = counts.total - counts.total / 4
    static_bf16 = bf16.memory.weights_and_optimizer - (gathered + accumulated) * 2 / GIB
    assert static_bf16 == pytest.approx(counts.total / 4 * 2 * (1 + 2) / GIB + counts.total / 4 * 2 / GIB)
    assert mixed.memory.weights_and_optimizer == pytest.approx(2 * static_bf16 + accumulated * 4 / GIB)
    assert mixed.memory.compute_copies == pytest.approx(gathered * 2 / GIB)
    assert mixed.memory.activations == bf16.memory.activations
    num_micro = 2  # 8 sequences over 4 ranks at micro-batch 1
    ratio = (2 * num_micro * 2 + 4) / (2 * num_micro * 2 + 2)
    assert mixed.comm_s["fsdp gather/scatter"] == pytest.approx(ratio * bf16.comm_s["fsdp gather/scatter"])


def test_tensor_parallel_all_reduces_are_fp32_backward_outside_fsdp():
    """Forward all-reduces sum bf16 partial outputs; backward ones the residual stream's gradients: fp32
    under autocast (tp, mixed over DDP), bf16 where FSDP2 casts the layers' inputs (mixed over FSDP)."""
    for strategy, layout, ratio in (
        ("tp", Layout(4, tp_size=4), (2 + 4) / (2 + 2)),
        ("mixed", Layout(4, dp_size=2, tp_size=2, options=get_strategy("mixed").Options(dp="ddp")), 1.5),
        ("mixed", Layout(4, dp_size=2, tp_size=2), 1.0),
    ):
        _, _, mixed, bf16 = _mixed_and_bf16(strategy, layout, global_batch=8, micro_batch=2)
        assert mixed.comm_s["tp all-reduce"] == pytest.approx(ratio * bf16.comm_s["tp all-reduce"]), layout


def _adamw_plan(capsys, gpus: int, gpu: str, *more: str) -> dict:
    return _plan_json(capsys, "--gpus", str(gpus), "--gpu", gpu, "--set", "train.optimizer=adamw", *more)


@pytest.mark.parametrize("gpus, gpu", [(4, "h200"), (8, "h200"), (8, "h100")])
def test_the_whole_model_with_adamw_under_mixed_fits_the_proposed_layout(gpus, gpu, capsys):
    """Qwen3-30B-A3B with AdamW under mixed (16 bytes per weight: 488 GB): the master copy and its state are
    sharded where the weights are, so ep with FSDP still fits four H200s and eight of either kind, and is
    proposed first; layouts that fit under bf16 and no longer do are shown with their split and say so."""
    plan = _adamw_plan(capsys, gpus, gpu)
    assert plan["settings"]["precision"] == "mixed" and plan["nothing_fits"] is None
    best = plan["layouts"][0]
    assert best["fits"] and (best["label"], best["ep"]) == ("ep+fsdp", gpus)
    fitting = [row for row in plan["layouts"] if row["fits"]]
    speeds = [row["tokens_per_s_per_gpu"] for row in fitting]
    assert speeds == sorted(speeds, reverse=True)
    bf16 = _adamw_plan(capsys, gpus, gpu, "--set", "train.precision=bf16")
    fits_bf16 = {(r["label"], r["dp"], r["tp"], r["ep"]) for r in bf16["layouts"] if r["fits"]}
    lost = [
        r for r in plan["layouts"] if not r["fits"] and (r["label"], r["dp"], r["tp"], r["ep"]) in fits_bf16
    ]
    assert lost, "mixed costs some layout its fit"
    for row in lost:
        assert re.match(r"[\d.]+ GiB > [\d.]+ usable: weights \+ optimizer state [\d.]+, .*activations [\d.]+, "
                        r"logits [\d.]+.*; under bf16 it fits \([\d.]+ GiB\)$", row["does_not_fit"]), row  # fmt: skip
    assert all(row["fits"] or "under bf16" not in row["does_not_fit"] for row in bf16["layouts"])


def test_nothing_fits_four_h100s_with_adamw_under_mixed_and_the_plan_says_what_would(capsys):
    """30.5 B weights at 16 bytes over four 80 GB GPUs is 122 GB each: no layout fits. One line says so,
    with the smallest layout and the changes that fit, each with its fastest layout; its command runs
    with the change."""
    plan = _adamw_plan(capsys, 4, "h100")
    assert not any(row["fits"] for row in plan["layouts"])
    line = plan["nothing_fits"]
    assert line.startswith("Nothing fits 4 × H100 (73.11 GiB usable per GPU) with adamw in mixed precision: ")
    changes = {alt["change"]: alt for alt in plan["would_fit"]}
    assert set(changes) == {"8 GPUs", "--set train.optimizer=sgd", "--set train.precision=bf16"}
    for change, alt in changes.items():
        assert alt["fits"] and alt["peak_mem_gib"] <= plan["usable_gib"] and change in line
        assert ("--nproc 8" if change == "8 GPUs" else change) in alt["command"]
    out = _plan(capsys, "--gpus", "4", "--gpu", "h100", "--set", "train.optimizer=adamw")
    assert [text for text in out.splitlines() if text.startswith("Nothing fits")] == [line]
    # under bf16 the same machine fits (what the plan proposed before mixed)
    assert _adamw_plan(capsys, 4, "h100", "--set", "train.precision=bf16")["layouts"][0]["fits"]


def test_plan_refuses_fp32_compute_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        _plan(capsys, "--gpus", "4", "--set", "train.precision=fp32")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "moectl plan predicts bf16 compute, not train.precision=fp32" in err
