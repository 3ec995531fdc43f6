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

    def directory(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True)
        return path

    def weights(self, name: str = "a.safetensors") -> Path:
        """A small valid safetensors file (for compare-weights)."""
        from safetensors.torch import save_file

        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"model.embed_tokens.weight": torch.ones(4, 4)}, str(path))
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
    # ---- a strategy's own options (parallel.<key>) ----
    "option-of-another-strategy": (
        lambda i: ["--strategy", "ddp", "--nproc", "2", "--set", "parallel.fsdp=true"],
        "parallel.fsdp belongs to --strategy ep, not ddp; drop it",
    ),
    "yaml-option-of-another-strategy": (
        lambda i: [
            YAML,
            str(i.file("o.yaml", "parallel:\n  strategy: fsdp\n  mixed_dp: ddp\n")),
            "--nproc",
            "2",
        ],
        "parallel.mixed_dp belongs to --strategy mixed, not fsdp; drop it",
    ),
    "unknown-parallel-key": (
        lambda i: ["--strategy", "ep", "--set", "parallel.ep_chunk=2"],
        "unknown key 'parallel.ep_chunk'; known keys in 'parallel': strategy,",
    ),
    "ep-rows-factor-below-one": (
        lambda i: ["--strategy", "ep", "--set", "parallel.ep_max_rows_factor=0.5"],
        "parallel.ep_max_rows_factor must be positive and at least 1",
    ),
    "mixed-dp-unknown": (
        lambda i: [
            "--strategy",
            "mixed",
            "--tp-size",
            "2",
            "--nproc",
            "2",
            "--set",
            "parallel.mixed_dp=zero",
        ],
        "parallel.mixed_dp must be one of fsdp, ddp, got 'zero'",
    ),
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
    "model-not-a-directory": (
        lambda i: ["--model", str(i.file("weights.bin", b"x"))],
        "weights.bin is a file, not a directory; give a local HF checkpoint directory",
    ),
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
        lambda i: ["--set", "model.num_experts=60000", "--set", "model.moe_intermediate_size=100000"],
        "GiB free but the final model and checkpoints need about",
    ),
    # ---- resume ----
    "resume-missing-dir": (lambda i: ["--resume", str(i.tmp / "absent-run")], "absent-run does not exist"),
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
    "resume-option-of-another-strategy": (
        lambda i: ["--resume", str(i.run_copy()), "--steps", "4", "--set", "parallel.ep_chunks=2"],
        "parallel.ep_chunks belongs to --strategy ep, not single; drop it",
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
    # ---- numbers: bounds, overflow, NaN, infinity (every key is also covered by the generated tables below)
    "steps-overflow": (
        lambda i: ["--steps", "99999999999999999999"],
        "train.steps must be at most 1,000,000,000",
    ),
    "steps-overflow-dry-run": (
        lambda i: ["--dry-run", "--steps", "99999999999999999999"],
        "train.steps must be at most 1,000,000,000",
    ),
    "seed-negative": (lambda i: ["--seed", "-1"], "train.seed must not be negative, got -1"),
    "seed-above-64-bits": (
        lambda i: ["--seed", str(2**64)],
        "train.seed must be at most 18,446,744,073,709,551,615 (torch seeds are unsigned 64-bit numbers)",
    ),
    "nproc-absurd": (lambda i: ["--dry-run", "--nproc", "100000"], "parallel.nproc must be at most 1,024"),
    "tokens-per-step-too-many": (
        lambda i: ["--global-batch", str(2**21), "--seq-len", "256", "--micro-batch", "2"],
        "= 536,870,912 tokens per step is above 268,435,456",
    ),
    "steps-not-a-whole-number": (lambda i: ["--set", "train.steps=1.5"], "train.steps must be an integer"),
    "lr-nan": (lambda i: ["--lr", "nan"], "train.lr must be a finite number"),
    "lr-infinite": (lambda i: ["--lr", "inf"], "train.lr must be a finite number"),
    "momentum-one": (lambda i: ["--set", "train.momentum=1"], "train.momentum must lie in [0, 1)"),
    "intermediate-size-zero": (
        lambda i: ["--set", "model.intermediate_size=0"],
        "model.intermediate_size must be positive",
    ),
    "max-positions-zero": (
        lambda i: ["--set", "model.max_position_embeddings=0"],
        "model.max_position_embeddings must be positive",
    ),
    # ---- multi-node rendezvous ----
    "endpoint-without-port": (
        lambda i: ["--nnodes", "2", "--rdzv-endpoint", "localhost"],
        "--rdzv-endpoint 'localhost' needs HOST:PORT",
    ),
    "endpoint-ipv6-without-port": (
        lambda i: ["--nnodes", "2", "--rdzv-endpoint", "[::1]"],
        "--rdzv-endpoint '[::1]' needs HOST:PORT",
    ),
    "endpoint-bad-port": (
        lambda i: ["--nnodes", "2", "--rdzv-endpoint", "node0:http"],
        "the port must be a number from 1 to 65535, got 'http'",
    ),
    "endpoint-port-out-of-range": (
        lambda i: ["--set", "parallel.rdzv_endpoint=node0:70000"],
        "the port must be a number from 1 to 65535, got '70000'",
    ),
    "nodes-without-nproc": (
        lambda i: ["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29999"],
        "the degrees give 1 process(es) in all, which do not split evenly over the nodes; give --nproc N",
    ),
    # ---- paths: missing, a directory for a file, a file for a directory, not text ----
    "config-is-a-directory": (
        lambda i: ["-c", str(i.directory("configs.yaml"))],
        "configs.yaml is a directory, not a file",
    ),
    "config-not-text": (lambda i: ["-c", str(i.file("binary.yaml", b"\xff\xfe\x00\x81"))], "is not text"),
    "data-is-a-directory": (
        lambda i: ["--data", str(i.directory("shards"))],
        "--data {tmp}/shards holds no .parquet, .jsonl or .txt files and is not a datasets.save_to_disk directory",
    ),
    "model-missing": (lambda i: ["--model", str(i.tmp / "absent-model")], "absent-model does not exist"),
    "model-config-is-a-directory": (
        lambda i: ["--model", str((i.directory("hf/config.json")).parent)],
        "config.json is a directory, not a file",
    ),
    "tokenizer-is-a-file": (
        lambda i: [
            "--data",
            str(i.file("d.txt", "hello " * 200)),
            "--set",
            f"data.tokenizer={i.file('tok.json', '{}')}",
        ],  # fmt: skip
        "tok.json is a file, not a directory",
    ),
    "run-dir-is-a-file": (
        lambda i: ["--run-dir", str(i.file("taken", "x"))],
        "--run-dir {tmp}/taken is a file; give a directory",
    ),
    "resume-a-file": (
        lambda i: ["--resume", str(i.file("run.txt", "x"))],
        "run.txt is a file, not a directory",
    ),
    "plugin-is-a-directory": (
        lambda i: ["--strategy", str(i.directory("plugin.py"))],
        "plugin.py is a directory, not a file",
    ),
}

# The numeric keys, generated from the config's own types and bounds: every integer key one above its
# bound, every float key NaN, infinite and below its range.
FLOAT_KEYS_BELOW = {  # key -> (a value below the key's range, the message)
    "model.rope_theta": ("0", "model.rope_theta must be positive"),
    "model.rms_norm_eps": ("0", "model.rms_norm_eps must be positive"),
    "model.initializer_range": ("-0.1", "model.initializer_range must not be negative"),
    "data.noise": ("-0.1", "data.noise must not be negative"),
    "train.lr": ("-0.1", "train.lr must be positive"),
    "train.weight_decay": ("-0.1", "train.weight_decay must not be negative"),
    "train.momentum": ("-0.1", "train.momentum must not be negative"),
    "train.min_lr_ratio": ("-0.1", "train.min_lr_ratio must lie in [0, 1]"),
    "train.max_grad_norm": ("-0.1", "train.max_grad_norm must not be negative"),
    "train.aux_loss_coef": ("-0.1", "train.aux_loss_coef must not be negative"),
    "train.router_bias_update": ("-0.1", "train.router_bias_update must not be negative"),
    "train.peak_tflops": ("0", "train.peak_tflops must be positive"),
    "data.val_fraction": ("-0.1", "data.val_fraction must lie in"),
}


def _float_keys() -> list[str]:
    import dataclasses
    import typing

    from moectl.config import SECTIONS, RunConfig

    keys = []
    for section in SECTIONS:
        section_cls = type(getattr(RunConfig(), section))
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            if float in (hints[f.name], *typing.get_args(hints[f.name])):
                keys.append(f"{section}.{f.name}")
    return keys


def _generated_cases() -> dict[str, tuple[Case, str]]:
    from moectl.config import INT_BOUNDS

    cases: dict[str, tuple[Case, str]] = {}
    for key, (bound, _) in INT_BOUNDS.items():
        cases[f"{key}-above-bound"] = (
            lambda i, key=key, bound=bound: ["--set", f"{key}={bound + 1}"],
            f"{key} must be at most {bound:,}",
        )
    for key in _float_keys():
        for value in ("nan", "inf", "-inf"):
            cases[f"{key}-{value}"] = (lambda i, key=key, value=value: ["--set", f"{key}={value}"],
                                       f"{key} must be a finite number")  # fmt: skip
        if key in FLOAT_KEYS_BELOW:
            below, message = FLOAT_KEYS_BELOW[key]
            cases[f"{key}-below-range"] = (
                lambda i, key=key, below=below: ["--set", f"{key}={below}"],
                message,
            )
    return cases


CASES.update(_generated_cases())


def test_every_float_key_has_a_range_case():
    """A float key added to the config gets a below-its-range case here (ParallelConfig's ep_max_rows_factor
    is the ep strategy's option)."""
    assert set(_float_keys()) - set(FLOAT_KEYS_BELOW) <= {"parallel.ep_max_rows_factor"}


# Cases of the other commands: (full argv, a fragment of the one line). `{tmp}` in the fragment is the
# case's directory.
COMMAND_CASES: dict[str, tuple[Case, str]] = {
    # ---- plan ----
    "plan-gpu-mem-nan": (
        lambda i: ["plan", "--gpu-mem", "nan"],
        "--gpu-mem must be a finite number of GiB, got nan",
    ),
    "plan-gpu-mem-inf": (lambda i: ["plan", "--gpu-mem", "inf"], "--gpu-mem must be a finite number of GiB"),
    "plan-gpu-mem-negative": (
        lambda i: ["plan", "--gpu-mem", "-1"],
        "leaves nothing beyond the 6 GiB headroom",
    ),
    "plan-gpu-mem-huge": (lambda i: ["plan", "--gpu-mem", "1e12"], "--gpu-mem must be at most 100,000 GiB"),
    "plan-gpus-zero": (lambda i: ["plan", "--gpus", "0"], "--gpus must be from 1 to 1,024"),
    "plan-gpus-absurd": (
        lambda i: ["plan", "--gpus", "99999999999999999999"],
        "--gpus must be from 1 to 1,024",
    ),
    "plan-nodes-absurd": (lambda i: ["plan", "--nodes", "100000"], "--nodes must be from 1 to 65,536"),
    "plan-seq-len-zero": (lambda i: ["plan", "--seq-len", "0"], "train.seq_len must be positive"),
    "plan-global-batch-overflow": (
        lambda i: ["plan", "--global-batch", "99999999999999999999"],
        "train.global_batch must be at most 268,435,456",
    ),
    "plan-config-is-a-directory": (
        lambda i: ["plan", "-c", str(i.directory("presets"))],
        "config file {tmp}/presets is a directory, not a file",
    ),
    # ---- compare-weights ----
    "compare-rtol-nan": (
        lambda i: ["compare-weights", str(i.weights()), str(i.weights("b.safetensors")), "--rtol", "nan"],
        "--rtol must be a finite number >= 0, got nan",
    ),
    "compare-rtol-inf": (
        lambda i: ["compare-weights", str(i.weights()), str(i.weights("b.safetensors")), "--rtol", "inf"],
        "--rtol must be a finite number >= 0, got inf",
    ),
    "compare-rtol-negative": (
        lambda i: ["compare-weights", str(i.weights()), str(i.weights("b.safetensors")), "--rtol", "-1"],
        "--rtol must be a finite number >= 0",
    ),
    "compare-per-tensor-rtol-nan": (
        lambda i: [
            "compare-weights",
            str(i.weights()),
            str(i.weights("b.safetensors")),
            "--per-tensor-rtol",
            "nan",
        ],  # fmt: skip
        "--per-tensor-rtol must be a finite number >= 0",
    ),
    "compare-top-negative": (
        lambda i: ["compare-weights", str(i.weights()), str(i.weights("b.safetensors")), "--top", "-1"],
        "--top must be from 0 to 1,000,000",
    ),
    "compare-top-absurd": (
        lambda i: [
            "compare-weights",
            str(i.weights()),
            str(i.weights("b.safetensors")),
            "--top",
            "99999999999999999999",
        ],  # fmt: skip
        "--top must be from 0 to 1,000,000",
    ),
    "compare-a-missing": (
        lambda i: ["compare-weights", str(i.tmp / "absent.safetensors"), str(i.weights("b.safetensors"))],
        "absent.safetensors does not exist",
    ),
    "compare-b-directory-without-weights": (
        lambda i: ["compare-weights", str(i.weights()), str(i.directory("empty-model"))],
        "empty-model has no model.safetensors",
    ),
    "compare-a-not-safetensors": (
        lambda i: ["compare-weights", str(i.file("notes.safetensors", "just text")), str(i.weights())],
        "notes.safetensors",
    ),
    "compare-json-is-a-directory": (
        lambda i: [
            "compare-weights",
            str(i.weights()),
            str(i.weights("b.safetensors")),
            "--json",
            str(i.directory("reports")),
        ],  # fmt: skip
        "reports is a directory; pass a file path",
    ),
    "compare-json-parent-missing": (
        lambda i: [
            "compare-weights",
            str(i.weights()),
            str(i.weights("b.safetensors")),
            "--json",
            str(i.tmp / "no" / "r.json"),
        ],  # fmt: skip
        "directory {tmp}/no does not exist; create it first",
    ),
    "compare-json-parent-is-a-file": (
        lambda i: [
            "compare-weights",
            str(i.weights()),
            str(i.weights("b.safetensors")),
            "--json",
            str(i.file("plain", "x") / "r.json"),
        ],  # fmt: skip
        "{tmp}/plain is a file, not a directory",
    ),
    # ---- bench (nothing runs: every check comes first) ----
    "bench-nproc-zero": (lambda i: ["bench", "--nproc", "0"], "--nproc must be from 1 to 1,024, got 0"),
    "bench-nproc-absurd": (lambda i: ["bench", "--nproc", "5000"], "--nproc must be from 1 to 1,024"),
    "bench-rtol-nan": (lambda i: ["bench", "--rtol", "nan"], "--rtol must be a finite number above 0"),
    "bench-rtol-inf": (lambda i: ["bench", "--rtol", "inf"], "--rtol must be a finite number above 0"),
    "bench-rtol-zero": (lambda i: ["bench", "--rtol", "0"], "--rtol must be a finite number above 0"),
    "bench-run-timeout-nan": (lambda i: ["bench", "--run-timeout", "nan"], "--run-timeout must be above 0"),
    "bench-run-timeout-inf": (lambda i: ["bench", "--run-timeout", "inf"], "at most 604,800 seconds"),
    "bench-run-timeout-negative": (
        lambda i: ["bench", "--run-timeout", "-5"],
        "--run-timeout must be above 0",
    ),
    "bench-steps-overflow": (
        lambda i: ["bench", "--steps", "99999999999999999999"],
        "train.steps must be at most 1,000,000,000",
    ),
    "bench-warmup-negative": (lambda i: ["bench", "--warmup", "-1"], "train.timing_warmup_steps must not be"),
    "bench-lr-nan": (lambda i: ["bench", "--lr", "nan"], "train.lr must be a finite number"),
    "bench-out-is-a-file": (
        lambda i: ["bench", "--out", str(i.file("results", "x"))],
        "--out {tmp}/results is a file",
    ),
    "bench-out-not-empty": (
        lambda i: ["bench", "--out", str(i.file("used/keep.txt", "x").parent)],
        "--out {tmp}/used already exists and is not empty",
    ),
    "bench-out-under-a-file": (
        lambda i: ["bench", "--out", str(i.file("flat", "x") / "out")],
        "{tmp}/flat is not a directory",
    ),
    "bench-plugin-missing": (
        lambda i: ["bench", "--strategies", f"single,{i.tmp / 'absent.py'}"],
        "absent.py does not exist",
    ),
    "bench-plugin-is-a-directory": (
        lambda i: ["bench", "--strategies", f"single,{i.directory('layout.py')}"],
        "layout.py is a directory, not a file",
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
    refused_in_process(argv, capsys, CASES[case][1].format(tmp=tmp_path))
    assert _snapshot(tmp_path) == before, "bad input left files behind or changed them"


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_bad_input_of_plan_compare_and_bench(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default runs/ directory would land here and be caught
    inputs = Inputs(tmp_path, Path("/nonexistent"))
    argv = COMMAND_CASES[case][0](inputs)
    if argv[0] == "bench" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "bench-out")]
    before = _snapshot(tmp_path)
    refused_in_process(argv, capsys, COMMAND_CASES[case][1].format(tmp=tmp_path))
    assert _snapshot(tmp_path) == before, "bad input left files behind or changed them"


def test_a_file_plugin_run_is_named_after_its_file(tmp_path, monkeypatch):
    """The default run directory of `--strategy path/to/plugin.py` ends in the file's stem."""
    from moectl.run.prepare import prepare
    from moectl.run.start import _prepare_run_dir

    monkeypatch.chdir(tmp_path)
    plugin = REPO / "examples" / "naive_ep" / "naive_ep.py"
    plan, run_dir = prepare(None, {"parallel": {"strategy": str(plugin)}, "train": {"steps": 1}})
    target = _prepare_run_dir(plan, run_dir)
    assert target.parent == Path("runs") and target.name.endswith("-naive_ep"), target
    assert (target / "config.yaml").is_file()


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


# Several refusals in one process as `nobody` (imports done first, as root): (exit code, stderr) per argv.
# The first argvs run as root, to import what the others need (the interpreter's own library may not be
# readable to nobody).
UNREADABLE_AS_NOBODY = """
import contextlib, io, json, os, sys
from moectl.cli import main

def run(argv):
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, stderr.getvalue()

for argv in json.loads(sys.argv[1]):
    run(argv)
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
print(json.dumps([run(argv) for argv in json.loads(sys.argv[2])]))
"""


def test_unreadable_and_unwritable_paths_are_refused():
    """Every path flag given a path its user may not read (or, for outputs, write under): one line naming
    it, exit 2, nothing written. Run as `nobody` where the suite runs as root (root reads anything)."""
    base = Path(tempfile.mkdtemp(prefix="moectl-unreadable-"))
    try:
        base.chmod(0o755)
        inputs = Inputs(base, Path("/nonexistent"))
        model_dir = inputs.hf_dir()
        hidden_config = inputs.directory("hf2")
        (hidden_config / "config.json").write_text((model_dir / "config.json").read_text())
        run = inputs.directory("old-run")
        (run / "config.yaml").write_text("train:\n  steps: 2\n")
        locked = inputs.directory("locked")
        paths = {
            "config": inputs.file("secret.yaml", "train:\n  steps: 2\n"),
            "data": inputs.tokens("tokens.bin", np.arange(5000, dtype=np.uint16) % 128),
            "model": model_dir,
            "model-config": hidden_config / "config.json",
            "resume": run,
            "plugin": inputs.file("secret_plugin.py", "VALUE = 1\n"),
            "weights": inputs.weights("secret.safetensors"),
            "tokenizer": inputs.directory("tokenizer"),
            "text": inputs.file("d.txt", "hello " * 200),
        }
        other = inputs.weights("b.safetensors")
        other.chmod(0o644)
        cases = [
            (["train", "--dry-run", "-c", str(paths["config"])], "config file {config} is not readable"),
            (["plan", "-c", str(paths["config"])], "config file {config} is not readable"),
            (["train", "--dry-run", "--data", str(paths["data"])], "data file {data} is not readable"),
            (["train", "--dry-run", "--model", str(paths["model"])], "'--model': path '{model}' is not readable"),
            (["train", "--dry-run", "--model", str(hidden_config)], "{model-config} is not readable"),
            (["train", "--resume", str(paths["resume"])], "'--resume': path '{resume}' is not readable"),
            (["train", "--dry-run", "--strategy", str(paths["plugin"])], "strategy file {plugin} is not readable"),
            (["train", "--dry-run", "--data", str(paths["text"]), "--set", f"data.tokenizer={paths['tokenizer']}"],
             "tokenizer directory {tokenizer} is not readable"),
            (["compare-weights", str(paths["weights"]), str(other)], "'A': path '{weights}' is not readable"),
            (["compare-weights", str(other), str(other), "--json", str(locked / "r.json")],
             "cannot write under {locked}"),
            (["bench", "--out", str(locked / "out")], "cannot write under {locked}"),
            (["train", "--run-dir", str(locked / "run"), *TINY_RUN], "cannot write under {locked}"),
        ]  # fmt: skip
        warm_up = [
            [
                "train",
                "--dry-run",
                "--data",
                str(paths["text"]),
                "--strategy",
                str(REPO / "strategies" / "ddp.py"),
            ],
            ["train", "--dry-run", "--model", str(model_dir), "--data", str(paths["data"])],
            ["plan"],
            ["compare-weights", str(other), str(other)],
            ["bench", "--nproc", "0"],
            ["train", "--resume", str(base / "absent")],
        ]  # run as root before the others (root reads the locked paths): none of them writes
        names = {key: str(value) for key, value in paths.items()} | {"locked": str(locked)}
        for path in paths.values():
            path.chmod(0)
        (paths["text"]).chmod(0o644)
        locked.chmod(0o555)
        before = _snapshot(base)
        argvs = [argv for argv, _ in cases]
        if os.geteuid() == 0:
            command = [sys.executable, "-c", UNREADABLE_AS_NOBODY, json.dumps(warm_up), json.dumps(argvs)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            results = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            results = []
            for argv in argvs:
                result = run_moectl_in_process(*argv)
                results.append((result.returncode, result.stderr))
        failures = []
        for (argv, expected), (code, stderr) in zip(cases, results, strict=True):
            lines = stderr.strip().splitlines()
            if not (code == 2 and len(lines) == 1 and expected.format(**names) in lines[0]):
                failures.append((argv, code, stderr))
        assert failures == [], "\n".join(map(repr, failures))
        assert _snapshot(base) == before
    finally:
        for path in base.rglob("*"):
            path.chmod(0o755)
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


def test_a_run_saved_when_every_strategys_keys_were_written_still_resumes(tmp_path, checkpointed_run):
    """config.yaml used to list every strategy's keys at their defaults: a resume drops those the run's
    strategy does not own, and still refuses one set to anything else."""
    import yaml

    from moectl.errors import UsageError
    from moectl.run.prepare import check_run, resolve_resume

    old_keys = {"fsdp": False, "mixed_dp": "fsdp", "ep_chunks": 1, "ep_max_rows_factor": None}
    run = Inputs(tmp_path, checkpointed_run).run_copy()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["parallel"].update(old_keys)
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    cfg, info = resolve_resume(run, {"train": {"steps": 4}})
    assert cfg.parallel.options == {} and check_run(cfg, info).strategy.name == "single"
    saved["parallel"]["mixed_dp"] = "ddp"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(UsageError, match="parallel.mixed_dp belongs to --strategy mixed, not single"):
        check_run(*resolve_resume(run, {"train": {"steps": 4}}))
