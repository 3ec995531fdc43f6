"""The launcher's worker server imports this module, and only the server: what every launched worker
needs, imported once before the server forks the workers (`moectl.run.launch.start_worker_server`).
Each worker starts with torch, DTensor, transformers, the training loop and the parallel layers the
strategies build on in memory, instead of spending seconds of CPU importing them itself.

What the imports print (warnings, C-level messages) is kept, not shown on the launcher's console: each
worker writes it into its own log (`OUTPUT`), where it went when every worker imported for itself.

Then everything imported is frozen out of garbage collection (`gc.freeze`), as Python advises for a
process that forks without exec: a worker's collections neither walk nor copy (copy-on-write) the
pages of objects it shares with the server, and the server's own exit, once the launcher and its
workers are gone, does not walk them either (about 2 s of the machine after every launch on cpu2).
"""

from __future__ import annotations

import gc
import importlib
import pkgutil

from moectl.import_noise import silence_known_import_noise
from moectl.run.worker import import_capturing_output


def _import_worker_modules() -> None:
    import torch.distributed.fsdp  # noqa: F401
    import torch.nn.parallel  # noqa: F401

    import moectl.parallel
    import moectl.run.loop  # noqa: F401
    import moectl.run.start  # noqa: F401

    # What the strategies build on (they are plugins: each worker loads its own by name).
    for module in pkgutil.iter_modules(moectl.parallel.__path__, "moectl.parallel."):
        importlib.import_module(module.name)


silence_known_import_noise()
OUTPUT = import_capturing_output(_import_worker_modules)
gc.freeze()
