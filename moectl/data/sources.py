"""Training data: the global batch of step s is a pure function of (seed, s).

Every rank can compute any step's batch without talking to the others; data-parallel rank r takes
rows [r·n, (r+1)·n) of it. That is what makes a run under any strategy see the same sequences as
the single-process reference, and what makes resume exact (the data position is just the step).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moectl.config import DataConfig
from moectl.errors import UsageError
from moectl.io.paths import require_directory, require_file

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".bin", ".npy")


def _step_generator(seed: int, step: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step * 7919 + 17) % 2**64)  # torch seeds are unsigned 64-bit
    return generator


class SyntheticData:
    """Learnable sequences: each token is a fixed random successor of the previous one (a random
    permutation drawn from the seed), with an optional share of noise. A model learns the bigram
    table quickly, so the loss visibly falls within a few dozen steps."""

    def __init__(self, vocab_size: int, seed: int, noise: float = 0.0):
        self.vocab_size = vocab_size
        self.noise = noise
        self.seed = seed
        self.successor = torch.randperm(vocab_size, generator=_step_generator(seed, -1))

    def global_batch(self, step: int, num_sequences: int, seq_len: int) -> torch.Tensor:
        generator = _step_generator(self.seed, step)
        tokens = torch.empty(num_sequences, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab_size, (num_sequences,), generator=generator)
        noise_mask = torch.rand(num_sequences, seq_len + 1, generator=generator) < self.noise
        noise_tokens = torch.randint(self.vocab_size, (num_sequences, seq_len + 1), generator=generator)
        for position in range(1, seq_len + 1):
            tokens[:, position] = self.successor[tokens[:, position - 1]]
            tokens[:, position] = torch.where(
                noise_mask[:, position], noise_tokens[:, position], tokens[:, position]
            )
        return tokens


class TokenWindows:
    """Random windows of seq_len + 1 tokens from one flat token array (memory-mapped for files)."""

    def __init__(self, tokens: np.ndarray, seed: int, source: str):
        self.tokens = tokens
        self.seed = seed
        self.source = source

    def global_batch(self, step: int, num_sequences: int, seq_len: int) -> torch.Tensor:
        num_starts = len(self.tokens) - seq_len
        if num_starts <= 0:
            raise UsageError(f"{self.source} holds {len(self.tokens)} tokens; seq_len {seq_len} needs more")
        starts = torch.randint(
            num_starts, (num_sequences,), generator=_step_generator(self.seed, step)
        ).tolist()
        rows = [np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64) for start in starts]
        return torch.from_numpy(np.stack(rows))


def _load_text(path: Path, tokenizer_dir: str | None) -> np.ndarray:
    if path.suffix == ".jsonl":
        texts = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(
                    f'{path} line {line_number} is not JSON; each line needs {{"text": ...}}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"{path} line {line_number} has no string field 'text'")
            texts.append(record["text"])
    else:
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    if tokenizer_dir is None:
        joined = "\n".join(texts).encode("utf-8")
        return np.frombuffer(joined, dtype=np.uint8).astype(np.int64)
    tokenizer_path = require_directory(
        Path(tokenizer_dir), "tokenizer directory", "give data.tokenizer a local tokenizer directory"
    )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here; all mean "not a usable tokenizer"
        raise UsageError(
            f"cannot load a tokenizer from {tokenizer_path} ({type(exc).__name__}); check the directory"
        ) from None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


def load_tokens(cfg: DataConfig) -> tuple[np.ndarray, str]:
    """Open a token or text file; a missing or malformed file is a UsageError."""
    path = require_file(
        Path(cfg.source), "data file", "give --data a .bin/.npy/.txt/.jsonl file or 'synthetic'"
    )
    try:
        if path.suffix == ".bin":
            itemsize = np.dtype(cfg.token_dtype).itemsize
            if path.stat().st_size % itemsize:
                raise UsageError(
                    f"{path} size is not a multiple of {itemsize} bytes; check --set data.token_dtype"
                )
            tokens = np.memmap(path, dtype=cfg.token_dtype, mode="r")
        elif path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise UsageError(
                    f"{path} must hold a 1-D integer token array, got {tokens.dtype} {tokens.shape}"
                )
        elif path.suffix in TEXT_SUFFIXES:
            tokens = _load_text(path, cfg.tokenizer)
        else:
            raise UsageError(f"data file {path} has an unknown type; use .bin, .npy, .txt or .jsonl")
    except (ValueError, OSError, EOFError) as exc:  # numpy raises EOFError for a file with no header
        raise UsageError(
            f"cannot read data file {path} ({exc or type(exc).__name__}); check the file"
        ) from None
    return tokens, str(path)


def build_data(cfg: DataConfig, vocab_size: int, seed: int) -> SyntheticData | TokenWindows:
    if cfg.source == "synthetic":
        return SyntheticData(vocab_size, seed, cfg.noise)
    tokens, source = load_tokens(cfg)
    if len(tokens):
        head = tokens[:10_000_000]
        highest, lowest = int(head.max()), int(head.min())
        if highest >= vocab_size:
            raise UsageError(
                f"{source} holds token id {highest} but the model's vocab_size is {vocab_size}; "
                "use a matching tokenizer or raise model.vocab_size"
            )
        if lowest < 0:
            raise UsageError(f"{source} holds a negative token id ({lowest}); token ids start at 0")
    return TokenWindows(tokens, seed, source)


def check_data(cfg: DataConfig, vocab_size: int, seq_len: int) -> None:
    """Everything about the data that can fail, checked in the parent before a run directory exists."""
    data = build_data(cfg, vocab_size, 0)
    if isinstance(data, TokenWindows) and len(data.tokens) <= seq_len:
        raise UsageError(
            f"{data.source} holds {len(data.tokens)} tokens; seq_len {seq_len} needs at least {seq_len + 1}"
        )


def rank_slice(batch: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Data-parallel rank r takes its contiguous block of the global batch."""
    per_rank = batch.shape[0] // dp_size
    return batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
