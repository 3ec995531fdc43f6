"""Reading and writing HF checkpoint directories (config.json + safetensors, sharded with an index).

Opening a checkpoint checks every safetensors header against the file size before training starts,
so a corrupt or truncated file is a clear error rather than a crash on rank 3 ten minutes in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen3MoeForCausalLM

from moectl.config import ModelConfig
from moectl.errors import UsageError
from moectl.io.hf_layout import canonical_units, fuse_expert_tensors, parse_per_expert_key
from moectl.io.hf_writer import HFModelWriter
from moectl.io.safetensors_reader import open_checkpoint
from moectl.model.build import hf_config


class HFCheckpoint:
    """A lazy tensor source over an HF directory; per-expert keys are fused on demand into
    transformers 5's in-memory layout. Opening it validates every header (moectl.io.safetensors_reader)."""

    def __init__(self, model_dir: Path):
        checkpoint = open_checkpoint(model_dir)
        self.model_dir = model_dir
        self.unit_shapes = {name: unit.shape for name, unit in checkpoint.units.items()}
        self.files = {key: stored.path for stored in checkpoint.files for key in stored.tensors}
        self.per_expert: dict[str, list[str]] = {}
        for key in self.files:
            parsed = parse_per_expert_key(key)
            if parsed is not None:
                self.per_expert.setdefault(parsed.prefix, []).append(key)

    def check_fits(self, model: ModelConfig) -> None:
        """Every tensor the model needs is there with its shape, and every stored tensor has a place in
        the model: a tensor the model would ignore (a bias, a dense MLP) is refused, never dropped."""
        with torch.device("meta"):
            built = Qwen3MoeForCausalLM(hf_config(model))
        needed = {name: unit.shape for name, unit in canonical_units(
            {name: tuple(param.shape) for name, param in built.named_parameters()}
        ).items()}  # fmt: skip
        stored = dict(self.unit_shapes)
        if model.tie_word_embeddings:
            stored.pop("lm_head.weight", None)  # a tied copy some savers keep
        where = f"--model {self.model_dir}"
        extra = [name for name in stored if name not in needed]
        if extra:
            raise UsageError(
                f"{where} holds {len(extra)} tensor(s) the model has no place for, e.g. {extra[0]}; "
                "its config.json does not describe these weights, or describes a model moectl does not build"
            )
        missing = [name for name in needed if name not in stored]
        if missing:
            raise UsageError(
                f"{where} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}; "
                "it does not match its config.json"
            )
        for name, shape in needed.items():
            if tuple(stored[name]) != tuple(shape):
                raise UsageError(
                    f"{where}: tensor {name} has shape {tuple(stored[name])}, the config.json model needs "
                    f"{tuple(shape)}"
                )

    def _read(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def __call__(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if name in self.files:
            tensor = self._read(name)
        else:
            prefix = name.rpartition(".")[0]
            if prefix not in self.per_expert:
                raise UsageError(f"the checkpoint lacks {name}; it does not match the model config")
            try:
                tensor = fuse_expert_tensors({key: self._read(key) for key in self.per_expert[prefix]})[name]
            except (ValueError, KeyError) as exc:
                raise UsageError(f"the checkpoint's experts under {prefix} are incomplete ({exc})") from None
        if tuple(tensor.shape) != tuple(shape):
            raise UsageError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}"
            )
        return tensor.to(device)


def save_hf_model(state_dict: dict[str, torch.Tensor], hf_config, out_dir: Path) -> None:
    """Write what `AutoModelForCausalLM.from_pretrained` loads (moectl.io.hf_writer, the files
    save_pretrained writes), in the dtype of the tensors, staged beside the target and renamed into
    place, so a crash never leaves a half-written model."""
    dtype = next(iter(state_dict.values())).dtype
    with HFModelWriter(out_dir, hf_config, dtype) as writer:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
        writer.commit()
