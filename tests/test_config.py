from pathlib import Path

import pytest

from moectl.config import CONFIGS_DIR, build_config, list_presets, parse_set_option
from moectl.errors import UsageError
from moectl.model.build import build_meta_model
from moectl.model.sizing import count_params

PRESETS = list_presets()


def test_presets_ship_tiny_and_30b():
    assert {"tiny", "qwen3-30b-a3b"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_loads_and_builds(preset):
    """litgpt-style: every YAML in configs/ resolves, validates and builds the HF module tree."""
    cfg = build_config(preset)
    model = build_meta_model(cfg.model, dtype=__import__("torch").bfloat16)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == count_params(cfg.model).total


def test_yaml_path_and_overrides(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text((CONFIGS_DIR / "tiny.yaml").read_text())
    cfg = build_config(
        str(path), parse_set_option(["train.lr=0.05", "model.num_experts=16", "parallel.fsdp=true"])
    )
    assert cfg.train.lr == 0.05 and cfg.model.num_experts == 16 and cfg.parallel.options == {"fsdp": True}
    assert cfg.train.steps == 40  # untouched keys keep the preset's value


def test_30b_preset_dimensions():
    m = build_config("qwen3-30b-a3b").model
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (2048, 48, 32, 4, 128)
    assert (m.num_experts, m.top_k, m.moe_intermediate_size, m.vocab_size) == (128, 8, 768, 151936)
    assert m.norm_topk_prob is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.steps=0"], "train.steps must be positive"),
        (["train.micro_batch=-2"], "train.micro_batch must be positive"),
        (["model.top_k=9"], "cannot exceed"),
        (["train.optimizer=lion"], "train.optimizer must be one of"),
        (["train.nosuchkey=1"], "unknown key 'train.nosuchkey'"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["train.steps=2.5"], "train.steps must be an integer"),
        (["data.noise=2"], "data.noise must lie in"),
        (["parallel.nnodes=2"], "--rdzv-endpoint"),
    ],
)
def test_validation_errors_name_the_problem(overrides, message):
    with pytest.raises(UsageError, match=message):
        build_config("tiny", parse_set_option(overrides))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UsageError, match="tiny"):
        build_config("no-such-preset")


def test_set_syntax():
    with pytest.raises(UsageError, match="section.key=value"):
        parse_set_option(["lr=3"])
    assert parse_set_option(["model.path=null"]) == {"model": {"path": None}}


def test_a_strategys_options_round_trip_through_config_yaml(tmp_path: Path):
    """The keys stay where users write them (`parallel.ep_chunks`); the run's config.yaml records every
    option of its strategy, typed, and reads back to the same options."""
    from moectl.run.prepare import check_run

    cfg = build_config("tiny", {"parallel": {"strategy": "ep", "ep_chunks": "2"}})
    prepared = check_run(cfg)
    assert prepared.strategy.options.chunks == 2 and prepared.strategy.options.fsdp is False
    assert cfg.parallel.options == {"fsdp": False, "ep_chunks": 2, "ep_max_rows_factor": None}
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert "  ep_chunks: 2\n" in saved.read_text() and "options" not in saved.read_text()
    again = check_run(build_config(str(saved)))
    assert again.strategy.options == prepared.strategy.options and again.cfg.to_dict() == cfg.to_dict()
    assert check_run(build_config("tiny", {"parallel": {"strategy": "ddp"}})).cfg.parallel.options == {}
