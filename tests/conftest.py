"""Session fixtures: each parallel layout trains once, and every test that needs it (numerics against
`single`, the checkpoint/resume ring, loading in transformers) reads that one run.

Why: a run's cost is almost all process start-up (a 2-process run pays for three interpreters
importing torch and transformers); its steps are cheap. So the suite trains each layout once, for
NUMERICS_STEPS steps with checkpoints along the way, instead of re-running it in every file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# A CPU suite: in-process runs must not pick a GPU either (subprocesses get the same variable).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from tests.layouts import LAYOUT_RUN_ARGS, LAYOUTS, runs_in_one_process  # noqa: E402
from tests.util import NUMERICS_ARGS, train_run  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Callable[[str], Path]:
    """`trained(name)`: the run directory of layout `name` (tests/layouts.py) trained with
    NUMERICS_ARGS and checkpoints (LAYOUT_RUN_ARGS); made on first use, then shared. Treat it as
    read-only: copy it before resuming from it."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            run_dir = tmp_path_factory.mktemp(f"layout-{name}") / "run"
            args = [*LAYOUTS[name], *NUMERICS_ARGS, *LAYOUT_RUN_ARGS]
            made[name] = train_run(run_dir, *args, in_process=runs_in_one_process(LAYOUTS[name]))
        return made[name]

    return get


@pytest.fixture(scope="session")
def single_reference(trained) -> Path:
    """The `single` run every strategy's numerics are compared with (tiny preset, fp32, CPU)."""
    return trained("single")
