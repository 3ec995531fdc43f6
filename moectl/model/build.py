"""The model: transformers' own Qwen3-MoE, built on the meta device and materialised in place.

Why meta first: a strategy shards the model before any memory is spent, then every rank fills only
its own shard. Initial values are a pure function of (seed, parameter name), drawn for the full
tensor and sliced, so every strategy starts from exactly the weights `single` starts from.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moectl.config import SAVE_DTYPES, ModelConfig, checkpointing_mode
from moectl.errors import UsageError
from moectl.io.paths import require_directory, require_file

# transformers is imported where a model or its HF config is built: the strategies import this module,
# and the launching process, which builds neither, need not pay for importing it.
if TYPE_CHECKING:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def hf_config(cfg: ModelConfig, dtype: torch.dtype | None = None) -> Qwen3MoeConfig:
    """transformers' config of the model; `dtype` (default: the model's own, `model.dtype`) is what its
    config.json states its weights are stored in."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_cache=False,
        attn_implementation="sdpa",
        dtype=dtype or getattr(torch, cfg.dtype),
    )


#: keys a Qwen3-MoE config.json must state (defaults would silently build another model)
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


#: Qwen3-MoE config fields moectl does not implement: (field, what it means, the value moectl builds).
#: A checkpoint that sets another value would train a different model than the one it describes.
UNIMPLEMENTED_HF_FIELDS: tuple[tuple[str, str, object], ...] = (
    ("attention_bias", "biases on the attention projections", False),
    ("mlp_only_layers", "layers with a dense MLP instead of experts", []),
    ("decoder_sparse_step", "experts only in every n-th layer", 1),
    ("use_sliding_window", "sliding-window attention", False),
    ("hidden_act", "the experts' activation", "silu"),
    ("attention_dropout", "dropout on attention weights", 0.0),
)


def _field_value(raw: dict, hf: object, name: str) -> object:
    value = getattr(hf, name, raw.get(name))
    return raw.get(name) if value is None else value


def refuse_unimplemented_fields(raw: dict, hf: Qwen3MoeConfig, config_file: Path) -> None:
    """One line naming the first field whose value moectl would silently not implement."""
    found = []
    for name, meaning, built in UNIMPLEMENTED_HF_FIELDS:
        value = _field_value(raw, hf, name)
        if value is None or value == built or (isinstance(built, list) and not value):
            continue
        found.append((name, value, meaning, built))
    layer_types = _field_value(raw, hf, "layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        found.append(("layer_types", sorted(set(layer_types)), "attention kind per layer", "full_attention"))
    rope = _field_value(raw, hf, "rope_parameters") or _field_value(raw, hf, "rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        found.append(("rope_parameters.rope_type", rope_type, "scaled rotary positions", "default"))
    if found:
        name, value, meaning, built = found[0]
        more = f" (and {', '.join(f[0] for f in found[1:])})" if len(found) > 1 else ""
        raise UsageError(
            f"{config_file} sets {name} = {json.dumps(value)}{more}: {meaning}, which moectl does not "
            f"implement (it builds {json.dumps(built)}); train a checkpoint without it"
        )


def _stored_dtype(raw: dict, config_file: Path) -> str:
    """The dtype config.json says its weights are stored in (`dtype`, `torch_dtype` before transformers
    5); without either, float32, as transformers then loads them."""
    value = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if value not in SAVE_DTYPES:
        raise UsageError(
            f"{config_file} sets dtype {value!r}; moectl reads and writes {', '.join(SAVE_DTYPES)} models"
        )
    return value


def model_config_from_hf_dir(path: Path) -> ModelConfig:
    """Read a local HF checkpoint's config.json into our ModelConfig (no network, no remote code)."""
    config_file = path / "config.json"
    require_directory(path, "--model", "give a local HF checkpoint directory (config.json + safetensors)")
    if not config_file.exists():
        raise UsageError(f"--model {path} has no config.json; point it at an HF checkpoint directory")
    require_file(
        config_file, "--model config file", "give a local HF checkpoint directory (config.json + safetensors)"
    )
    try:
        raw = json.loads(config_file.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {config_file} ({exc.strerror or exc}); check the file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{config_file} is not text (not UTF-8); restore the file") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{config_file} is not valid JSON ({exc.msg}); restore the file") from None
    if raw.get("model_type") != "qwen3_moe":
        raise UsageError(
            f"{config_file} has model_type {raw.get('model_type')!r}; moectl trains qwen3_moe models"
        )
    required = REQUIRED_HF_KEYS + (() if "num_local_experts" in raw else ("num_experts",))
    missing = [key for key in required if key not in raw]
    if missing:
        raise UsageError(f"{config_file} lacks the key {missing[0]!r}; it is not a complete Qwen3-MoE config")
    from transformers import Qwen3MoeConfig

    try:
        hf = Qwen3MoeConfig.from_dict(raw)  # maps every transformers version's key names
        rope = getattr(hf, "rope_parameters", None) or {}
        refuse_unimplemented_fields(raw, hf, config_file)
        return ModelConfig(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            num_experts=hf.num_experts,
            top_k=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size,
            intermediate_size=hf.intermediate_size,
            norm_topk_prob=hf.norm_topk_prob,
            rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", 1_000_000.0)),
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            initializer_range=hf.initializer_range,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            path=str(path),
            dtype=_stored_dtype(raw, config_file),
        )
    except UsageError:
        raise
    except Exception as exc:  # transformers/huggingface_hub raise their own validation errors here
        raise UsageError(
            f"{config_file} is not a complete Qwen3-MoE config ({exc}); re-save the checkpoint"
        ) from None


def build_meta_model(cfg: ModelConfig, dtype: torch.dtype) -> Qwen3MoeForCausalLM:
    """The HF module tree on the meta device: shapes only, no memory, no initialisation cost. Each
    layer's router is moectl's `Router` (transformers' math; it can also balance and measure routing)."""
    from transformers import Qwen3MoeForCausalLM

    from moectl.model.routing import install_routers

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf_config(cfg))
    model = model.to(dtype)
    install_routers(model)
    return model


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (DDP, compile, activation checkpointing) to get the HF key."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def init_full_tensor(
    name: str, shape: torch.Size, cfg: ModelConfig, seed: int, device: torch.device
) -> torch.Tensor:
    """Initial value of one parameter: a pure function of (seed, name, shape), as HF initialises it."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=generator, device=device) * cfg.initializer_range


TensorSource = Callable[[str, torch.Size, torch.device], torch.Tensor]


def random_init_source(cfg: ModelConfig, seed: int) -> TensorSource:
    return lambda name, shape, device: init_full_tensor(name, shape, cfg, seed, device)


def local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full tensor: DTensors by their placements, plain tensors whole."""
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    return full


def _reset_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are garbage after to_empty; rebuild them."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=module.config)
            for buffer_name, value in fresh.named_buffers(recurse=False):
                getattr(module, buffer_name).copy_(value)


ShardFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def materialize(
    model: nn.Module, device: torch.device, source: TensorSource, shard: ShardFn | None = None
) -> None:
    """Allocate every (possibly sharded) parameter on `device` and fill this rank's part from `source`.

    `shard(name, param, full)` lets a strategy that keeps plain local tensors pick its slice;
    DTensor parameters need no help.
    """
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        key = canonical_name(name)
        full_shape = param.shape
        full = source(key, full_shape, device).to(device=device, dtype=param.dtype)
        piece = shard(key, param, full) if shard is not None else local_shard(param, full)
        target = param.to_local() if isinstance(param, DTensor) else param
        if target.shape != piece.shape:
            raise RuntimeError(
                f"shard of {name} has shape {tuple(piece.shape)}, parameter {tuple(target.shape)}"
            )
        target.copy_(piece)
    _reset_buffers(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a (possibly wrapped) Qwen3-MoE causal LM."""
    inner = model.module if hasattr(model, "module") else model
    return inner.model.layers


#: torch.compile partitioner settings behind `activation_checkpointing=selective`. By default the partitioner
#: already recomputes cheap ops, but refuses to when their inputs were made far from their use in backward,
#: when they would form long fused chains, or when backward needs their output materialised; lifting those
#: three bans (the allowlist of cheap, memory-bound ops and the ban on reductions stay) lets it drop the
#: MoE block's [tokens·top_k, hidden] expert-input copies, the SiLU·up product and the norm outputs and
#: recompute them, while GEMM and attention outputs are kept. On one Qwen3-30B-A3B layer (CPU, bf16) the
#: saved activations fall from 143 to 90 KB per token (BENCHMARKS.md, "levers toward the hardware limit").
SELECTIVE_RECOMPUTE_FLAGS = {
    "ban_recompute_used_far_apart": False,
    "ban_recompute_long_fusible_chains": False,
    "ban_recompute_materialized_backward": False,
}


def enable_selective_recompute() -> None:
    """Set SELECTIVE_RECOMPUTE_FLAGS process-wide: the partitioner runs lazily, at each compiled graph's
    first backward, so a scoped patch around `compile()` would not reach it."""
    import torch._functorch.config as functorch_config

    for name, value in SELECTIVE_RECOMPUTE_FLAGS.items():
        if hasattr(functorch_config, name):  # a torch without a flag keeps its default for it
            setattr(functorch_config, name, value)


CheckpointContexts = Callable[[], tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]]


def apply_layer_wrappers(
    model: nn.Module, train, checkpoint_contexts: CheckpointContexts | None = None
) -> None:
    """FP8 linears, activation checkpointing, then torch.compile, per decoder layer (the fixed middle of
    the wrap order).

    Full checkpointing goes through transformers' own switch (non-reentrant), which keeps parameter names
    unchanged; compile is per layer so that graph breaks stay local and FSDP can still wrap layers.
    Selective checkpointing is a setting of the compiler's partitioner (config validation insists on
    train.compile), so it adds no wrapper at all and never re-runs a GEMM, attention or a collective.
    `checkpoint_contexts` is torch.utils.checkpoint's `context_fn` for full checkpointing: contexts entered
    around a layer's first forward and around its recompute (`ep` uses them to replay its exchanges
    instead of redoing them).
    """
    if train.fp8:  # first: checkpointing and compile then see the FP8 modules
        from moectl.model.fp8 import convert_linears

        convert_linears(model)
    mode = checkpointing_mode(train.activation_checkpointing)
    if mode == "full":
        kwargs = {"use_reentrant": False}
        if checkpoint_contexts is not None:
            kwargs["context_fn"] = checkpoint_contexts
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "selective":
        enable_selective_recompute()
    if train.compile:
        for layer in decoder_layers(model):
            layer.compile()
