"""Session fixtures: each parallel layout trains once, and every test that needs it (numerics against
`single`, the checkpoint/resume ring, loading in transformers) reads that one run.

Why: a run's cost is almost all process start-up (a 2-process run pays for three interpreters
importing torch and transformers); its steps are cheap. So the suite trains each layout once, for
NUMERICS_STEPS steps with checkpoints along the way, instead of re-running it in every file.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# A CPU suite: in-process runs must not pick a GPU either (subprocesses get the same variable).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One thread per process, in this process and every run it starts (an explicit setting wins): the tiny
# model gains nothing from a second thread and loses much when the cores are shared, as OpenMP threads
# spin waiting for a descheduled peer. On the loaded 2-core machine the default 40-step run took 34 s
# in-process with 2 threads and 1.0 s with one. (Multi-process runs already use one thread per worker.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.layouts import LAYOUT_RUN_ARGS, LAYOUTS, runs_in_one_process  # noqa: E402
from tests.util import NUMERICS_ARGS, REPO, run_as_printed, train_run  # noqa: E402

#: router preference along hidden dim 0, which the embeddings push up for every token
EXPERT_PREFERENCE = torch.tensor([3.0, 2.5, 1.0, 0.5, -6.0, -6.0, -6.0, -6.0])


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Callable[[str], Path]:
    """`trained(name)`: the run directory of layout `name` (tests/layouts.py) trained with
    NUMERICS_ARGS and checkpoints (LAYOUT_RUN_ARGS); made on first use, then shared, its console output
    too (tests/util.py `console_output`). Treat it as read-only: copy it before resuming from it."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            run_dir = tmp_path_factory.mktemp(f"layout-{name}") / "run"
            args = [*LAYOUTS[name], *NUMERICS_ARGS, *LAYOUT_RUN_ARGS]
            one_process = runs_in_one_process(LAYOUTS[name])
            made[name] = train_run(run_dir, *args, in_process=one_process, keep_output=True)
        return made[name]

    return get


class ReadmeRuns:
    """README commands run as printed (installed console script, shell) from `cwd`, a fresh directory
    that holds only a link to the repository's examples. Each command runs once, on a background
    thread, one after another: `start` queues it, and calling the object with a command waits for its
    result (queuing it first if needed); the result is then shared."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        # The environment as the session starts: tests change os.environ (monkeypatch) while a queued
        # command may be starting on the background thread.
        self.environ = dict(os.environ)
        self.results: dict[str, Future[subprocess.CompletedProcess]] = {}
        self.lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readme-commands")

    def start(self, command: str) -> None:
        if command not in self.results:
            self.results[command] = self.lane.submit(run_as_printed, command, self.cwd, 1500, self.environ)

    def __call__(self, command: str) -> subprocess.CompletedProcess:
        self.start(command)
        return self.results[command].result()


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory) -> Iterator[ReadmeRuns]:
    """The README's commands, each run once per session: test_out_of_the_box runs every one, and
    test_bench reads the bench showcase's output, test_layout the plugin example's run."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "examples").symlink_to(REPO / "examples")
    runs = ReadmeRuns(cwd)
    yield runs
    runs.lane.shutdown(wait=True, cancel_futures=True)  # a session that ended early: drop what is queued


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "readme(*commands): README commands the test reads through `readme_run`; they start on a "
        "background thread as the session starts, and the test runs last",
    )


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `readme` run last, so that their commands, started as the session starts
    (`readme_commands_ahead`), run beside the other tests. Why: the suite's own processes keep about
    1.4 of 2 cores busy, and the bench showcase alone takes a minute and a half."""
    reads_readme = [item for item in items if item.get_closest_marker("readme")]
    items[:] = [item for item in items if not item.get_closest_marker("readme")] + reads_readme


@pytest.fixture(scope="session", autouse=True)
def readme_commands_ahead(request: pytest.FixtureRequest) -> None:
    """Queue the README commands that the session's `readme` tests read, in the order they are read."""
    commands = [
        command
        for item in request.session.items
        for marker in item.iter_markers("readme")
        for command in marker.args
    ]
    if commands:
        runs = request.getfixturevalue("readme_run")
        for command in commands:
            runs.start(command)


@pytest.fixture(scope="session")
def single_reference(trained) -> Path:
    """The `single` run every strategy's numerics are compared with (tiny preset, fp32, CPU)."""
    return trained("single")


@pytest.fixture(scope="session")
def skewed_model(tmp_path_factory) -> Path:
    """Tiny model whose router sends most rows to experts 0-1 and none to experts 4-7.

    Every embedding gets a constant component on hidden dim 0 and every router row a weight on that
    dim that falls with the expert index. Under ep 2 the rank holding experts 4-7 receives no row at
    all (under ep 4 two ranks idle) while one rank gets most of them; checked on the first batch.
    """
    from moectl.config import build_config
    from moectl.data import build_data
    from moectl.hf_io import save_hf_model
    from moectl.model import build_meta_model, hf_config, init_full_tensor, materialize

    cfg = build_config("tiny").model
    meta = build_meta_model(cfg, torch.float32)
    state = {n: init_full_tensor(n, p.shape, cfg, 0, torch.device("cpu")) for n, p in meta.named_parameters()}
    state["model.embed_tokens.weight"][:, 0] = 0.05
    for layer in range(cfg.num_layers):
        state[f"model.layers.{layer}.mlp.gate.weight"][:, 0] = 0.1 * EXPERT_PREFERENCE
    directory = tmp_path_factory.mktemp("skewed") / "model"
    save_hf_model(state, hf_config(cfg), directory)

    model = build_meta_model(cfg, torch.float32)
    materialize(model, torch.device("cpu"), lambda name, shape, device: state[name])
    counts = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(
            lambda module, args, out: counts.append(torch.bincount(out[2].flatten(), minlength=8))
        )
    tokens = build_data(build_config("tiny").data, cfg.vocab_size, 0).global_batch(0, 8, 64)
    with torch.no_grad():
        model(input_ids=tokens[:, :-1])
    for per_expert in counts:
        assert per_expert[4:].sum() == 0 and per_expert[:2].sum() > 0.7 * per_expert.sum(), per_expert
    return directory


@pytest.fixture(scope="session")
def skewed_single(tmp_path_factory, skewed_model) -> Path:
    """`single` trained from the skewed model: the reference of every skewed-routing run."""
    run_dir = tmp_path_factory.mktemp("skewed_single") / "run"
    args = ["--strategy", "single", "--model", str(skewed_model), *NUMERICS_ARGS]
    return train_run(run_dir, *args, in_process=True)
