"""``moectl compare-weights``: tensor-by-tensor relative error between two safetensors checkpoints.

By job: ``checkpoints`` streams both checkpoints and compares them (``compare_checkpoints``), ``mapped``
reads the files through memory maps, ``kernels`` holds the chunked sums, ``report`` what was found,
``render`` prints it and ``command`` is the command itself (``compare_command``).
"""

from moectl.compare.checkpoints import compare_checkpoints
from moectl.compare.command import compare_command
from moectl.compare.render import render_report
from moectl.compare.report import CompareReport, ShapeMismatch, TensorDiff

__all__ = [
    "CompareReport",
    "ShapeMismatch",
    "TensorDiff",
    "compare_checkpoints",
    "compare_command",
    "render_report",
]
