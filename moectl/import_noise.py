"""Known, harmless messages that optional packages log while transformers imports them, dropped at
their source so that they do not open every run, rank log and bench row.

transformers' model code imports its quantizer registry, which imports torchao whenever it is installed
(the `fp8` and `dev` extras); torchao then tries to load its compiled CUDA kernels (`_C_*.so`, built for
one torch and CUDA version) and registers enums that newer torch versions no longer need registered.
moectl uses none of those kernels (its FP8 GEMMs go through torch's scaled matmuls), so both messages
say nothing about a moectl run. Only these exact messages are dropped, each from its own logger; every
other warning stays.
"""

from __future__ import annotations

import logging

#: logger name -> (the start of the dropped message, a fragment it must also hold)
KNOWN_NOISE = {
    "torchao": ("Failed to load ", "/torchao/_C"),
    "torch.utils._pytree": ("", "Calling register_constant() on Enum subclasses is deprecated"),
}


class _DropKnownMessage(logging.Filter):
    def __init__(self, prefix: str, fragment: str):
        super().__init__()
        self.prefix, self.fragment = prefix, fragment

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.prefix) and self.fragment in message)


def silence_known_import_noise() -> None:
    """Attach the filters (once per process; cheap, imports nothing but logging)."""
    for name, (prefix, fragment) in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownMessage) for f in logger.filters):
            logger.addFilter(_DropKnownMessage(prefix, fragment))
