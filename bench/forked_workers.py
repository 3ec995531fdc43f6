"""Workers forked from the launcher's worker server use the GPU as spawned ones did.

`python bench/forked_workers.py RUN_DIR` (recipe `forked-workers`) checks, on a GPU machine:

1. the worker server's imports (moectl.run.worker_imports) leave CUDA untouched, so a process forked from
   the server initialises CUDA itself and computes on it;
2. a run launched through the elastic agent trains on the GPUs: `moectl train --strategy ddp --nproc N`
   on N ≥ 2 GPUs, or on one GPU the launcher's own path with one worker (`launch_workers`).

Each check prints one line; the exit code is 1 when one fails.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path


def _probe(results) -> None:
    import torch

    preloaded = "moectl.run.loop" in sys.modules and "transformers" in sys.modules
    bad_fork = torch.cuda._is_in_bad_fork()
    product = (torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda"))[0, 0].item()
    results.put((preloaded, bad_fork, product))


def check_fork_server() -> bool:
    from moectl.run.launch import start_worker_server

    start_worker_server()
    context = multiprocessing.get_context("forkserver")
    results = context.SimpleQueue()
    child = context.Process(target=_probe, args=(results,))
    child.start()
    child.join(120)
    preloaded, bad_fork, product = results.get() if child.exitcode == 0 else (None, None, None)
    ok = child.exitcode == 0 and preloaded and not bad_fork and product == 64.0
    print(
        f"fork server child: exit {child.exitcode}, imports preloaded {preloaded}, "
        f"CUDA bad fork {bad_fork}, matmul {product}: {'ok' if ok else 'FAILED'}"
    )
    return bool(ok)


def check_launched_run(run_dir: Path) -> bool:
    import torch

    num_gpus = torch.cuda.device_count()
    started = time.perf_counter()
    if num_gpus >= 2:
        command = [sys.executable, "-m", "moectl", "train", "--strategy", "ddp", "--nproc", str(num_gpus)]
        result = subprocess.run([*command, "--steps", "8", "--run-dir", str(run_dir)], check=False)
        ok = result.returncode == 0
    else:
        from moectl.run.launch import launch_workers
        from moectl.run.prepare import prepare
        from moectl.run.start import _prepare_run_dir

        plan, _ = prepare(None, {"train": {"steps": 8}}, None, run_dir)
        target = _prepare_run_dir(plan, run_dir)
        launch_workers(plan.cfg.parallel, 1, target / "config.yaml", target)
        ok = True
    ok = ok and (run_dir / "summary.json").is_file()
    print(
        f"launched run on {max(num_gpus, 1)} GPU(s): {time.perf_counter() - started:.1f} s, "
        f"summary {'written' if ok else 'missing'}: {'ok' if ok else 'FAILED'}"
    )
    return ok


if __name__ == "__main__":
    passed = check_fork_server() and check_launched_run(Path(sys.argv[1]))
    sys.exit(0 if passed else 1)
