"""The launcher's worker server imports this module, and only the server: what every launched worker
needs, imported once before the server forks the workers (`moectl.run.worker.start_worker_server`). Each
worker starts with torch, DTensor, transformers, the training loop and the parallel layers the
strategies build on in memory, instead of spending seconds of CPU importing them itself.

What the imports print (warnings, C-level messages) is kept, not shown on the launcher's console: each
worker writes it into its own log (`OUTPUT`), where it went when every worker imported for itself.
"""

from __future__ import annotations

import importlib
import pkgutil
import signal
import sys

from moectl.import_noise import silence_known_import_noise
from moectl.run.worker import import_capturing_output


def _die_with_the_launcher() -> None:
    """The server is the launcher's child and never outlives it: a launcher that stops on bad input
    would otherwise leave it importing for seconds. (Its workers are told by torch's own parent-death
    signal, SIGINT: they finish their step and checkpoint.)"""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _import_worker_modules() -> None:
    import torch.distributed.fsdp  # noqa: F401
    import torch.nn.parallel  # noqa: F401

    import moectl.parallel
    import moectl.run.loop  # noqa: F401
    import moectl.run.start  # noqa: F401

    # What the strategies build on (they are plugins: each worker loads its own by name).
    for module in pkgutil.iter_modules(moectl.parallel.__path__, "moectl.parallel."):
        importlib.import_module(module.name)


_die_with_the_launcher()
silence_known_import_noise()
OUTPUT = import_capturing_output(_import_worker_modules)
