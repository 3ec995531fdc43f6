"""A catalogue of bad inputs: each one exits with code 2 and one line on stderr that names the problem,
without a traceback, and leaves no run directory or partial file behind.

Most cases run the CLI in-process (`moectl.cli.main(argv)`: no interpreter start-up, so the whole
catalogue takes seconds); a few run as real subprocesses to check the console entry point itself.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.util import REPO, refused_in_process, run_moectl, run_moectl_in_process, train_run

TINY_RUN = ["--steps", "2", "--global-batch", "8", "--micro-batch", "2"]


@dataclass
class Inputs:
    """What a case may build: files under `tmp`, or a copy of a finished run with a checkpoint."""

    tmp: Path
    checkpointed: Path

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def tokens(self, name: str, array: np.ndarray) -> Path:
        path = self.tmp / name
        if name.endswith(".npy"):
            np.save(path, array)
        else:
            array.tofile(path)
        return path

    def hf_dir(self, config: dict | str | None = "tiny", safetensors: bytes | None = None) -> Path:
        """An HF model directory: config "tiny" (valid), a dict, raw text, or None (no config.json)."""
        from moectl.config import build_config
        from moectl.model.build import hf_config

        path = self.tmp / "hf"
        path.mkdir()
        if config == "tiny":
            config = hf_config(build_config("tiny").model).to_dict()
        if isinstance(config, dict):
            (path / "config.json").write_text(json.dumps(config))
        elif isinstance(config, str):  # raw text, e.g. broken JSON
            (path / "config.json").write_text(config)
        if safetensors is not None:
            (path / "model.safetensors").write_bytes(safetensors)
        return path

    def run_copy(self, edit: Callable[[Path], None] = lambda run: None) -> Path:
        run = self.tmp / "old-run"
        shutil.copytree(self.checkpointed, run)
        edit(run)
        return run


def _tiny_config_without(key: str) -> dict:
    from moectl.config import build_config
    from moectl.model.build import hf_config

    config = hf_config(build_config("tiny").model).to_dict()
    del config[key]
    return config


def _truncated_safetensors(tmp: Path) -> bytes:
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(128, 64)}, str(tmp / "whole.safetensors"))
    data = (tmp / "whole.safetensors").read_bytes()
    (tmp / "whole.safetensors").unlink()
    return data[:-1000]


def _checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def _drop_markers(run: Path) -> None:
    for path in _checkpoints(run):
        (path / "COMPLETE").unlink()


def _garble_metadata(run: Path) -> None:
    (_checkpoints(run)[-1] / ".metadata").write_bytes(b"\x80\x04garbage, not a pickle")


def _truncate_shard(run: Path) -> None:
    shard = _checkpoints(run)[-1] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _corpus_flags(i: Inputs, source: Path, *more: str, tokenizer: Path | None = None) -> list[str]:
    """`--data SOURCE` with a token cache outside the case's directory (it holds a lock file)."""
    flags = ["--data", str(source), "--set", f"data.cache_dir={i.tmp.parent / 'token-cache'}", *more]
    return flags + (["--set", f"data.tokenizer={tokenizer}"] if tokenizer else [])


def _parquet(i: Inputs, name: str, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = i.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _tokenizer(i: Inputs, chat_template: bool = True) -> Path:
    from tests.corpus import make_tokenizer

    return make_tokenizer(i.tmp / "tokenizer", chat_template=chat_template)


def _chat_jsonl(i: Inputs, chats: list) -> Path:
    from tests.corpus import write_chat_jsonl

    return write_chat_jsonl(i.tmp / "chats.jsonl", chats)


def _corrupt_shard(i: Inputs) -> Path:
    _parquet(i, "shards/part-00000.parquet", {"text": ["a good shard"] * 20})
    i.file("shards/part-00001.parquet", b"PAR1 this shard was cut off in the middle")
    return i.tmp / "shards"


Case = Callable[[Inputs], list[str]]
YAML = "-c"
# id -> (args builder, a fragment the one-line message must contain)
CASES: dict[str, tuple[Case, str]] = {
    # ---- config: presets, YAML, --set, values ----
    "unknown-preset": (lambda i: ["-c", "no-such-preset"], "unknown preset 'no-such-preset'"),
    "missing-yaml": (lambda i: ["-c", str(i.tmp / "absent.yaml")], "does not exist"),
    "bad-yaml-syntax": (lambda i: [YAML, str(i.file("bad.yaml", "train: {steps: [1, 2"))], "not valid YAML"),
    "yaml-is-a-list": (
        lambda i: [YAML, str(i.file("list.yaml", "- train\n- model\n"))],
        "must hold a mapping",
    ),
    "yaml-unknown-section": (
        lambda i: [YAML, str(i.file("s.yaml", "trainer:\n  steps: 3\n"))],
        "unknown config section 'trainer'",
    ),
    "yaml-section-not-mapping": (lambda i: [YAML, str(i.file("m.yaml", "train: 5\n"))], "must be a mapping"),
    "yaml-wrong-type": (
        lambda i: [YAML, str(i.file("t.yaml", "train:\n  steps: many\n"))],
        "train.steps must be an integer",
    ),
    "set-wrong-bool": (lambda i: ["--set", "train.compile=maybe"], "train.compile must be true or false"),
    "set-unknown-key": (lambda i: ["--set", "train.learning_rate=0.1"], "unknown key 'train.learning_rate'"),
    "set-unknown-section": (lambda i: ["--set", "optim.lr=0.1"], "unknown config section 'optim'"),
    "set-bad-syntax": (lambda i: ["--set", "train.lr"], "--set takes section.key=value"),
    "zero-steps": (lambda i: ["--steps", "0"], "train.steps must be positive, got 0"),
    "negative-global-batch": (lambda i: ["--global-batch", "-8"], "train.global_batch must be positive"),
    "zero-hidden-size": (lambda i: ["--set", "model.hidden_size=0"], "model.hidden_size must be positive"),
    "negative-checkpoint-every": (
        lambda i: ["--checkpoint-every", "-1"],
        "train.checkpoint_every must not be",
    ),
    "top-k-above-experts": (lambda i: ["--set", "model.top_k=9"], "model.top_k (9) cannot exceed"),
    "heads-not-multiple-of-kv": (lambda i: ["--set", "model.num_kv_heads=3"], "must be a multiple of"),
    "unknown-optimizer": (lambda i: ["--set", "train.optimizer=lion"], "train.optimizer must be one of"),
    "noise-above-one": (lambda i: ["--set", "data.noise=1.5"], "data.noise must lie in [0, 1]"),
    "batch-not-divisible": (
        lambda i: ["--global-batch", "10", "--micro-batch", "4"],
        "global batch 10 is not a multiple of micro-batch 4",
    ),
    "batch-not-divisible-by-dp": (
        lambda i: ["--strategy", "ddp", "--nproc", "3", "--global-batch", "8", "--micro-batch", "2"],
        "data-parallel degree 3",
    ),
    "seq-len-above-max-positions": (lambda i: ["--seq-len", "5000"], "exceeds model.max_position_embeddings"),
    # ---- command line ----
    "unknown-strategy": (lambda i: ["--strategy", "zero3"], "unknown strategy 'zero3'"),
    "not-an-integer": (lambda i: ["--steps", "abc"], "--steps"),
    "unknown-flag": (lambda i: ["--stepz", "3"], "No such option"),
    "single-on-two-processes": (
        lambda i: ["--strategy", "single", "--nproc", "2"],
        "single runs on one process",
    ),
    "ddp-with-tp-size": (
        lambda i: ["--strategy", "ddp", "--nproc", "2", "--tp-size", "2"],
        "no tensor or expert",
    ),
    "mixed-on-one-process": (lambda i: ["--strategy", "mixed"], "mixed needs --tp-size 2 or more"),
    "dp-size-not-world": (
        lambda i: ["--strategy", "ddp", "--nproc", "4", "--dp-size", "2"],
        "--dp-size 2 must",
    ),
    "nnodes-without-endpoint": (lambda i: ["--nnodes", "2"], "--rdzv-endpoint"),
    "node-rank-out-of-range": (
        lambda i: ["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29999"],
        "must be below parallel.nnodes",
    ),
    # ---- data ----
    "missing-data-file": (lambda i: ["--data", str(i.tmp / "absent.bin")], "does not exist"),
    "token-id-above-vocab": (
        lambda i: ["--data", str(i.tokens("big.bin", np.arange(1000, dtype=np.uint16)))],
        "token id 999 but the model's vocab_size is 128",
    ),
    "bin-size-not-multiple": (
        lambda i: ["--data", str(i.file("odd.bin", b"\x01" * 201))],
        "not a multiple of 2",
    ),
    "npy-of-floats": (
        lambda i: ["--data", str(i.tokens("f.npy", np.ones(500, dtype=np.float32)))],
        "1-D integer token array",
    ),
    "npy-2d": (
        lambda i: ["--data", str(i.tokens("m.npy", np.ones((20, 20), dtype=np.int64)))],
        "1-D integer",
    ),
    "npy-negative-ids": (
        lambda i: ["--data", str(i.tokens("n.npy", np.full(500, -1, dtype=np.int32)))],
        "negative token id",
    ),
    "unknown-suffix": (lambda i: ["--data", str(i.file("tokens.csv", "1,2,3\n"))], "unknown type"),
    "jsonl-not-json": (
        lambda i: _corpus_flags(i, i.file("d.jsonl", "not json\n")),
        "d.jsonl (JSON parse error: Invalid value. in row 0); check the files",
    ),
    "too-few-tokens": (
        lambda i: ["--data", str(i.tokens("short.bin", np.arange(10, dtype=np.uint16)))],
        "holds 10 tokens; seq_len 64",
    ),
    "missing-tokenizer": (
        lambda i: [
            "--data",
            str(i.file("d.txt", "hello " * 200)),
            "--set",
            f"data.tokenizer={i.tmp / 'tok'}",
        ],
        "tokenizer directory",
    ),
    # ---- model directory ----
    "model-not-a-directory": (lambda i: ["--model", str(i.file("weights.bin", b"x"))], "is not a directory"),
    "model-without-config": (lambda i: ["--model", str(i.hf_dir(config=None))], "has no config.json"),
    "model-config-not-json": (lambda i: ["--model", str(i.hf_dir("{oops"))], "is not valid JSON"),
    "model-wrong-type": (lambda i: ["--model", str(i.hf_dir({"model_type": "llama"}))], "model_type 'llama'"),
    "model-config-missing-key": (
        lambda i: ["--model", str(i.hf_dir(_tiny_config_without("hidden_size")))],
        "lacks the key 'hidden_size'",
    ),
    "model-config-wrong-type": (
        lambda i: ["--model", str(i.hf_dir({**_tiny_config_without("vocab_size"), "vocab_size": "big"}))],
        "is not a complete Qwen3-MoE config",
    ),
    "safetensors-bad-header": (
        lambda i: ["--model", str(i.hf_dir(safetensors=struct.pack("<Q", 24) + b"{this is no json header}"))],
        "not a valid safetensors file",
    ),
    "safetensors-truncated": (
        lambda i: ["--model", str(i.hf_dir(safetensors=_truncated_safetensors(i.tmp)))],
        "is truncated",
    ),
    "model-without-weights": (lambda i: ["--model", str(i.hf_dir())], "has no model.safetensors"),
    # ---- strategy plugins ----
    "plugin-fails-to-import": (
        lambda i: ["--strategy", str(i.file("broken_plugin.py", "import no_such_module_xyz\n"))],
        "failed to import (ModuleNotFoundError",
    ),
    "plugin-without-strategy": (
        lambda i: ["--strategy", str(i.file("empty_plugin.py", "VALUE = 1\n"))],
        "found 0 Strategy classes",
    ),
    "plugin-file-missing": (lambda i: ["--strategy", str(i.tmp / "absent_plugin.py")], "does not exist"),
    "module-class-missing": (
        lambda i: ["--strategy", "strategies.ddp:NoSuchClass"],
        "NoSuchClass (in strategies.ddp) is not a Strategy subclass",
    ),
    "module-class-not-strategy": (
        lambda i: ["--strategy", "moectl.config:RunConfig"],
        "RunConfig (in moectl.config) is not a Strategy subclass",
    ),
    "module-missing": (
        lambda i: ["--strategy", "no_such_module_xyz:Plugin"],
        "cannot import strategy module",
    ),
    # ---- run directory ----
    "run-dir-not-empty": (
        lambda i: ["--run-dir", str(i.file("used/notes.txt", "keep me").parent)],
        "already exists and is not empty",
    ),
    "run-dir-under-a-file": (
        lambda i: ["--run-dir", str(i.file("plain-file", "x") / "run")],
        "not a directory",
    ),
    "disk-too-small": (
        lambda i: ["--set", "model.num_experts=100000", "--set", "model.moe_intermediate_size=100000"],
        "GiB free but the final model and checkpoints need about",
    ),
    # ---- resume ----
    "resume-missing-dir": (lambda i: ["--resume", str(i.tmp / "absent-run")], "no such directory"),
    "resume-not-a-run": (
        lambda i: ["--resume", str(i.file("random/notes.txt", "x").parent)],
        "is not a moectl run directory",
    ),
    "resume-no-complete-checkpoint": (
        lambda i: ["--resume", str(i.run_copy(_drop_markers))],
        "no complete checkpoint",
    ),
    "resume-corrupt-metadata": (lambda i: ["--resume", str(i.run_copy(_garble_metadata))], "is corrupt"),
    "resume-truncated-shard": (
        lambda i: ["--resume", str(i.run_copy(_truncate_shard))],
        "missing or truncated",
    ),
    "resume-changes-seq-len": (
        lambda i: ["--resume", str(i.run_copy()), "--seq-len", "32", "--steps", "4"],
        "cannot change train.seq_len",
    ),
    "resume-changes-seed": (
        lambda i: ["--resume", str(i.run_copy()), "--seed", "3", "--steps", "4"],
        "cannot change train.seed (saved 0, given 3)",
    ),
    "resume-changes-global-batch": (
        lambda i: ["--resume", str(i.run_copy()), "--global-batch", "16", "--steps", "4"],
        "cannot change train.global_batch (saved 8, given 16)",
    ),
    "resume-changes-data": (
        lambda i: [
            "--resume",
            str(i.run_copy()),
            "--data",
            str(i.tokens("t.bin", np.arange(5000, dtype=np.uint16) % 128)),
            "--steps",
            "4",
        ],
        "cannot change data.source",
    ),
    "resume-changes-model": (
        lambda i: ["--resume", str(i.run_copy()), "--set", "model.num_experts=4", "--steps", "4"],
        "cannot change model.num_experts (saved 8, given 4)",
    ),
    "resume-finished-run": (lambda i: ["--resume", str(i.run_copy())], "already finished all 2 steps"),
    "resume-steps-below-checkpoint": (
        lambda i: ["--resume", str(i.run_copy()), "--steps", "1"],
        "beyond --steps 1",
    ),
    "resume-with-config": (lambda i: ["--resume", str(i.run_copy()), "-c", "tiny"], "drop --config"),
    "resume-other-run-dir": (
        lambda i: ["--resume", str(i.run_copy()), "--run-dir", str(i.tmp / "elsewhere")],
        "drop --run-dir",
    ),
    # ---- corpora ----
    "corpus-without-the-column": (
        lambda i: _corpus_flags(
            i, _parquet(i, "c/part-0.parquet", {"body": ["some text"] * 9, "id": [1] * 9})
        ),
        "has no column 'text' (its columns: body, id); set data.text_field",
    ),
    "corpus-empty": (
        lambda i: _corpus_flags(i, _parquet(i, "empty.parquet", {"text": []})),
        "holds no rows",
    ),
    "corpus-corrupt-parquet-shard": (
        lambda i: _corpus_flags(i, _corrupt_shard(i)),
        "part-00001.parquet is not a readable parquet file",
    ),
    "chat-without-an-assistant-turn": (
        lambda i: _corpus_flags(
            i,
            _chat_jsonl(i, [[{"role": "user", "content": "the cat sat"}]] * 5),
            *("--set", "data.format=chat"),
            tokenizer=_tokenizer(i),
        ),
        "no conversation has an assistant turn",
    ),
    "chat-tokenizer-without-a-template": (
        lambda i: _corpus_flags(
            i,
            _chat_jsonl(i, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the"}]]),
            *("--set", "data.format=chat"),
            tokenizer=_tokenizer(i, chat_template=False),
        ),
        "has none; give --set data.tokenizer=DIR of a tokenizer with a chat template",
    ),
    "validation-shorter-than-a-batch": (
        lambda i: _corpus_flags(
            i,
            _parquet(i, "train.parquet", {"text": ["the cat sat on the mat " * 20] * 30}),
            *("--val-data", str(_parquet(i, "val.parquet", {"text": ["the dog ran"] * 3}))),
            tokenizer=_tokenizer(i),
        ),
        "holds 0 row(s) of 65 tokens, fewer than one batch of 16",
    ),
    "eval-every-without-a-validation-set": (
        lambda i: ["--set", "train.eval_every=5"],
        "train.eval_every=5 evaluates a validation set: give --val-data SRC",
    ),
    "validation-set-with-synthetic-data": (
        lambda i: ["--set", "data.val_fraction=0.1"],
        "a validation set needs a corpus",
    ),
    "val-fraction-out-of-range": (
        lambda i: ["--set", "data.val_fraction=1.5"],
        "data.val_fraction must lie in",
    ),
    "flex-attention-on-the-cpu": (
        lambda i: ["--set", "train.attention=flex_attention"],
        "train.attention=flex_attention trains on GPUs only",
    ),
    "unknown-data-format": (lambda i: ["--set", "data.format=sft"], "data.format must be one of text, chat"),
    "resume-bad-new-layout": (
        lambda i: ["--resume", str(i.run_copy()), "--steps", "4", "--strategy", "single", "--nproc", "2"],
        "single runs on one process",
    ),
}


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint at step 2, to damage in copies."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    return train_run(run_dir, *TINY_RUN, "--checkpoint-every", "2", in_process=True)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size if path.is_file() else -1, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def _argv(case: str, inputs: Inputs) -> list[str]:
    args = CASES[case][0](inputs)
    if "--resume" not in args and "--run-dir" not in args:
        args = ["--run-dir", str(inputs.tmp / "run"), *args]
    return ["train", *args]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_process(case, tmp_path, checkpointed_run, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default runs/ directory would land here and be caught
    argv = _argv(case, Inputs(tmp_path, checkpointed_run))
    before = _snapshot(tmp_path)
    refused_in_process(argv, capsys, CASES[case][1])
    assert _snapshot(tmp_path) == before, "bad input left files behind or changed them"


# Run as an unprivileged user, since root writes into read-only directories anyway (CI runs as root).
# The child imports everything as root (a dry run walks the same code), then drops to `nobody`, so the
# check does not depend on who may read the checkout.
AS_NOBODY = """
import contextlib, io, os, sys
from moectl.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["train", "--dry-run", *sys.argv[4:]])  # the flags after --run-dir DIR
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
main(sys.argv[1:])
"""


def test_read_only_parent_is_refused():
    """A --run-dir under a directory nobody may write: exit 2, one line, nothing created."""
    base = Path(tempfile.mkdtemp(prefix="moectl-read-only-"))
    locked = base / "locked"
    try:
        base.chmod(0o755)  # the unprivileged user must reach `locked`
        locked.mkdir()
        locked.chmod(0o555)
        argv = ["train", "--run-dir", str(locked / "run"), *TINY_RUN]
        if os.geteuid() == 0:
            command = [sys.executable, "-c", AS_NOBODY, *argv]
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
        else:
            result = run_moectl_in_process(*argv)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write under {locked}"), lines
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("case", ["not-an-integer", "resume-corrupt-metadata"])
def test_bad_input_as_subprocess(case, tmp_path, checkpointed_run):
    """The real console entry point: exit code 2, one line, no traceback, nothing written (a click
    error, and a check deep in the resume path; the catalogue above covers every case in-process)."""
    argv = _argv(case, Inputs(tmp_path, checkpointed_run))
    before = _snapshot(tmp_path)
    result = run_moectl(*argv, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert CASES[case][1] in lines[0]
    assert _snapshot(tmp_path) == before
