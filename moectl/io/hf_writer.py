"""Writing an HF model directory one tensor at a time: what `save_pretrained` writes, never the whole model
in memory.

`save_pretrained` needs every tensor of a shard in one dict (safetensors writes a file from a dict), and
torch.distributed.checkpoint's `HuggingFaceStorageWriter` needs the whole state dict in one `dcp.save`.
Neither streams, so this module writes the safetensors files itself. The format is small: an 8-byte
little-endian header length, a JSON header (padded with spaces to 8 bytes) giving each tensor's dtype,
shape and byte range, then the raw bytes. Every shape is known before the first tensor arrives (from
the model's config), so the headers are written first and each tensor goes straight to its byte range,
in whatever order the tensors come. The rest is transformers' and huggingface_hub's own: the shard split
(`split_torch_state_dict_into_shards`, as save_pretrained uses), config.json, generation_config.json, the
tokenizer's `save_pretrained`.

On disk the experts are per-expert keys (`mlp.experts.N.gate_proj.weight` …, moectl.io.hf_layout), the
keys save_pretrained writes and published Qwen3-MoE checkpoints use; within a file the tensors are
ordered by name, as safetensors orders them, so a one-file model is byte for byte what save_pretrained
writes. Everything is written into a staging directory beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from moectl.io.hf_layout import split_expert_tensors

#: save_pretrained's default shard size (transformers 5)
DEFAULT_MAX_SHARD_SIZE = "50GB"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
}
#: the tied copy save_pretrained leaves out when the input and output embeddings are one tensor
TIED_KEY = "lm_head.weight"


def check_max_shard_size(max_shard_size: int | str) -> None:
    """Raise ValueError for a size huggingface_hub cannot parse (e.g. '5 gigs')."""
    split_torch_state_dict_into_shards(
        {"probe": torch.empty(1, device="meta")},
        filename_pattern=WEIGHTS_PATTERN,
        max_shard_size=max_shard_size,
    )


@dataclass(frozen=True)
class _Slot:
    """Where one on-disk tensor goes: its file, absolute byte offset and shape."""

    file: str
    offset: int
    shape: tuple[int, ...]


def _safetensors_header(
    entries: list[tuple[str, tuple[int, ...], int]], dtype: str
) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) for tensors [(name, shape, nbytes)] in this order, and
    each tensor's start within the data section."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    starts, position = [], 0
    for name, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        starts.append(position)
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, starts


def _meta_model(config, dtype: torch.dtype):
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        return Qwen3MoeForCausalLM(config).to(dtype)


def _saved_tensors(model) -> dict[str, torch.Tensor]:
    """The in-memory tensors a model directory holds: all but the tied copy of the input embedding."""
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop(TIED_KEY, None)
    return state


def saved_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """In-memory key (transformers' names, fused experts) -> shape, of every tensor a model directory of
    this config holds."""
    return {name: tuple(t.shape) for name, t in _saved_tensors(_meta_model(config, torch.float32)).items()}


class HFModelWriter:
    """A Qwen3-MoE model directory written tensor by tensor: `add` each in-memory tensor (transformers'
    key, fused experts), then `commit`; `abort` (or an exception inside `with`) leaves nothing behind.

    `add` takes the tensors in any order, on any device, in any float dtype: each is converted to
    `dtype` one on-disk tensor at a time, so memory stays near one tensor whatever the model size.
    """

    def __init__(
        self,
        out_dir: Path,
        config,
        dtype: torch.dtype,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        tokenizer_dir: Path | None = None,
    ):
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot write {dtype}; one of {', '.join(map(str, SAFETENSORS_DTYPES))}")
        self.out_dir = Path(out_dir)
        self.dtype = dtype
        self.tokenizer_dir = tokenizer_dir
        self.model = _meta_model(config, dtype)
        in_memory = _saved_tensors(self.model)
        self.tied = TIED_KEY in self.model.state_dict() and TIED_KEY not in in_memory
        #: in-memory key -> its shape; the keys `add` expects
        self.expected = {name: tuple(tensor.shape) for name, tensor in in_memory.items()}
        # Whole meta tensors, not views: the splitter sizes a tensor by its storage (a view's: the fused one).
        on_disk = {
            name: torch.empty(view.shape, dtype=dtype, device="meta")
            for name, view in split_expert_tensors(in_memory).items()
        }
        split = split_torch_state_dict_into_shards(
            on_disk, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size
        )
        self.weight_map = split.tensor_to_filename if split.is_sharded else None
        self.total_size = split.metadata["total_size"]

        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the model is for everyone
        self.slots: dict[str, _Slot] = {}
        self.files: dict[str, IO[bytes]] = {}
        try:
            for file_name, names in split.filename_to_tensors.items():
                ordered = sorted(names)  # safetensors' own order within a file (one dtype)
                entries = [(n, tuple(on_disk[n].shape), on_disk[n].nbytes) for n in ordered]
                header, starts = _safetensors_header(entries, SAFETENSORS_DTYPES[dtype])
                handle = open(self.staging / file_name, "wb")  # noqa: SIM115 (closed in commit/abort)
                self.files[file_name] = handle
                handle.write(header)
                handle.truncate(len(header) + sum(nbytes for _, _, nbytes in entries))
                for (name, shape, _), start in zip(entries, starts, strict=True):
                    self.slots[name] = _Slot(file_name, len(header) + start, shape)
        except BaseException:
            self.abort()
            raise
        self.written: set[str] = set()

    def __enter__(self) -> HFModelWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one in-memory tensor (fused experts are split into their per-expert keys here)."""
        if self.tied and name == TIED_KEY:
            return  # the same tensor as the input embedding, which is written
        if name not in self.expected:
            raise KeyError(f"the model has no tensor {name!r}")
        if tuple(tensor.shape) != self.expected[name]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the model's is {self.expected[name]}")
        for disk_name, piece in split_expert_tensors({name: tensor.detach()}).items():
            slot = self.slots[disk_name]
            data = piece.to(device="cpu", dtype=self.dtype).contiguous()
            handle = self.files[slot.file]
            handle.seek(slot.offset)
            handle.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self.written.add(name)

    def commit(self) -> None:
        """Check every tensor arrived, write the index, config and tokenizer, and rename into place
        (replacing an existing directory)."""
        missing = [name for name in self.expected if name not in self.written]
        if missing:
            self.abort()
            raise ValueError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]}")
        try:
            for handle in self.files.values():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            if self.weight_map is not None:
                index = {
                    "metadata": {
                        "total_parameters": self.model.num_parameters(),
                        "total_size": self.total_size,
                    },
                    "weight_map": self.weight_map,
                }
                (self.staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self._write_configs()
            if self.tokenizer_dir is not None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
                tokenizer.save_pretrained(str(self.staging))
            for path in self.staging.iterdir():
                os.chmod(path, 0o666 & ~_umask())
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            os.replace(self.staging, self.out_dir)
        except BaseException:
            self.abort()
            raise

    def _write_configs(self) -> None:
        """config.json and generation_config.json as save_pretrained writes them."""
        config = self.model.config
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(str(self.staging))
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(str(self.staging))

    def abort(self) -> None:
        for handle in self.files.values():
            handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
