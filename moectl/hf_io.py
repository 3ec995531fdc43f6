"""Reading and writing HF checkpoint directories (config.json + safetensors, sharded with an index).

Reading checks every safetensors header against the file size before training starts, so a
corrupt or truncated file is a clear error rather than a crash on rank 3 ten minutes in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from moectl.errors import UsageError

PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict:
    """Parse and bounds-check a safetensors header without loading any tensor."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UsageError(f"{path} is not a safetensors file (too short); re-save or re-download it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise UsageError(f"{path} has a corrupt safetensors header; re-save or re-download it")
            header = json.loads(handle.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} has a corrupt safetensors header; re-save or re-download it") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from None
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or "data_offsets" not in entry:
            raise UsageError(f"{path} has a corrupt safetensors header; re-save or re-download it")
        end = entry["data_offsets"][1]
        if end > data_size:
            raise UsageError(
                f"{path} is truncated (tensor {name} ends past the file); re-save or re-download it"
            )
    return header


def safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it, for a single file or an indexed shard set."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UsageError(
                f"{index_file} is not a valid safetensors index; re-save the checkpoint"
            ) from None
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise UsageError(
                    f"{index_file} names {shard.name}, which is missing; copy the whole checkpoint"
                )
    else:
        candidates = sorted(model_dir.glob("*.safetensors"))
        if not candidates:
            raise UsageError(f"{model_dir} holds no .safetensors files; save the model with safetensors")
        files = {}
        for shard in candidates:
            for name in read_safetensors_header(shard):
                if name != "__metadata__":
                    files[name] = shard
        return files
    for shard in set(files.values()):
        read_safetensors_header(shard)
    return files


class HFCheckpoint:
    """A lazy tensor source over an HF directory; expert keys fused on demand to transformers 5's layout."""

    def __init__(self, model_dir: Path):
        self.files = safetensors_files(model_dir)
        self.per_expert: dict[str, dict[tuple[int, str], str]] = {}
        for name in self.files:
            match = PER_EXPERT_KEY.match(name)
            if match:
                group = self.per_expert.setdefault(match["prefix"], {})
                group[(int(match["expert"]), match["proj"])] = name

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def __call__(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if name in self.files:
            tensor = self._read(name)
        else:
            tensor = self._fused_expert(name)
        if tuple(tensor.shape) != tuple(shape):
            raise UsageError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}"
            )
        return tensor.to(device)

    def _fused_expert(self, name: str) -> torch.Tensor:
        prefix, _, fused = name.rpartition(".")
        group = self.per_expert.get(prefix)
        if group is None or fused not in ("gate_up_proj", "down_proj"):
            raise UsageError(f"the checkpoint lacks {name}; it does not match the model config")
        num_experts = 1 + max(expert for expert, _ in group)
        try:
            if fused == "down_proj":
                return torch.stack([self._read(group[(e, "down_proj")]) for e in range(num_experts)])
            return torch.stack(
                [
                    torch.cat([self._read(group[(e, "gate_proj")]), self._read(group[(e, "up_proj")])])
                    for e in range(num_experts)
                ]
            )
        except KeyError as exc:
            raise UsageError(
                f"the checkpoint lacks expert weights under {prefix} ({exc.args[0]}); it is incomplete"
            ) from None


def save_hf_model(state_dict: dict[str, torch.Tensor], hf_config, out_dir: Path) -> None:
    """Write what `AutoModelForCausalLM.from_pretrained` loads, through transformers' own save_pretrained.

    The weights are assigned into a meta-device model (no copy), saved into a temporary directory
    beside the target, and renamed into place, so a crash never leaves a half-written model.
    """
    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf_config)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
