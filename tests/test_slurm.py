"""SLURM: the compressed node list, the layout `srun`'s variables give `moectl train` (flags win), a
resume under a new job, the refusal of several tasks per node, and the example job script. Two "nodes"
training like `single` under faked SLURM variables: tests/test_launcher.py,
test_two_nodes_on_localhost_train_like_single."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import pytest
import yaml

from moectl.errors import UsageError
from moectl.run.slurm import hostnames, parse_nodelist, slurm_layout
from tests.util import REPO, refused_in_process

SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "3",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "4",
    "SLURM_JOB_NODELIST": "gpu[01-04]",
    "SLURM_STEP_NODELIST": "gpu[01-04]",
    "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
}


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-04,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu5"]),
        ("node7", ["node7"]),
        ("a[8-11]", ["a8", "a9", "a10", "a11"]),
        ("x[009-011]-ib", ["x009-ib", "x010-ib", "x011-ib"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("gpu[3],gpu[1-2]", ["gpu3", "gpu1", "gpu2"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    ],
)
def test_compressed_node_lists_expand_as_scontrol_does(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist", ["gpu[01-", "gpu01]", "gpu[4-2]", "gpu[a-c]", "gpu[1-2-3]", "g[1[2]]", ""]
)
def test_malformed_node_lists_are_refused(nodelist):
    with pytest.raises(ValueError):
        parse_nodelist(nodelist)


def test_scontrol_names_the_hosts_where_installed(tmp_path, monkeypatch):
    """SLURM's own expansion wins where `scontrol` exists (a stand-in here that expands differently)."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "head-%s\\nsecond\\n" "$3"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert hostnames("gpu[01-02]") == ["head-gpu[01-02]", "second"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert hostnames("gpu[01-02]") == ["gpu01", "gpu02"]


def test_srun_variables_give_nodes_rank_and_rendezvous_and_flags_win():
    assert slurm_layout(set(), SRUN) == {"nnodes": 4, "node_rank": 1, "rdzv_endpoint": "gpu01:29500"}
    # This host's place in the step's list wins over SLURM_NODEID (the node's index in the whole job).
    step = {
        **SRUN,
        "SLURM_STEP_NODELIST": "gpu[03-04]",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURMD_NODENAME": "gpu04",
    }
    assert slurm_layout(set(), step) == {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "gpu03:29500"}
    assert slurm_layout({"rdzv_endpoint", "nnodes"}, {**SRUN, "MASTER_PORT": "6000"}) == {"node_rank": 1}
    assert slurm_layout(set(), {**SRUN, "MASTER_PORT": "6000"})["rdzv_endpoint"] == "gpu01:6000"
    # Not inside an srun step (a batch script, an outside torchrun, no SLURM at all): nothing.
    batch = {key: value for key, value in SRUN.items() if key != "SLURM_STEP_ID"}
    assert slurm_layout(set(), batch) == {} and slurm_layout(set(), {}) == {}
    assert slurm_layout(set(), {**SRUN, "TORCHELASTIC_RUN_ID": "x"}) == {}
    assert slurm_layout(set(), {**SRUN, "RANK": "3", "WORLD_SIZE": "8"}) == {}
    with pytest.raises(UsageError, match="--rdzv-endpoint"):
        slurm_layout(set(), {**SRUN, "SLURM_STEP_NODELIST": "gpu[01-"})


def test_several_tasks_per_node_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    for key, value in {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}.items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--run-dir", str(tmp_path / "run"), "--nproc", "8"]
    refused_in_process(argv, capsys, "--ntasks-per-node=1")
    assert not (tmp_path / "run").exists()


def test_a_run_under_srun_names_its_directory_after_the_job_and_a_resume_takes_the_new_job(
    trained, tmp_path, monkeypatch
):
    """Every node of a step computes the same default run directory; a resume under a new job keeps
    the saved layout and takes the new job's nodes and rendezvous (a flag still replaces the layout)."""
    from moectl.run.prepare import prepare

    for key, value in {
        **SRUN,
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_STEP_NODELIST": "gpu07",
    }.items():
        monkeypatch.setenv(key, value)
    plan, _ = prepare(None, {})
    assert plan.cfg.run_dir == "runs/slurm-4242.3-single"

    run = tmp_path / "run"
    shutil.copytree(trained("single"), run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["parallel"].update(strategy="ddp", nproc=2, nnodes=3, node_rank=2, rdzv_endpoint="old-head:29500")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    two_nodes = {**SRUN, "SLURM_NNODES": "2", "SLURM_STEP_NODELIST": "gpu[11-12]", "SLURM_NODEID": "1"}
    for key, value in two_nodes.items():
        monkeypatch.setenv(key, value)
    steps = {"train": {"steps": 10}}
    plan, _ = prepare(None, steps, resume=run)
    parallel = plan.cfg.parallel
    assert (parallel.strategy, parallel.nproc, parallel.nnodes, parallel.node_rank) == ("ddp", 2, 2, 1)
    assert parallel.rdzv_endpoint == "gpu11:29500" and plan.world_size == 4
    plan, _ = prepare(None, {**steps, "parallel": {"nproc": 1}}, resume=run)
    assert (plan.cfg.parallel.nproc, plan.cfg.parallel.nnodes, plan.world_size) == (1, 2, 2)


def test_the_example_job_script_runs_one_task_per_node_with_nvlink_multicast_off():
    """examples/slurm/train.sbatch: valid shell, one srun task per node, 8 GPUs a node, the NCCL settings
    moectl's workers use, and the README shows it."""
    script = REPO / "examples" / "slurm" / "train.sbatch"
    text = script.read_text().replace("\\\n", " ")  # continuation lines joined
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    assert re.search(r"^#SBATCH --gpus-per-node=8$", text, re.M)
    assert re.search(r"^export NCCL_NVLS_ENABLE=0$", text, re.M)
    assert re.search(r"^srun .*moectl train .*--nproc 8", text, re.M)
    assert "examples/slurm/train.sbatch" in (REPO / "README.md").read_text()
