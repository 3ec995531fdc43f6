"""Typed run configuration: four sections loaded from a YAML preset, then overridden.

The resolved config is the single source of truth for a run: the launcher writes it to the run
directory and every worker reads it back, so all ranks agree on every value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moectl.errors import UsageError
from moectl.io.paths import require_file

#: train.precision's values besides auto (moectl/model/precision.py says what each keeps in which dtype)
PRECISIONS = ("bf16", "mixed", "fp32")
#: the dtypes a saved model may be written in (`train.save_dtype`, `model.dtype`)
SAVE_DTYPES = ("float32", "bfloat16", "float16")

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"


@dataclass
class ModelConfig:
    """Qwen3-MoE dimensions (HF names in comments where ours differ)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2  # num_hidden_layers
    num_heads: int = 4  # num_attention_heads
    num_kv_heads: int = 2  # num_key_value_heads
    head_dim: int = 16
    num_experts: int = 8
    top_k: int = 2  # num_experts_per_tok
    moe_intermediate_size: int = 32
    intermediate_size: int = 128  # dense MLP width; unused while every layer is sparse
    norm_topk_prob: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    path: str | None = None  # a local HF checkpoint directory to load instead of random init
    # the model's own dtype (config.json's `dtype`): what model/ is written in unless train.save_dtype says
    dtype: str = "float32"


@dataclass
class DataConfig:
    # "synthetic", a flat .bin / .npy token file, or a corpus: a datasets.save_to_disk directory, a
    # .parquet / .jsonl / .txt file or a folder of them, or a token cache made by `moectl data prepare`
    source: str = "synthetic"
    token_dtype: str = "uint16"  # element type of flat .bin token files: uint16 or uint32
    tokenizer: str | None = None  # local tokenizer directory for corpora; byte-level if absent
    noise: float = 0.0  # synthetic only: share of tokens replaced by random ones
    format: str = "text"  # corpora: text (a text column) or chat (a column of role/content turns)
    text_field: str = "text"  # format=text: the column holding the documents
    messages_field: str = "messages"  # format=chat: the column holding the conversations
    packing: bool = True  # documents back to back in rows of seq_len; false: one document per row, padded
    document_masking: bool = True  # packed rows: no attention across documents, positions restart
    val_source: str | None = None  # a corpus held out for the validation loss (--val-data)
    val_fraction: float = 0.0  # or this share of the corpus's documents, held out whole
    cache_dir: str | None = (
        None  # where token caches go; default $MOECTL_DATA_CACHE or ~/.cache/moectl/tokens
    )
    num_proc: int = 0  # processes that tokenize a corpus; 0 = every core


@dataclass
class TrainConfig:
    steps: int = 30
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 4  # sequences per forward/backward on one rank
    seq_len: int = 64
    lr: float = 0.1
    weight_decay: float = 0.1
    momentum: float = 0.0
    optimizer: str = "sgd"  # sgd or adamw
    seed: int = 0
    timing_warmup_steps: int = 2  # steps left out of the timing summary (not the learning-rate warm-up)
    lr_schedule: str = "constant"  # constant, cosine or linear (decay to min_lr_ratio × lr at the last step)
    lr_warmup_steps: int = 0  # linear learning-rate ramp from 0 over the first steps
    min_lr_ratio: float = 0.1  # cosine / linear: the last step's lr as a share of lr
    max_grad_norm: float = 0.0  # clip by the global L2 norm of all gradients; 0 = off
    aux_loss_coef: float = 0.0  # weight of the auxiliary load-balancing loss (Switch / Qwen3); 0 = off
    router_bias_update: float = (
        0.0  # auxiliary-loss-free balancing (DeepSeek-V3): bias step per update; 0 = off
    )
    expert_load_stats: bool = True  # count tokens per expert per step (load_imbalance, expert_load.*)
    tensorboard: bool = False  # rank 0 writes TensorBoard event files under RUN_DIR/tensorboard/
    wandb: bool = False  # rank 0 logs to Weights & Biases (files under RUN_DIR/wandb/)
    wandb_project: str = "moectl"
    wandb_run_name: str | None = None  # default: the run directory's name
    wandb_tags: str | None = None  # comma-separated
    wandb_mode: str | None = None  # online or offline; default: WANDB_MODE, else online
    # auto (mixed on GPU, fp32 on CPU), mixed (fp32 weights, gradients and optimizer state, bf16 compute),
    # bf16 (everything bf16), fp32 (everything fp32)
    precision: str = "auto"
    save_dtype: str = "auto"  # the final model's dtype: auto (model.dtype), float32, bfloat16, float16
    device: str = "auto"  # auto, cpu, cuda
    # none, full (recompute every layer in backward) or selective (keep GEMM and attention outputs, recompute
    # the cheap ops; compiled layers only); true / false mean full / none
    activation_checkpointing: str = "none"
    compile: bool = False
    loss_chunk_tokens: int = 0  # > 0: lm_head + loss chunk by chunk over this many tokens (never all logits)
    fp8: bool = False  # attention q/o projections in float8, rowwise scales (torchao; capability >= 8.9)
    fp8_experts: bool = False  # ep's expert grouped GEMMs in float8 too (slower at Qwen3-30B-A3B's shapes)
    peak_tflops: float | None = None  # overrides the device table for MFU
    on_nonfinite: str = "stop"  # stop or skip a step whose loss or gradient is not finite
    checkpoint_every: int = 0  # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk; 0 keeps all
    save_model: bool = True  # write the final HF model directory
    profile_steps: int = 0  # > 0: rank 0 profiles this many steps after warm-up into RUN_DIR/profile.txt
    eval_every: int = 0  # with a validation set: its loss every N steps (and after the last); 0 = last only
    eval_batches: int = 0  # global batches of the validation set per evaluation; 0 = all of it
    attention: str = (
        "sdpa"  # attention kernels: sdpa, flex_attention or eager (transformers' implementations)
    )


@dataclass
class ParallelConfig:
    strategy: str = "single"
    nproc: int | None = None  # processes per node; default follows from the degrees
    dp_size: int | None = None
    tp_size: int = 1
    ep_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the rendezvous; needed with --nnodes > 1
    timeout_s: int = 300  # collective timeout: a stuck or dead peer ends the job after this
    #: the running strategy's own keys (`parallel.<key>`, e.g. ep's `ep_chunks`) as given; the strategy
    #: types and checks them (`Strategy.Options`), and a key it does not own is refused there
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as written to config.yaml: the strategy's options sit among the parallel keys."""
        data = dataclasses.asdict(self)
        data["parallel"].update(data["parallel"].pop("options"))
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name != "run_dir"}
#: the parallel keys every strategy shares; any other `parallel.<key>` is a strategy's own option
PARALLEL_KEYS = tuple(f.name for f in dataclasses.fields(ParallelConfig) if f.name != "options")


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or say what is wrong."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = options[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UsageError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())
        ):
            raise UsageError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise UsageError(f"{where} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


#: keys that were renamed: refused with the new name, so an old config never means something else silently
RENAMED_KEYS = {
    "train.warmup_steps": "train.timing_warmup_steps (steps left out of the timing; the learning-rate "
    "warm-up is train.lr_warmup_steps)",
    "train.dtype": "train.precision: mixed (fp32 weights and optimizer state, bf16 compute; the GPU default), "
    "bf16 (what dtype bfloat16, or auto on a GPU, meant) or fp32 (what dtype float32 meant)",
}


def _apply_section(section_obj: Any, values: dict[str, Any], section: str, origin: str) -> None:
    types_by_name = _field_types(type(section_obj))
    for key, value in values.items():
        if f"{section}.{key}" in RENAMED_KEYS:
            raise UsageError(f"{section}.{key}{origin} was renamed: use {RENAMED_KEYS[f'{section}.{key}']}")
        if isinstance(section_obj, ParallelConfig) and key not in PARALLEL_KEYS:
            section_obj.options[key] = value  # the strategy's own: checked when it is built
            continue
        if key not in types_by_name:
            known = ", ".join(types_by_name)
            raise UsageError(f"unknown key '{section}.{key}'; known keys in '{section}': {known}")
        setattr(section_obj, key, coerce(value, types_by_name[key], f"{section}.{key}"))


def load_yaml(source: str | None) -> dict[str, Any]:
    """Read a preset by name or a YAML file by path."""
    source = source or DEFAULT_PRESET
    path = Path(source)
    if not (source.endswith((".yaml", ".yml")) or path.exists()):
        path = CONFIGS_DIR / f"{source}.yaml"
        if not path.exists():
            raise UsageError(
                f"unknown preset '{source}'; choose one of {', '.join(list_presets())} or give a YAML path"
            )
    require_file(path, "config file", "give a preset name or a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UsageError(f"cannot read config file {path} ({exc.strerror or exc}); check the file") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not text (not UTF-8); give a YAML file") from None
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise UsageError(f"config file {path} is not valid YAML ({first_line}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return data


def build_config(source: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Preset or YAML file, then overrides section by section; validated at the end."""
    cfg = RunConfig()
    origin = f" (in {source})" if source and Path(source).is_file() else ""
    layers = [(load_yaml(source), origin), (overrides or {}, "")]
    for layer, origin in layers:
        for section, values in layer.items():
            if section == "run_dir":
                cfg.run_dir = None if values is None else str(values)
                continue
            if section not in SECTIONS:
                raise UsageError(f"unknown config section '{section}'; sections are {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise UsageError(f"config section '{section}' must be a mapping of keys to values")
            _apply_section(getattr(cfg, section), values, section, origin)
    validate(cfg)
    return cfg


def parse_set_option(items: list[str]) -> dict[str, dict[str, Any]]:
    """Turn repeated `--set section.key=value` into nested overrides; values parse as YAML scalars."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set takes section.key=value, got {item!r} (e.g. --set train.lr=0.05)")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        overrides.setdefault(section, {})[key] = value
    return overrides


#: `moectl train`'s value flags (`--dp-size` for dp_size) and the config key each one sets
TRAIN_FLAG_KEYS = {
    "strategy": "parallel.strategy",
    "nproc": "parallel.nproc",
    "dp_size": "parallel.dp_size",
    "tp_size": "parallel.tp_size",
    "ep_size": "parallel.ep_size",
    "nnodes": "parallel.nnodes",
    "node_rank": "parallel.node_rank",
    "rdzv_endpoint": "parallel.rdzv_endpoint",
    "steps": "train.steps",
    "global_batch": "train.global_batch",
    "micro_batch": "train.micro_batch",
    "seq_len": "train.seq_len",
    "lr": "train.lr",
    "seed": "train.seed",
    "checkpoint_every": "train.checkpoint_every",
    "model": "model.path",
    "data": "data.source",
    "val_data": "data.val_source",
}


def flag_overrides(**flags: Any) -> dict[str, dict[str, Any]]:
    """`moectl train`'s flags (by TRAIN_FLAG_KEYS name; None: not given) as config overrides."""
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in flags.items():
        if value is None:
            continue
        section, key = TRAIN_FLAG_KEYS[name].split(".")
        overrides.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    return overrides


def train_args_overrides(argv: list[str], where: str) -> dict[str, dict[str, Any]]:
    """`moectl train` flags given as words (`--tp-size 2 --set train.lr=0.05`, as `moectl bench
    --strategy-args` takes them) as config overrides; a word that is none of them is refused."""
    flags: dict[str, Any] = {}
    sets: list[str] = []
    words = iter(argv)
    for word in words:
        flag, has_value, value = word.partition("=")
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or (name not in TRAIN_FLAG_KEYS and name != "set"):
            raise UsageError(
                f"{where}: {word!r} is not a moectl train flag that takes a value; see moectl train --help"
            )
        if not has_value:
            value = next(words, None)
            if value is None:
                raise UsageError(f"{where}: {flag} needs a value")
        if name == "set":
            sets.append(value)
        else:
            flags[name] = value
    return merge_overrides(parse_set_option(sets), flag_overrides(**flags))


def apply_overrides(cfg: RunConfig, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """`cfg` with `overrides` on top, checked as `build_config` checks a config."""
    sections = {name: values for name, values in cfg.to_dict().items() if name in SECTIONS}
    return build_config(None, merge_overrides(sections, overrides))


def merge_overrides(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


CHECKPOINTING_MODES = ("none", "full", "selective")
_CHECKPOINTING_ALIASES = {"true": "full", "1": "full", "yes": "full", "on": "full",
                          "false": "none", "0": "none", "no": "none", "off": "none"}  # fmt: skip


def checkpointing_mode(value: str | bool) -> str:
    """`train.activation_checkpointing` as one of CHECKPOINTING_MODES; the old booleans mean full / none."""
    if isinstance(value, bool):
        return "full" if value else "none"
    text = str(value).strip().lower()
    return _CHECKPOINTING_ALIASES.get(text, text)


def _require_positive(values: dict[str, int | float | None]) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UsageError(f"{name} must be positive, got {value}")


#: The largest value of every integer key: generous beside any real run, small enough that nothing
#: built from it overflows (torch seeds and int64 counters) or asks for absurd memory before a check
#: could say so. Each message names the bound and why.
MAX_STEPS = 10**9
MAX_TOKENS_PER_STEP = 2**28  # every rank builds the step's whole batch: 2 GiB of int64 token ids at most
MAX_SEED = 2**64 - 1  # torch's seeds are unsigned 64-bit
MAX_PROCESSES_PER_NODE = 1024
MAX_DEGREE = 2**20
MAX_NODES = 2**16
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_COUNT = 2**16  # layers, heads, experts
MAX_WIDTH = 2**20  # hidden, intermediate and head sizes
INT_BOUNDS: dict[str, tuple[int, str]] = {
    "model.vocab_size": (2**24, "64 times the largest vocabularies in use"),
    "model.hidden_size": (MAX_WIDTH, "far beyond any model's width"),
    "model.intermediate_size": (MAX_WIDTH, "far beyond any model's width"),
    "model.moe_intermediate_size": (MAX_WIDTH, "far beyond any model's width"),
    "model.head_dim": (MAX_WIDTH, "far beyond any model's width"),
    "model.num_layers": (MAX_COUNT, "far beyond any model's depth"),
    "model.num_heads": (MAX_COUNT, "far beyond any model"),
    "model.num_kv_heads": (MAX_COUNT, "far beyond any model"),
    "model.num_experts": (MAX_COUNT, "far beyond any model"),
    "model.top_k": (MAX_COUNT, "far beyond any model"),
    "model.max_position_embeddings": (2**30, "far beyond any context length"),
    "train.steps": (MAX_STEPS, "a billion optimizer steps"),
    "train.global_batch": (MAX_TOKENS_PER_STEP, "no step may hold more tokens"),
    "train.micro_batch": (MAX_TOKENS_PER_STEP, "no step may hold more tokens"),
    "train.seq_len": (MAX_TOKENS_PER_STEP, "no step may hold more tokens"),
    "train.seed": (MAX_SEED, "torch seeds are unsigned 64-bit numbers"),
    "train.timing_warmup_steps": (MAX_STEPS, "the most steps a run may have"),
    "train.lr_warmup_steps": (MAX_STEPS, "the most steps a run may have"),
    "train.checkpoint_every": (MAX_STEPS, "the most steps a run may have"),
    "train.keep_checkpoints": (MAX_STEPS, "the most steps a run may have"),
    "train.profile_steps": (MAX_STEPS, "the most steps a run may have"),
    "train.loss_chunk_tokens": (MAX_TOKENS_PER_STEP, "the most tokens a step may have"),
    "parallel.nproc": (MAX_PROCESSES_PER_NODE, "processes on one machine"),
    "parallel.dp_size": (MAX_DEGREE, "far beyond any cluster"),
    "parallel.tp_size": (MAX_DEGREE, "far beyond any cluster"),
    "parallel.ep_size": (MAX_DEGREE, "far beyond any cluster"),
    "parallel.nnodes": (MAX_NODES, "far beyond any cluster"),
    "parallel.node_rank": (MAX_NODES - 1, "below the most nodes"),
    "parallel.timeout_s": (MAX_TIMEOUT_S, "a week"),
}


def _check_bounds(cfg: RunConfig) -> None:
    """Every integer key at most its bound (INT_BOUNDS), and the tokens of a step within memory."""
    for dotted, (bound, why) in INT_BOUNDS.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and value > bound:
            raise UsageError(f"{dotted} must be at most {bound:,} ({why}), got {value:,}")
    tokens = cfg.train.global_batch * cfg.train.seq_len
    if tokens > MAX_TOKENS_PER_STEP:
        raise UsageError(
            f"train.global_batch × train.seq_len = {tokens:,} tokens per step is above {MAX_TOKENS_PER_STEP:,}: "
            "every rank builds the step's whole batch (8 bytes a token); lower --global-batch or --seq-len"
        )


def _check_endpoint(endpoint: str) -> None:
    """HOST:PORT (IPv6 hosts in brackets), the port a number from 1 to 65535."""
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port or endpoint.endswith("]"):  # "[::1]": an IPv6 host, no port
        example = endpoint if not colon or endpoint.endswith("]") else host or "node0"
        raise UsageError(
            f"--rdzv-endpoint {endpoint!r} needs HOST:PORT (node 0's address and a free port, e.g. "
            f"{example}:29500), the same on every node"
        )
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UsageError(
            f"--rdzv-endpoint {endpoint!r}: the port must be a number from 1 to 65535, got {port!r}"
        )


def validate(cfg: RunConfig) -> None:
    """Checks that need no world size: sizes positive, choices known."""
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    _require_positive(
        {
            "model.vocab_size": m.vocab_size,
            "model.hidden_size": m.hidden_size,
            "model.num_layers": m.num_layers,
            "model.num_heads": m.num_heads,
            "model.num_kv_heads": m.num_kv_heads,
            "model.head_dim": m.head_dim,
            "model.num_experts": m.num_experts,
            "model.top_k": m.top_k,
            "model.moe_intermediate_size": m.moe_intermediate_size,
            "model.intermediate_size": m.intermediate_size,
            "model.max_position_embeddings": m.max_position_embeddings,
            "train.steps": t.steps,
            "train.global_batch": t.global_batch,
            "train.micro_batch": t.micro_batch,
            "train.seq_len": t.seq_len,
            "train.lr": t.lr,
            "train.peak_tflops": t.peak_tflops,
            "model.rope_theta": m.rope_theta,
            "model.rms_norm_eps": m.rms_norm_eps,
            "parallel.nproc": p.nproc,
            "parallel.dp_size": p.dp_size,
            "parallel.tp_size": p.tp_size,
            "parallel.ep_size": p.ep_size,
            "parallel.nnodes": p.nnodes,
            "parallel.timeout_s": p.timeout_s,
        }
    )
    _check_bounds(cfg)
    if m.top_k > m.num_experts:
        raise UsageError(f"model.top_k ({m.top_k}) cannot exceed model.num_experts ({m.num_experts})")
    if m.num_heads % m.num_kv_heads:
        raise UsageError(
            f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})"
        )
    for name, value in {
        "model.initializer_range": m.initializer_range,
        "train.weight_decay": t.weight_decay,
        "train.momentum": t.momentum,
        "train.timing_warmup_steps": t.timing_warmup_steps,
        "train.lr_warmup_steps": t.lr_warmup_steps,
        "train.max_grad_norm": t.max_grad_norm,
        "train.aux_loss_coef": t.aux_loss_coef,
        "train.router_bias_update": t.router_bias_update,
        "train.checkpoint_every": t.checkpoint_every,
        "train.profile_steps": t.profile_steps,
        "train.loss_chunk_tokens": t.loss_chunk_tokens,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.seed": t.seed,
        "data.noise": d.noise,
        "data.num_proc": d.num_proc,
        "train.eval_every": t.eval_every,
        "train.eval_batches": t.eval_batches,
        "parallel.node_rank": p.node_rank,
    }.items():
        if not value >= 0:
            raise UsageError(f"{name} must not be negative, got {value}")
    if not 0 <= t.momentum < 1:
        raise UsageError(
            f"train.momentum must lie in [0, 1) (1 or more never forgets a gradient), got {t.momentum}"
        )
    choices = {
        "train.optimizer": (t.optimizer, ("sgd", "adamw")),
        "train.precision": (t.precision, ("auto", *PRECISIONS)),
        "train.save_dtype": (t.save_dtype, ("auto", *SAVE_DTYPES)),
        "model.dtype": (m.dtype, SAVE_DTYPES),
        "train.device": (t.device, ("auto", "cpu", "cuda")),
        "train.on_nonfinite": (t.on_nonfinite, ("stop", "skip")),
        "train.lr_schedule": (t.lr_schedule, ("constant", "cosine", "linear")),
        "data.token_dtype": (d.token_dtype, ("uint16", "uint32")),
        "data.format": (d.format, ("text", "chat")),
        "train.attention": (t.attention, ("sdpa", "flex_attention", "eager")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    t.activation_checkpointing = checkpointing_mode(t.activation_checkpointing)
    if t.activation_checkpointing not in CHECKPOINTING_MODES:
        raise UsageError(
            f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING_MODES)} "
            f"(or true / false), got {t.activation_checkpointing!r}"
        )
    if t.activation_checkpointing == "selective" and not t.compile:
        raise UsageError(
            "train.activation_checkpointing=selective is done by torch.compile's partitioner: add "
            "--set train.compile=true, or use full"
        )
    if not 0 <= d.noise <= 1:
        raise UsageError(f"data.noise must lie in [0, 1], got {d.noise}")
    if not 0 <= d.val_fraction < 1:
        raise UsageError(f"data.val_fraction must lie in [0, 1), got {d.val_fraction}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise UsageError(f"train.min_lr_ratio must lie in [0, 1], got {t.min_lr_ratio}")
    if p.node_rank >= p.nnodes:
        raise UsageError(f"parallel.node_rank ({p.node_rank}) must be below parallel.nnodes ({p.nnodes})")
    if p.nnodes > 1 and not p.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the same on every node")
    if p.rdzv_endpoint is not None:
        _check_endpoint(p.rdzv_endpoint)
