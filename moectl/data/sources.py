"""Training data: the global batch of step s is a pure function of (seed, s).

Every rank can compute any step's batch without talking to the others; data-parallel rank r takes
rows [r·n, (r+1)·n) of it. That is what makes a run under any strategy see the same sequences as
the single-process reference, and what makes resume exact (the data position is just the step).

Sources: synthetic sequences; flat token files (`.bin`, `.npy`) read as random windows; and corpora
(`datasets.save_to_disk` directories, `.parquet`/`.jsonl`/`.txt` files or folders of them, or a token
cache made by `moectl data prepare`), tokenized once into a cache (moectl/data/cache.py) and packed into
rows by documents (moectl/data/packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moectl.config import DataConfig
from moectl.data.cache import BuildSettings, TokenCache, ensure_cache, is_corpus, is_token_cache
from moectl.data.packing import Batch, PackedDocuments, split_validation
from moectl.errors import UsageError
from moectl.io.paths import require_file

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

    def global_batch(self, step: int, num_sequences: int, seq_len: int) -> Batch:
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
        return Batch(tokens)


class TokenWindows:
    """Random windows of seq_len + 1 tokens from one flat token array (memory-mapped for files)."""

    def __init__(self, tokens: np.ndarray, seed: int, source: str):
        self.tokens = tokens
        self.seed = seed
        self.source = source

    def global_batch(self, step: int, num_sequences: int, seq_len: int) -> Batch:
        num_starts = len(self.tokens) - seq_len
        if num_starts <= 0:
            raise UsageError(f"{self.source} holds {len(self.tokens)} tokens; seq_len {seq_len} needs more")
        starts = torch.randint(
            num_starts, (num_sequences,), generator=_step_generator(self.seed, step)
        ).tolist()
        rows = [np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64) for start in starts]
        return Batch(torch.from_numpy(np.stack(rows)))


def load_tokens(cfg: DataConfig) -> tuple[np.ndarray, str]:
    """Open a flat token file (.bin or .npy); a missing or malformed file is a UsageError."""
    path = require_file(
        Path(cfg.source), "data file", "give --data a .bin/.npy token file, a corpus or 'synthetic'"
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
        else:
            raise UsageError(
                f"data file {path} has an unknown type; use .bin or .npy tokens, or a corpus (.parquet, "
                ".jsonl, .txt, a folder of them, a datasets.save_to_disk directory)"
            )
    except (ValueError, OSError, EOFError) as exc:  # numpy raises EOFError for a file with no header
        raise UsageError(
            f"cannot read data file {path} ({exc or type(exc).__name__}); check the file"
        ) from None
    return tokens, str(path)


def _check_token_range(tokens: np.ndarray, source: str, vocab_size: int) -> None:
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


def corpus_cache(cfg: DataConfig, source: str, what: str, note=print) -> TokenCache:
    """The token cache of a corpus (built on first use), opened."""
    import os

    settings = BuildSettings(
        source=source,
        tokenizer=cfg.tokenizer,
        format=cfg.format,
        column=cfg.messages_field if cfg.format == "chat" else cfg.text_field,
        num_proc=cfg.num_proc or len(os.sched_getaffinity(0)),
        what=what,
    )
    path = ensure_cache(settings, Path(cfg.cache_dir) if cfg.cache_dir else None, note)
    cache = TokenCache(path)
    if is_token_cache(Path(source)) and cache.meta.get("format") != cfg.format:
        raise UsageError(
            f"{what} {source} is a token cache of format {cache.meta.get('format')!r}; set "
            f"data.format={cache.meta.get('format')}"
        )
    return cache


@dataclass
class TrainingData:
    """What a run reads: its training rows and, when asked for, a validation set."""

    train: SyntheticData | TokenWindows | PackedDocuments
    validation: PackedDocuments | None = None

    def describe(self, global_batch: int) -> list[str]:
        """Lines for the console at the start of a run (corpora only)."""
        lines = []
        if isinstance(self.train, PackedDocuments):
            train = self.train
            rows = train.rows_per_epoch
            how = "packed" if train.packing else "one document per row"
            if train.document_masking:
                how += ", document masking"
            line = (
                f"data: {len(train.documents):,} documents, {train.num_tokens:,} tokens; {rows:,} rows of "
                f"{train.seq_len} per epoch ({how})"
            )
            if not train.packing:
                cut = int((train.lengths[train.documents] > train.seq_len + 1).sum())
                line += f"; {cut:,} document(s) longer than seq_len + 1 are cut there"
            lines.append(line)
        if self.validation is not None:
            batches = self.validation.rows_per_epoch // global_batch
            lines.append(
                f"validation: {len(self.validation.documents):,} documents, {batches:,} batch(es) of "
                f"{global_batch} rows"
            )
        return lines


def open_data(cfg: DataConfig, vocab_size: int, seed: int, seq_len: int, note=print) -> TrainingData:
    """The run's data (building token caches on first use)."""
    if cfg.source == "synthetic":
        if cfg.val_source or cfg.val_fraction:
            raise UsageError("a validation set needs a corpus: --data SRC (not synthetic) with it")
        return TrainingData(SyntheticData(vocab_size, seed, cfg.noise))
    if not (is_corpus(cfg.source) or is_token_cache(Path(cfg.source))):
        if cfg.val_source or cfg.val_fraction:
            raise UsageError(
                f"{cfg.source} is a flat token file without documents; a validation set needs a corpus"
            )
        tokens, source = load_tokens(cfg)
        _check_token_range(tokens, source, vocab_size)
        return TrainingData(TokenWindows(tokens, seed, source))
    if cfg.val_source and cfg.val_fraction:
        raise UsageError("give either --val-data or data.val_fraction, not both")
    cache = corpus_cache(cfg, cfg.source, "--data", note)
    if cache.meta["vocab_size"] > vocab_size:
        raise UsageError(
            f"the tokenizer has {cache.meta['vocab_size']:,} tokens but model.vocab_size is {vocab_size:,}; "
            "use a matching tokenizer or raise model.vocab_size"
        )
    documents = np.arange(cache.num_documents)
    validation = None
    options = {"packing": cfg.packing, "document_masking": cfg.document_masking}
    if cfg.val_fraction:
        documents, held_out = split_validation(cache.num_documents, cfg.val_fraction)
        if len(documents) == 0:
            raise UsageError(
                f"data.val_fraction={cfg.val_fraction} holds out all {cache.num_documents} documents; lower it"
            )
        validation = PackedDocuments(cache, held_out, seq_len, seed, shuffle=False, **options)
    elif cfg.val_source:
        val_cache = corpus_cache(cfg, cfg.val_source, "--val-data", note)
        if val_cache.meta["vocab_size"] > vocab_size:
            raise UsageError(
                f"--val-data's tokenizer has {val_cache.meta['vocab_size']:,} tokens but model.vocab_size is "
                f"{vocab_size:,}"
            )
        validation = PackedDocuments(
            val_cache, np.arange(val_cache.num_documents), seq_len, seed, shuffle=False, **options
        )
    return TrainingData(PackedDocuments(cache, documents, seq_len, seed, **options), validation)


def build_data(
    cfg: DataConfig, vocab_size: int, seed: int, seq_len: int = 64
) -> SyntheticData | TokenWindows | PackedDocuments:
    """The training rows of `open_data`."""
    return open_data(cfg, vocab_size, seed, seq_len).train


def check_data(cfg: DataConfig, vocab_size: int, seq_len: int, global_batch: int, note=print) -> TrainingData:
    """Everything about the data that can fail, checked in the parent before a run directory exists
    (token caches are built here, once, before any worker starts)."""
    data = open_data(cfg, vocab_size, 0, seq_len, note)
    train = data.train
    if isinstance(train, TokenWindows) and len(train.tokens) <= seq_len:
        raise UsageError(
            f"{train.source} holds {len(train.tokens)} tokens; seq_len {seq_len} needs at least {seq_len + 1}"
        )
    if isinstance(train, PackedDocuments) and train.rows_per_epoch == 0:
        raise UsageError(
            f"--data {cfg.source} holds {train.num_tokens} training tokens; seq_len {seq_len} needs at least "
            f"{seq_len + 1}"
        )
    if data.validation is not None and data.validation.rows_per_epoch < global_batch:
        val = data.validation
        what = f"--val-data {cfg.val_source}" if cfg.val_source else f"data.val_fraction={cfg.val_fraction}"
        raise UsageError(
            f"the validation set ({what}) holds {val.rows_per_epoch} row(s) of {seq_len + 1} tokens, fewer "
            f"than one batch of {global_batch}; give more validation data or a smaller --global-batch"
        )
    return data


def rank_slice(batch: Batch, dp_rank: int, dp_size: int) -> Batch:
    """Data-parallel rank r takes its contiguous block of the global batch."""
    per_rank = batch.num_rows // dp_size
    return batch.rows(dp_rank * per_rank, (dp_rank + 1) * per_rank)
