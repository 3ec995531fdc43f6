"""Plant small faults in a copy of the tree, one at a time, and check that the tests turn red.

    .venv/bin/python tests/planted_faults.py            # every fault
    .venv/bin/python tests/planted_faults.py --list     # what each fault does and which tests judge it
    .venv/bin/python tests/planted_faults.py NAME ...   # some of them

Not part of the suite (pytest collects test_*.py only) and not run by CI: it takes minutes. Each
fault is a textual patch of one file. The tree (tracked files and untracked ones git does not ignore)
is copied to a temporary directory, the patch applied there (a patch that no longer applies is an
error: the code moved, so the fault must be rewritten), and the named tests run with that copy's code
first on the path, in the test process and in every worker it starts. A fault counts as caught when
pytest reports failed tests (exit code 1); anything else (the tests pass, or pytest itself breaks) is
a miss. Prints "caught N of M" and exits 0 only when every fault was caught.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    file: str
    old: str  # text that must occur exactly once in `file`
    new: str
    tests: list[str] = field(default_factory=list)


FAULTS = [
    Fault(
        "router-grad-x0.97-under-ep",
        "ep scales every router gradient by 0.97 (a 3e-4 share of the weights' norm)",
        "strategies/ep.py",
        "    def after_backward(self, model: nn.Module) -> None:\n",
        "    def after_backward(self, model: nn.Module) -> None:\n"
        "        for name, param in model.named_parameters():\n"
        "            if name.endswith('mlp.gate.weight') and param.grad is not None:\n"
        "                param.grad.mul_(0.97)\n",
        ["tests/test_ep.py::test_ep_matches_single"],
    ),
    Fault(
        "expert-not-reduced-over-replicas",
        "ep with replicated experts leaves local expert 0 of layer 0 with this replica's gradient only",
        "strategies/ep.py",
        '            all_reduce_gradients(experts, group=self.dims.group("ep_replicate"))\n',
        "            kept = experts[0].grad[0].clone()\n"
        '            all_reduce_gradients(experts, group=self.dims.group("ep_replicate"))\n'
        "            experts[0].grad[0].copy_(kept)\n",
        ["tests/test_ep.py::test_unbalanced_routing_still_matches_single"],
    ),
    Fault(
        "rank-1-reads-rank-0-slice",
        "data-parallel rank 1 trains on rank 0's slice of the global batch",
        "moectl/data/sources.py",
        "    per_rank = batch.num_rows // dp_size\n",
        "    per_rank = batch.num_rows // dp_size\n    dp_rank = 0 if dp_rank == 1 else dp_rank\n",
        ["tests/test_ddp.py::test_data_parallel_matches_single"],
    ),
    Fault(
        "loss-over-local-tokens",
        "the loss is divided by the rank's own token count instead of the global batch's",
        "moectl/run/loop.py",
        "local.split(train.micro_batch), num_target_tokens, loss_fn",
        "local.split(train.micro_batch), local.num_targets(), loss_fn",
        ["tests/test_ddp.py::test_data_parallel_matches_single"],
    ),
    Fault(
        "optimizer-step-off-by-one-after-resume",
        "a resumed optimizer counts one step more than it took (AdamW's bias correction)",
        "moectl/io/checkpoint.py",
        "    # The config, not the checkpoint, owns the hyperparameters: a resume may change them. The learning\n",
        "    for param_state in optimizer.state.values():\n"
        '        if "step" in param_state:\n'
        '            param_state["step"] += 1\n'
        "    # The config, not the checkpoint, owns the hyperparameters: a resume may change them. The learning\n",
        ["tests/test_run_settings.py::test_adamw_resumes_under_another_layout"],
    ),
    Fault(
        "momentum-not-restored-after-resume",
        "a resume starts SGD's momentum from zero instead of the checkpoint's",
        "moectl/io/checkpoint.py",
        "    # The config, not the checkpoint, owns the hyperparameters: a resume may change them. The learning\n",
        "    for param_state in optimizer.state.values():\n"
        '        if "momentum_buffer" in param_state:\n'
        '            param_state["momentum_buffer"].zero_()\n'
        "    # The config, not the checkpoint, owns the hyperparameters: a resume may change them. The learning\n",
        ["tests/test_checkpoint.py::test_resume_under_another_layout_matches_single"],
    ),
    Fault(
        "fsdp-averages-instead-of-summing-under-ep",
        "ep with FSDP lets FSDP average gradients over the ranks where the loss already sums them",
        "strategies/ep.py",
        'fully_shard_layers(model, self.dims.mesh("dp"), policy, sum_gradients=True',
        'fully_shard_layers(model, self.dims.mesh("dp"), policy, sum_gradients=False',
        ["tests/test_ep.py::test_ep_matches_single"],
    ),
    Fault(
        "replicated-grad-counted-per-rank-in-grad-norm",
        "a replicated (plain) gradient adds its squares to the global gradient norm once per rank",
        "moectl/parallel/gradients.py",
        "        total = total + _local_sum_of_squares(plain)\n",
        "        squares = _local_sum_of_squares(plain)\n"
        "        if dist.is_initialized():\n"
        "            dist.all_reduce(squares)\n"
        "        total = total + squares\n",
        ["tests/test_training_features.py::test_every_kind_of_layout_trains_and_logs_what_single_does"],
    ),
    Fault(
        "expert-grads-counted-per-replica-in-grad-norm",
        "ep sums the expert blocks' squares over every rank, not the ep group: each replica counts again",
        "strategies/ep.py",
        "            dist.all_reduce(expert_squares, group=self._ep_mesh.get_group())\n",
        "            dist.all_reduce(expert_squares)\n",
        ["tests/test_training_features.py::test_every_kind_of_layout_trains_and_logs_what_single_does[ep]"],
    ),
    Fault(
        "lr-warmup-starts-at-zero",
        "the warm-up's first step takes learning rate 0 (lr · s / W instead of lr · (s + 1) / W)",
        "moectl/run/schedule.py",
        "        return train.lr * (step + 1) / warmup\n",
        "        return train.lr * step / warmup\n",
        [
            "tests/test_training_features.py::test_learning_rate_schedules",
            "tests/test_training_features.py::test_reference_run_outputs",
        ],
    ),
    Fault(
        "lr-decay-ends-a-step-late",
        "the decay reaches min_lr_ratio · lr a step after the last (steps − W decay steps, not steps − 1 − W)",
        "moectl/run/schedule.py",
        "    decay_steps = max(1, train.steps - 1 - warmup)\n",
        "    decay_steps = max(1, train.steps - warmup)\n",
        [
            "tests/test_training_features.py::test_learning_rate_schedules",
            "tests/test_training_features.py::test_reference_run_outputs",
        ],
    ),
    Fault(
        "aux-loss-over-micro-batch-sequences",
        "each micro-batch's auxiliary loss is divided by its own sequences, not the global batch's "
        "(wrong the same way in every layout: a comparison with single cannot see it)",
        "moectl/run/loop.py",
        "                objective = objective + routing.aux_loss_term(aux_sum) * strategy.loss_scale\n",
        "                objective = objective + aux_sum * (routing.aux_loss_coef / tokens.shape[0]) * strategy.loss_scale\n",
        [
            "tests/test_training_features.py::"
            "test_the_auxiliary_loss_enters_the_gradient_as_a_mean_over_the_global_batch"
        ],
    ),
    Fault(
        "validation-loss-of-one-rank",
        "the validation loss is each rank's own slice's, not summed over the data-parallel ranks",
        "moectl/run/loop.py",
        "        dist.all_reduce(total, group=strategy.loss_group())\n",
        "        pass\n",
        ["tests/test_ddp.py::test_data_parallel_matches_single[ddp]"],
    ),
    Fault(
        "document-start-is-a-target",
        "in a packed row, a document's first token counts as a target of the previous document's EOS",
        "moectl/data/packing.py",
        "                        is_target[filled] = False  # a document's first token follows another document's EOS\n",
        "                        pass\n",
        [
            "tests/test_corpus.py::test_a_packed_document_gets_the_loss_and_gradients_it_gets_alone",
            "tests/test_corpus.py::test_packed_rows_are_a_pure_function_of_seed_and_step_and_cover_every_document",
        ],
    ),
    Fault(
        "chunked-loss-drops-positions",
        "the chunked loss's forward drops the position ids: packed rows lose their document masking",
        "moectl/model/loss.py",
        "    hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state\n",
        "    kwargs.pop('position_ids', None)\n    hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state\n",
        ["tests/test_fsdp.py::test_fsdp_matches_single"],
    ),
]


def tree_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, target: Path) -> None:
    for name in tree_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)


def apply_patch(tree: Path, fault: Fault) -> None:
    path = tree / fault.file
    text = path.read_text()
    count = text.count(fault.old)
    if count != 1:
        raise SystemExit(
            f"error: fault {fault.name}: the text to replace occurs {count} times in {fault.file} (needs "
            "exactly 1); the code moved, so rewrite this fault in tests/planted_faults.py"
        )
    path.write_text(text.replace(fault.old, fault.new))
    py_compile.compile(str(path), doraise=True)


def environment(tree: Path) -> dict[str, str]:
    """The copy's code first on the path: the editable install of this venv points at the original
    tree, and an import path beats it (in pytest, in `python -m moectl`, and in every worker)."""
    return {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}


PROBE_PLUGIN = """
from pathlib import Path

import torch.distributed as dist

import moectl
import strategies
from strategies.ddp import DDP


class Probe(DDP):
    name = "probe"

    def after_backward(self, model):
        Path(__file__).with_name(f"rank{dist.get_rank()}.txt").write_text(f"{moectl.__file__} {strategies.__file__}")
"""


def check_the_copy_runs(tree: Path) -> None:
    """A 2-process run in the copy reports, from each worker, where moectl and strategies came from."""
    probe_dir = tree / "probe"
    probe_dir.mkdir()
    (probe_dir / "probe.py").write_text(PROBE_PLUGIN)
    result = subprocess.run(
        [sys.executable, "-m", "moectl", "train", "--strategy", "probe/probe.py", "--nproc", "2"]
        + ["--steps", "1", "--run-dir", str(tree / "probe-run"), "--set", "train.save_model=false"],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"error: the probe run in the copy failed:\n{result.stderr[-3000:]}")
    for rank in (0, 1):
        origins = (probe_dir / f"rank{rank}.txt").read_text().split()
        if not all(Path(origin).is_relative_to(tree) for origin in origins):
            raise SystemExit(f"error: worker {rank} ran code outside the copy: {origins}")
    shutil.rmtree(probe_dir)
    shutil.rmtree(tree / "probe-run")
    print(f"the copy's code runs in the test process and in the workers ({tree})", flush=True)


def run_fault(fault: Fault, scratch: Path) -> tuple[bool, str]:
    tree = scratch / fault.name
    copy_tree(REPO, tree)
    apply_patch(tree, fault)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *fault.tests],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    lines = result.stdout.splitlines()
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED", "ERROR"))]
    why = next((line[1:].strip() for line in lines if line.startswith("E ") and line[1:].strip()), "")
    shutil.rmtree(tree, ignore_errors=True)
    if result.returncode == 1 and failed:
        return True, f"{failed[0]} ({elapsed:.0f} s)\n    {why[:300]}"
    if result.returncode == 0:
        return False, f"the tests passed ({elapsed:.0f} s)"
    return False, f"pytest exited {result.returncode}: {result.stdout[-1500:]}{result.stderr[-1500:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="faults to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    options = parser.parse_args()
    known = {fault.name: fault for fault in FAULTS}
    unknown = [name for name in options.names if name not in known]
    if unknown:
        print(f"error: unknown fault {unknown[0]}; --list shows them", file=sys.stderr)
        return 2
    if options.list:
        for fault in FAULTS:
            print(f"{fault.name}: {fault.what}\n    {fault.file}; judged by {' '.join(fault.tests)}")
        return 0
    chosen = [known[name] for name in options.names if name in known] if options.names else FAULTS
    caught, missed = [], []
    with tempfile.TemporaryDirectory(prefix="planted-faults-") as scratch:
        for fault in chosen:  # every patch applies before any test runs
            apply_patch_check = Path(scratch) / "check"
            (apply_patch_check / fault.file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / fault.file, apply_patch_check / fault.file)
            apply_patch(apply_patch_check, fault)
        baseline = Path(scratch) / "baseline"
        copy_tree(REPO, baseline)
        check_the_copy_runs(baseline)
        shutil.rmtree(baseline)
        for fault in chosen:
            print(f"planting {fault.name}: {fault.what}", flush=True)
            was_caught, how = run_fault(fault, Path(scratch))
            (caught if was_caught else missed).append(fault.name)
            print(f"  {'caught' if was_caught else 'MISSED'}: {how}", flush=True)
    total = len(caught) + len(missed)
    print(f"caught {len(caught)} of {total}" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
