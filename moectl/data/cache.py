"""Tokenize once, share everywhere: a text or chat corpus becomes a token cache directory that every rank
and every later run memory-maps.

A cache directory holds `tokens.bin` (every document's token ids back to back, uint16 or uint32, each
document ended by EOS), `offsets.npy` (int64, document d is tokens[offsets[d]:offsets[d + 1]]),
`targets.bin` for chat data (uint8, 1 where the token is a training target: assistant turns) and
`meta.json`. Its name holds a key of the source's fingerprint (file names, sizes, modification times and
the first and last 64 KiB of each file), the tokenizer's (its files' contents) and the settings that
change the tokens (format, column): another tokenizer or an edited file is another cache.

Corpora are read through the `datasets` library (an optional extra, `pip install 'moectl[data]'`):
a `datasets.save_to_disk` directory, a `.parquet`, `.jsonl` or `.txt` file, or a directory of such shards
(read in name order). Its Arrow tables are memory-mapped, so a corpus larger than memory tokenizes in
constant memory. Tokenizing runs over a pool of processes (`data.num_proc`, default every core), one
process per cache builds it (a file lock; the others wait and then map it), into a temporary directory
renamed into place when complete, so no reader ever sees half a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moectl.errors import UsageError

CACHE_VERSION = 1
META_FILE = "meta.json"
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
TARGETS_FILE = "targets.bin"
#: file kinds a corpus folder may hold, by the `datasets` builder that reads them
SHARD_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
FORMATS = ("text", "chat")
_FINGERPRINT_BYTES = 64 * 1024


def default_cache_dir() -> Path:
    base = os.environ.get("MOECTL_DATA_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moectl" / "tokens"


def is_token_cache(path: Path) -> bool:
    meta = path / META_FILE
    if not (path.is_dir() and meta.is_file()):
        return False
    with contextlib.suppress(OSError, ValueError):
        return json.loads(meta.read_text()).get("kind") == "moectl-token-cache"
    return False


def is_saved_dataset(path: Path) -> bool:
    """A `datasets.save_to_disk` directory (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_corpus(source: str) -> bool:
    """A source `datasets` reads (not 'synthetic', not a flat .bin/.npy token file)."""
    path = Path(source)
    if source == "synthetic" or path.suffix in (".bin", ".npy"):
        return False
    return path.is_dir() or path.suffix in SHARD_BUILDERS


# ---- the source -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSource:
    """What `datasets` reads: a saved dataset directory, or shard files of one kind."""

    path: Path
    builder: str | None  # None: a save_to_disk directory
    files: tuple[Path, ...]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.relative_to(self.path) if self.path.is_dir() else file.name}".encode())
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_BYTES))
                if stat.st_size > _FINGERPRINT_BYTES:
                    handle.seek(max(_FINGERPRINT_BYTES, stat.st_size - _FINGERPRINT_BYTES))
                    digest.update(handle.read())
        return digest.hexdigest()


def find_source(source: str, what: str = "--data") -> CorpusSource:
    path = Path(source)
    if not path.exists():
        raise UsageError(
            f"{what} {path} does not exist; give a datasets.save_to_disk directory, a .parquet/.jsonl/.txt "
            "file or a folder of them, a .bin/.npy token file, or 'synthetic'"
        )
    if is_saved_dataset(path):
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file()))
        return CorpusSource(path, None, files)
    if path.is_file():
        if path.suffix not in SHARD_BUILDERS:
            raise UsageError(f"{what} {path} has an unknown type; use .parquet, .jsonl, .txt, .bin or .npy")
        return CorpusSource(path, SHARD_BUILDERS[path.suffix], (path,))
    shards = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SHARD_BUILDERS)
    if not shards:
        raise UsageError(
            f"{what} {path} holds no .parquet, .jsonl or .txt files and is not a datasets.save_to_disk "
            "directory"
        )
    builders = {SHARD_BUILDERS[p.suffix] for p in shards}
    if len(builders) > 1:
        kinds = ", ".join(sorted({p.suffix for p in shards}))
        raise UsageError(f"{what} {path} mixes shard kinds ({kinds}); keep one kind per folder")
    return CorpusSource(path, builders.pop(), tuple(shards))


def _quiet_datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UsageError(
            "reading a text or chat corpus needs the datasets package: pip install 'moectl[data]'"
        ) from None
    datasets.disable_progress_bars()
    # Its readers log a failure before raising it; the raised error becomes our one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    return datasets


def _check_parquet_shards(source: CorpusSource, what: str) -> None:
    """Read each parquet shard's footer (metadata only): a corrupt shard is named before any work."""
    import pyarrow.parquet as pq

    rows = 0
    for file in source.files:
        try:
            rows += pq.ParquetFile(file).metadata.num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not readable parquet"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(
                f"{what}: {file} is not a readable parquet file ({reason}); replace the shard"
            ) from None
    if rows == 0:
        raise UsageError(f"{what} {source.path} holds no rows; give a dataset with documents")


def open_dataset(source: CorpusSource, scratch: Path, num_proc: int, what: str) -> Any:
    """The corpus as one `datasets.Dataset` (memory-mapped Arrow; the conversion of shard files lands
    in `scratch`, which the caller deletes)."""
    datasets = _quiet_datasets()
    if source.builder == "parquet":
        _check_parquet_shards(source, what)
    try:
        if source.builder is None:
            loaded = datasets.load_from_disk(str(source.path))
            if isinstance(loaded, datasets.DatasetDict):
                splits = ", ".join(loaded)
                raise UsageError(
                    f"{what} {source.path} holds several splits ({splits}); give one of them, e.g. "
                    f"{source.path / next(iter(loaded))}"
                )
            return loaded
        options: dict[str, Any] = {"sample_by": "document"} if source.builder == "text" else {}
        return datasets.load_dataset(
            source.builder,
            data_files=[str(f) for f in source.files],
            split="train",
            cache_dir=str(scratch),
            num_proc=min(num_proc, len(source.files)) if len(source.files) > 1 else None,
            **options,
        )
    except UsageError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many kinds here; all mean "cannot read it"
        cause = exc.__cause__ or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        raise UsageError(f"cannot read {what} {source.path} ({reason}); check the files") from None


# ---- tokenizing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildSettings:
    source: str
    tokenizer: str | None
    format: str
    column: str
    num_proc: int
    what: str = "--data"

    def key(self, source_fingerprint: str, tokenizer_fingerprint: str) -> str:
        text = json.dumps(
            [CACHE_VERSION, source_fingerprint, tokenizer_fingerprint, self.format, self.column],
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:20]


_worker: dict[str, Any] = {}


def _init_worker(settings: BuildSettings, dataset: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from moectl.data.tokenizer import load_tokenizer

    _worker.update(settings=settings, dataset=dataset, tokenizer=load_tokenizer(settings.tokenizer))


def _tokenize_rows(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """Rows [start, end) of the dataset: (tokens, lengths, target flags or None, text bytes, documents
    without a target) — empty documents are left out and counted as lengths of 0."""
    from moectl.data.tokenizer import encode_texts, render_chat

    settings: BuildSettings = _worker["settings"]
    tokenizer = _worker["tokenizer"]
    start, end = bounds
    values = _worker["dataset"][start:end][settings.column]
    text_bytes, untargeted = 0, 0
    flags: list[list[int]] | None = None
    if settings.format == "text":
        for offset, value in enumerate(values):
            if not isinstance(value, str):
                raise UsageError(
                    f"{settings.what} row {start + offset}: column '{settings.column}' holds "
                    f"{type(value).__name__}, not text; set data.text_field to a text column"
                )
            text_bytes += len(value.encode("utf-8"))
        kept = [value for value in values if value]
        encoded = encode_texts(tokenizer, kept) if kept else []
        lengths = [
            len(ids) if value else 0 for value, ids in zip(values, _fill(values, encoded), strict=True)
        ]
    else:
        encoded, flags, lengths = [], [], []
        for offset, messages in enumerate(values):
            where = f"{settings.what} row {start + offset}"
            ids, target = render_chat(tokenizer, messages, where)
            text_bytes += sum(len(turn["content"].encode("utf-8")) for turn in messages)
            untargeted += not any(target)
            encoded.append(ids)
            flags.append(target)
            lengths.append(len(ids))
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint32) for ids in encoded] or [np.empty(0, np.uint32)])
    target_array = None
    if flags is not None:
        target_array = np.concatenate(
            [np.asarray(f, dtype=np.uint8) for f in flags] or [np.empty(0, np.uint8)]
        )
    return tokens, np.asarray(lengths, dtype=np.int64), target_array, text_bytes, untargeted


def _fill(values: list[Any], encoded: list[list[int]]) -> Iterator[list[int]]:
    """`encoded` (of the non-empty values) in the places of the non-empty values, [] elsewhere."""
    it = iter(encoded)
    for value in values:
        yield next(it) if value else []


def _progress(what: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=sys.stderr)
    return Progress(
        TextColumn(f"[bold]tokenizing {what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("documents · {task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # logs get the summary line at the end, not a bar's remains
    )


def _build(settings: BuildSettings, source: CorpusSource, work: Path, key: str) -> dict[str, Any]:
    """Tokenize the whole source into `work` (a fresh directory); returns the meta it wrote."""
    from moectl.data.tokenizer import check_chat_template, load_tokenizer

    tokenizer = load_tokenizer(settings.tokenizer)
    if settings.format == "chat":
        check_chat_template(tokenizer, settings.tokenizer)
    dataset = open_dataset(source, work / "hf", settings.num_proc, settings.what)
    if settings.column not in dataset.column_names:
        key_name = "data.messages_field" if settings.format == "chat" else "data.text_field"
        raise UsageError(
            f"{settings.what} {source.path} has no column '{settings.column}' (its columns: "
            f"{', '.join(dataset.column_names)}); set {key_name}"
        )
    dataset = dataset.select_columns([settings.column])  # workers read only the column they tokenize
    rows = dataset.num_rows
    if rows == 0:
        raise UsageError(f"{settings.what} {source.path} holds no rows; give a dataset with documents")
    token_dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    procs = max(1, min(settings.num_proc, rows))
    chunk = max(1, min(2000, rows // (procs * 8) or 1))
    bounds = [(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]
    lengths: list[np.ndarray] = []
    text_bytes = untargeted = num_tokens = 0
    started = time.perf_counter()
    context = multiprocessing.get_context("fork") if procs > 1 else None
    with (
        open(work / TOKENS_FILE, "wb") as tokens_out,
        open(work / TARGETS_FILE, "wb")
        if settings.format == "chat"
        else contextlib.nullcontext() as targets_out,
        _progress(settings.what) as progress,
        context.Pool(procs, _init_worker, (settings, dataset))
        if context
        else contextlib.nullcontext() as pool,
    ):
        task = progress.add_task("tokenize", total=rows, rate="")
        if pool is None:
            _init_worker(settings, dataset)
            results = map(_tokenize_rows, bounds)
        else:
            results = pool.imap(_tokenize_rows, bounds)
        for tokens, doc_lengths, targets, nbytes, missing in results:
            tokens.astype(token_dtype).tofile(tokens_out)
            if targets_out is not None:
                targets.tofile(targets_out)
            lengths.append(doc_lengths)
            text_bytes, untargeted, num_tokens = (
                text_bytes + nbytes,
                untargeted + missing,
                num_tokens + len(tokens),
            )
            rate = text_bytes / 1e6 / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=len(doc_lengths), rate=f"{rate:,.1f} MB/s")
    _worker.clear()
    seconds = time.perf_counter() - started
    all_lengths = np.concatenate(lengths)
    empty = int((all_lengths == 0).sum())
    kept_lengths = all_lengths[all_lengths > 0]
    if len(kept_lengths) == 0:
        raise UsageError(f"{settings.what} {source.path}: every document is empty; give a dataset with text")
    if settings.format == "chat" and untargeted == len(kept_lengths):
        raise UsageError(
            f"{settings.what} {source.path}: no conversation has an assistant turn, so nothing is a training "
            "target; chat fine-tuning learns the assistant turns"
        )
    offsets = np.zeros(len(kept_lengths) + 1, dtype=np.int64)
    np.cumsum(kept_lengths, out=offsets[1:])
    np.save(work / OFFSETS_FILE, offsets)
    meta = {
        "kind": "moectl-token-cache",
        "version": CACHE_VERSION,
        "key": key,
        "source": str(source.path.resolve()),
        "tokenizer": str(Path(settings.tokenizer).resolve()) if settings.tokenizer else None,
        "format": settings.format,
        "column": settings.column,
        "token_dtype": np.dtype(token_dtype).name,
        "vocab_size": len(tokenizer),
        "eos_token_id": int(tokenizer.eos_token_id),
        "documents": int(len(kept_lengths)),
        "empty_documents_left_out": empty,
        "documents_without_targets": int(untargeted),
        "tokens": int(num_tokens),
        "text_bytes": int(text_bytes),
        "build_seconds": seconds,
        "build_processes": procs,
    }
    (work / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(work / "hf", ignore_errors=True)
    return meta


def build_summary(meta: dict[str, Any], path: Path) -> str:
    mb = meta["text_bytes"] / 1e6
    seconds = max(meta["build_seconds"], 1e-9)
    line = (
        f"tokenized {meta['documents']:,} documents ({mb:,.1f} MB of text) into {meta['tokens']:,} tokens "
        f"in {seconds:.1f} s on {meta['build_processes']} process(es): {mb / seconds:,.2f} MB/s, "
        f"{mb / seconds / meta['build_processes']:,.2f} MB/s per process; cache {path}"
    )
    if meta["empty_documents_left_out"]:
        line += f"; {meta['empty_documents_left_out']:,} empty document(s) left out"
    if meta["documents_without_targets"]:
        line += (
            f"; {meta['documents_without_targets']:,} conversation(s) without an assistant turn (no targets)"
        )
    return line


def ensure_cache(settings: BuildSettings, cache_dir: Path | None = None, note=print) -> Path:
    """The token cache of `settings.source`, built if missing (one process at a time), mapped if there."""
    if settings.format not in FORMATS:
        raise UsageError(f"data.format must be one of {', '.join(FORMATS)}, got {settings.format!r}")
    source_path = Path(settings.source)
    if is_token_cache(source_path):
        return source_path
    source = find_source(settings.source, settings.what)
    from moectl.data.tokenizer import tokenizer_fingerprint

    key = settings.key(source.fingerprint(), tokenizer_fingerprint(settings.tokenizer))
    root = cache_dir or default_cache_dir()
    name = f"{source_path.name.replace('.', '_')[:40]}-{settings.format}-{key}"
    final = root / name
    # A shared, read-only cache folder serves caches built before; building one needs write access.
    if os.access(root, os.R_OK | os.X_OK) and is_token_cache(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the token cache folder {root} ({exc.strerror}); set data.cache_dir"
        ) from None
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(
            f"the token cache folder {root} is not writable by this user (permission denied); set "
            "data.cache_dir to a folder it can write"
        )
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        note(f"waiting for another process that is building the token cache {final}")
        lock.acquire()
    try:
        if is_token_cache(final):  # built by the process we waited for
            return final
        work = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            meta = _build(settings, source, work, key)
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        note(build_summary(meta, final))
        return final
    finally:
        lock.release()


def prepare_command(
    source: str,
    tokenizer: Path | None,
    format: str,
    text_field: str,
    messages_field: str,
    cache_dir: Path | None,
    num_proc: int,
) -> Path:
    """`moectl data prepare`: build (or find) the token cache of `source` and print where it is."""
    if num_proc < 0:
        raise UsageError(f"--num-proc must not be negative, got {num_proc}")
    settings = BuildSettings(
        source=source,
        tokenizer=str(tokenizer) if tokenizer else None,
        format=format,
        column=messages_field if format == "chat" else text_field,
        num_proc=num_proc or len(os.sched_getaffinity(0)),
        what="SRC",
    )
    said: list[str] = []

    def note(line: str) -> None:
        said.append(line)
        print(line, flush=True)

    path = ensure_cache(settings, cache_dir, note)
    if not any(line.startswith("tokenized ") for line in said):
        print(f"already tokenized: {path}")
    return path


# ---- reading --------------------------------------------------------------------------------------
class TokenCache:
    """A token cache directory, memory-mapped: `tokens`, `offsets`, `targets` (None for text)."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / META_FILE).read_text())
        self.tokens = np.memmap(path / TOKENS_FILE, dtype=self.meta["token_dtype"], mode="r")
        self.offsets = np.load(path / OFFSETS_FILE, mmap_mode="r")
        targets = path / TARGETS_FILE
        self.targets = np.memmap(targets, dtype=np.uint8, mode="r") if targets.is_file() else None
        if int(self.offsets[-1]) != len(self.tokens) or (
            self.targets is not None and len(self.targets) != len(self.tokens)
        ):
            raise UsageError(f"the token cache {path} is incomplete; delete it and run again")

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))


def write_cache(path: Path, documents: list[np.ndarray], eos_token_id: int, targets: list[np.ndarray] | None = None,
                vocab_size: int | None = None) -> Path:  # fmt: skip
    """A token cache from token arrays (each document ended by EOS already): for tests and benchmarks
    that make token data without a tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate(documents).astype(np.uint32)
    dtype = np.uint16 if tokens.max(initial=0) < 1 << 16 else np.uint32
    tokens.astype(dtype).tofile(path / TOKENS_FILE)
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in documents], out=offsets[1:])
    np.save(path / OFFSETS_FILE, offsets)
    if targets is not None:
        np.concatenate(targets).astype(np.uint8).tofile(path / TARGETS_FILE)
    meta = {
        "kind": "moectl-token-cache",
        "version": CACHE_VERSION,
        "format": "chat" if targets is not None else "text",
        "token_dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size if vocab_size is not None else int(tokens.max(initial=0)) + 1,
        "eos_token_id": eos_token_id,
        "documents": len(documents),
        "tokens": int(len(tokens)),
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path
