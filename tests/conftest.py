"""Session fixtures: each parallel layout trains once, and every test that needs it (numerics against
`single`, the checkpoint/resume ring, loading in transformers) reads that one run.

Why: a run's cost is mostly start-up (a launched run pays for two interpreters importing torch and
transformers: the launcher and the worker server its workers are forked from); its steps are cheap.
So the suite trains each layout once, for NUMERICS_STEPS steps with checkpoints along the way, instead
of re-running it in every file, and starts the multi-process ones ahead on a background lane.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


class BackgroundLane:
    """One background thread that runs the session's long subprocess work one job after another,
    beside the tests: `start(key, fn, *args)` queues a job once, `result(key)` returns its result.

    Why: with workers forked from a preloaded server, a launched run keeps about one of the two cores
    busy (the server's imports, then the workers' short steps), so a run started ahead on the other
    core is mostly free. A test that needs a job the lane has not begun yet takes it off the queue and
    runs it itself, so neither side waits for work the other has not started. Only subprocesses run
    here: an in-process run redirects this process's output."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-runs")
        self.jobs: dict[Hashable, tuple[Future, Callable[[], Any], threading.Lock]] = {}
        self.done: dict[Hashable, Any] = {}

    def start(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> None:
        if key not in self.jobs:
            job = functools.partial(fn, *args)
            self.jobs[key] = (self.executor.submit(job), job, threading.Lock())

    def started(self, key: Hashable) -> bool:
        return key in self.jobs

    def result(self, key: Hashable) -> Any:
        """The job's result: waited for if the lane is running it or ran it, else run here and now.
        (A job may read another's result from the lane's thread: one lock per job.)"""
        future, job, lock = self.jobs[key]
        with lock:
            if key not in self.done:
                self.done[key] = job() if future.cancel() else future.result()
        return self.done[key]

    def start_if_read(
        self, items: list[pytest.Item], fixture: str, key: Hashable, make_job: Callable[[], Callable[[], Any]]
    ) -> None:
        """Queue `make_job()` under `key` when one of `items` reads `fixture` (a `start_ahead` helper)."""
        if any(fixture in item.fixturenames for item in items):
            self.start(key, make_job())

    def start_per_param(
        self, items: list[pytest.Item], test: str, param: str, make_job: Callable[[Any], Callable[[], Any]]
    ) -> None:
        """Queue `make_job(value)` under `(test, value)` for each collected case of the parametrized
        `test`, `value` its parameter `param` (a `start_ahead` helper)."""
        for item in items:
            if item.originalname == test:
                value = item.callspec.params[param]
                self.start((test, value), make_job(value))

    def result_or_run(self, key: Hashable, job: Callable[[], Any]) -> Any:
        """The result of the job started ahead under `key`, or of `job` run here and now (a session
        that did not start it: running it behind the lane's queue would wait for everything before it)."""
        return self.result(key) if self.started(key) else job()


@pytest.fixture(scope="session")
def background_lane() -> Iterator[BackgroundLane]:
    lane = BackgroundLane()
    yield lane
    lane.executor.shutdown(wait=True, cancel_futures=True)  # a session that ended early: drop the queue


class TrainedLayouts:
    """`trained(name)`: the run directory of layout `name` (tests/layouts.py) trained with
    NUMERICS_ARGS and checkpoints (LAYOUT_RUN_ARGS); made once, then shared, its console output too
    (tests/util.py `console_output`). Treat it as read-only: copy it before resuming from it.

    A multi-process layout may be started ahead on the background lane (`start`); a one-process layout
    runs in this process when first asked for."""

    def __init__(
        self, tmp_path_factory: pytest.TempPathFactory, lane: BackgroundLane, data_args: list[str]
    ) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.lane = lane
        self.data_args = data_args
        self.made: dict[str, Path] = {}

    def _command(self, name: str) -> list[Path | str]:
        # The directory is made here, on the test thread: pytest's temporary directories are not
        # thread-safe (the session's base directory is made on first use).
        run_dir = self.tmp_path_factory.mktemp(f"layout-{name}") / "run"
        return [
            run_dir,
            *NUMERICS_ARGS,
            *LAYOUTS[name],
            *LAYOUT_RUN_ARGS,
            *self.data_args,
        ]  # the layout's own flags win

    def start(self, name: str) -> None:
        if not runs_in_one_process(LAYOUTS[name]) and not self.lane.started(("layout", name)):
            self.lane.start(
                ("layout", name), functools.partial(train_run, keep_output=True), *self._command(name)
            )

    def __call__(self, name: str) -> Path:
        if name not in self.made:

            def here() -> Path:
                in_process = runs_in_one_process(LAYOUTS[name])
                return train_run(*self._command(name), in_process=in_process, keep_output=True)

            self.made[name] = self.lane.result_or_run(("layout", name), here)
        return self.made[name]


@pytest.fixture(scope="session")
def layout_data(tmp_path_factory) -> list[str]:
    """The data every shared layout trains on (`trained`), as `moectl train` flags: chat conversations
    (a datasets.save_to_disk directory) tokenized by a small BPE tokenizer, packed into rows with
    document masking, only assistant tokens as targets, 15 % of the conversations held out for a
    validation loss every 4 steps. Some conversations run over a row. The token cache is built here,
    once: every run and every rank maps it. A test that compares its own run with `single_reference`
    trains it with these flags too."""
    from moectl.data.cache import BuildSettings, ensure_cache
    from tests.corpus import conversations, make_tokenizer, save_chat_dataset

    root = tmp_path_factory.mktemp("layout-data")
    tokenizer = make_tokenizer(root / "tokenizer")
    # Seed 9: over the 8 steps of `single`, no token's 2nd and 3rd router choices come closer than 2.4e-6
    # (seed 1: 1.5e-8, which the rounding of another layout flips). The synthetic data's closest: 1.9e-6.
    chats = save_chat_dataset(root / "chats", conversations(160, seed=9))
    settings = BuildSettings(str(chats), str(tokenizer), "chat", "messages", num_proc=1)
    ensure_cache(settings, root / "cache", note=lambda line: None)
    return [
        *("--data", str(chats), "--set", "data.format=chat", "--set", f"data.tokenizer={tokenizer}"),
        *("--set", f"data.cache_dir={root / 'cache'}", "--set", "data.val_fraction=0.15"),
        *("--set", "train.eval_every=4"),
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, background_lane, layout_data) -> TrainedLayouts:
    return TrainedLayouts(tmp_path_factory, background_lane, layout_data)


class ReadmeRuns:
    """README commands run as printed (installed console script, shell) from `cwd`, a fresh directory
    that holds only a link to the repository's examples. Each command runs once, on the background
    lane: `start` queues it, and calling the object with a command waits for its result (queuing it
    first if needed); the result is then shared."""

    def __init__(self, cwd: Path, lane: BackgroundLane):
        self.cwd = cwd
        self.lane = lane
        # The environment as the session starts: tests change os.environ (monkeypatch) while a queued
        # command may be starting on the background thread. Token caches stay in the directory.
        self.environ = {**os.environ, "MOECTL_DATA_CACHE": str(cwd / ".token-cache")}

    def start(self, command: str) -> None:
        self.lane.start(("readme", command), run_as_printed, command, self.cwd, 1500, self.environ)

    def __call__(self, command: str) -> subprocess.CompletedProcess:
        self.start(command)
        return self.lane.result(("readme", command))


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory, background_lane) -> ReadmeRuns:
    """The README's commands, each run once per session: test_out_of_the_box runs every one, and
    test_bench reads the bench showcase's output, test_layout the plugin example's run, test_corpus the
    corpus commands' runs."""
    from tests.corpus import make_readme_files

    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "examples").symlink_to(REPO / "examples")
    make_readme_files(cwd)  # the small corpus, chats and tokenizer the corpus commands read
    return ReadmeRuns(cwd, background_lane)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "readme(*commands): README commands the test reads through `readme_run`; they start on the "
        "background lane as the session starts, and the test runs last",
    )
    config.addinivalue_line(
        "markers",
        "layouts(*names): layouts of tests/layouts.py the test reads through `trained` other than its "
        "parameters; they start on the background lane as the session starts",
    )


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `readme` run last, so that their commands, started as the session starts
    (`background_runs_ahead`), run beside the other tests. Why: the bench showcase alone takes a minute
    and a half."""
    reads_readme = [item for item in items if item.get_closest_marker("readme")]
    items[:] = [item for item in items if not item.get_closest_marker("readme")] + reads_readme


def _layouts_read(item: pytest.Item) -> list[str]:
    """The layouts a test reads through `trained`: its `layouts` marker, and its parameters that name one."""
    if "trained" not in inspect.signature(getattr(item, "function", lambda: None)).parameters:
        return []
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    named = [value for value in params if isinstance(value, str) and value in LAYOUTS]
    return [name for marker in item.iter_markers("layouts") for name in marker.args] + named


@pytest.fixture(scope="session", autouse=True)
def background_runs_ahead(request: pytest.FixtureRequest) -> None:
    """Queue, as the session starts, the long runs its tests will read: the multi-process layouts they
    read through `trained` (in the order the tests come), the README commands its `readme` tests read,
    then each test module's own runs (a module's `start_ahead(lane, request, items)`, given its
    collected tests and this request for session fixtures; its tests and fixtures read them with
    `result_or_run`), in the order the tests come."""
    items = request.session.items
    lane = request.getfixturevalue("background_lane")
    for item in items:
        for name in _layouts_read(item):
            request.getfixturevalue("trained").start(name)
    # The README commands next, though their tests run last: they are the longest jobs, and a test
    # takes any job the lane has not begun yet (`BackgroundLane.result`), so the lane should hold them.
    commands = [
        command for item in items for marker in item.iter_markers("readme") for command in marker.args
    ]
    if commands:
        runs = request.getfixturevalue("readme_run")
        for command in commands:
            runs.start(command)
    # Modules in the order their first test that reads the lane comes.
    readers = dict.fromkeys(
        item.module for item in items if "background_lane" in getattr(item, "fixturenames", ())
    )
    for module in readers:
        if hasattr(module, "start_ahead"):
            module.start_ahead(lane, request, [item for item in items if item.module is module])


@pytest.fixture(scope="session")
def single_reference(trained) -> Path:
    """The `single` run every strategy's numerics are compared with (tiny preset, fp32, CPU, on
    `layout_data`)."""
    return trained("single")


@pytest.fixture(scope="session")
def skewed_model(tmp_path_factory) -> Path:
    """Tiny model whose router sends most rows to experts 0-1 and none to experts 4-7.

    Every embedding gets a constant component on hidden dim 0 and every router row a weight on that
    dim that falls with the expert index. Under ep 2 the rank holding experts 4-7 receives no row at
    all (under ep 4 two ranks idle) while one rank gets most of them; checked on the first batch.
    """
    from moectl.config import build_config
    from moectl.data.sources import build_data
    from moectl.io.hf import save_hf_model
    from moectl.model.build import build_meta_model, hf_config, init_full_tensor, materialize

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
        model(input_ids=tokens.input_ids)
    for per_expert in counts:
        assert per_expert[4:].sum() == 0 and per_expert[:2].sum() > 0.7 * per_expert.sum(), per_expert
    return directory


@pytest.fixture(scope="session")
def skewed_single(tmp_path_factory, skewed_model) -> Path:
    """`single` trained from the skewed model: the reference of every skewed-routing run."""
    run_dir = tmp_path_factory.mktemp("skewed_single") / "run"
    args = ["--strategy", "single", "--model", str(skewed_model), *NUMERICS_ARGS]
    return train_run(run_dir, *args, in_process=True)
