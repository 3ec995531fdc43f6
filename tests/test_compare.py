"""Tests for ``moectl compare-weights`` (moectl.compare) and the expert key layout (moectl.io.hf_layout)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moectl.compare.checkpoints as comparison
from moectl.compare import compare_checkpoints, compare_command
from moectl.errors import UsageError
from moectl.io.hf_layout import canonical_units, fuse_expert_tensors, split_expert_tensors, unit_view
from moectl.io.outputs import write_json_atomic
from tests.util import run_moectl, run_moectl_in_process

TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
EXPERT_PREFIX = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One tiny Qwen3-MoE saved three ways: per-expert dir, sharded dir with index, fused single file."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_CONFIG))
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    save_file(state, str(root / "fused.safetensors"))
    return SimpleNamespace(
        root=root, state=state, hf=root / "hf", sharded=root / "sharded", fused=root / "fused.safetensors"
    )


def run(capsys: pytest.CaptureFixture[str], a: Path, b: Path, **options) -> tuple[int, str, str]:
    code = compare_command(a, b, **options)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


# ---------------------------------------------------------------------------------------------- matches


def test_identical_files_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = {"w": torch.randn(32, 16), "b": torch.randn(16).to(torch.bfloat16)}
    a, b = save(tmp_path / "a.safetensors", tensors), save(tmp_path / "b.safetensors", tensors)
    code, out, _ = run(capsys, a, b)
    assert code == 0
    assert "MATCH" in out
    report = compare_checkpoints(a, b, progress=False)
    assert report.matched
    assert report.global_rel_err == 0.0 and report.global_max_abs_diff == 0.0
    assert {t.name for t in report.tensors} == {"w", "b"}


def test_per_expert_dir_matches_fused_file(tiny: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    on_disk = load_file(str(tiny.hf / "model.safetensors"))
    assert f"{EXPERT_PREFIX}.0.gate_proj.weight" in on_disk  # save_pretrained writes per-expert keys
    assert f"{EXPERT_PREFIX}.gate_up_proj" in tiny.state  # the in-memory form is fused
    code, _, _ = run(capsys, tiny.hf, tiny.fused)
    assert code == 0
    report = compare_checkpoints(tiny.fused, tiny.hf, progress=False)
    assert report.global_rel_err == 0.0
    assert not report.missing and not report.extra
    assert len(report.tensors) == len(on_disk)


def test_sharded_dir_matches_single_file(tiny: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    assert (tiny.sharded / "model.safetensors.index.json").is_file()
    assert len(list(tiny.sharded.glob("*.safetensors"))) > 1
    code, _, _ = run(capsys, tiny.sharded, tiny.fused)
    assert code == 0
    code, _, _ = run(capsys, tiny.sharded / "model.safetensors.index.json", tiny.hf / "model.safetensors")
    assert code == 0


def test_dtype_difference_is_reported_but_compared_numerically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weight = torch.randn(64, 64).to(torch.bfloat16)
    a = save(tmp_path / "a.safetensors", {"w": weight})
    b = save(tmp_path / "b.safetensors", {"w": weight.float()})
    code, out, _ = run(capsys, a, b)
    assert code == 0
    assert "dtype differences" in out
    report = compare_checkpoints(a, b, progress=False)
    assert report.dtype_mismatches == [("w", "BF16", "F32")]
    assert report.global_rel_err == 0.0


# ------------------------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    ("fused_key", "index", "canonical"),
    [
        ("model.layers.0.self_attn.q_proj.weight", (), "model.layers.0.self_attn.q_proj.weight"),
        (f"{EXPERT_PREFIX}.gate_up_proj", (3, slice(32, 64)), f"{EXPERT_PREFIX}.3.up_proj.weight"),
    ],
)
def test_perturbed_tensor_fails_and_comes_first(
    tiny: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fused_key: str,
    index: tuple,
    canonical: str,
) -> None:
    state = {key: value.clone() for key, value in tiny.state.items()}
    target = state[fused_key][index] if index else state[fused_key]
    target.add_(torch.randn_like(target))
    perturbed = save(tmp_path / "perturbed.safetensors", state)
    code, out, _ = run(capsys, perturbed, tiny.hf, top=3)
    assert code == 1
    assert "MISMATCH" in out
    report = compare_checkpoints(perturbed, tiny.hf, progress=False)
    assert report.tensors[0].name == canonical
    assert report.tensors[0].rel_err > 0.1
    assert all(t.rel_err == 0.0 for t in report.tensors[1:])


def test_per_tensor_rtol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big, small = torch.randn(256, 256), torch.ones(8)
    a = save(tmp_path / "a.safetensors", {"big": big, "norm": small * 1.05})
    b = save(tmp_path / "b.safetensors", {"big": big, "norm": small})
    assert run(capsys, a, b)[0] == 0  # globally tiny: 0.05 * sqrt(8) / sqrt(65536 + 8)
    code, out, _ = run(capsys, a, b, per_tensor_rtol=0.01)
    assert code == 1
    assert "per-tensor rtol" in out


def test_missing_and_extra_keys(
    tiny: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = dict(tiny.state)
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    a = save(tmp_path / "a.safetensors", state)
    code, out, _ = run(capsys, a, tiny.hf)
    assert code == 1
    assert "model.norm.weight" in out
    report = compare_checkpoints(a, tiny.hf, progress=False)
    assert report.missing == ["model.norm.weight"]
    assert report.extra == ["model.extra.weight"]
    assert report.global_rel_err == 0.0  # everything present matches; the missing key alone fails


def test_shape_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save(tmp_path / "a.safetensors", {"w": torch.zeros(4, 8)})
    b = save(tmp_path / "b.safetensors", {"w": torch.zeros(8, 4)})
    code, out, _ = run(capsys, a, b)
    assert code == 1
    assert "shape mismatches" in out
    report = compare_checkpoints(a, b, progress=False)
    assert [(m.name, m.shape_a, m.shape_b) for m in report.shape_mismatches] == [("w", (4, 8), (8, 4))]


def test_non_finite_values_are_named_and_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = torch.randn(16, 16)
    with_nan, with_inf = good.clone(), good.clone()
    with_nan[3, 4] = math.nan
    with_inf[0, 0] = math.inf
    a = save(tmp_path / "a.safetensors", {"nan_in_a": with_nan, "inf_in_b": good, "clean": good.clone()})
    b = save(tmp_path / "b.safetensors", {"nan_in_a": good, "inf_in_b": with_inf, "clean": good.clone()})
    code, out, _ = run(capsys, a, b, json_path=tmp_path / "report.json")
    assert code == 1
    assert "nan_in_a" in out and "inf_in_b" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert {row["name"]: (row["a"], row["b"]) for row in report["nonfinite"]} == {
        "nan_in_a": (1, 0),
        "inf_in_b": (0, 1),
    }
    assert {row["name"] for row in report["tensors"][:2]} == {"nan_in_a", "inf_in_b"}
    assert report["global"]["rel_err"] == 0.0  # the finite values all agree
    assert any("non-finite" in reason for reason in report["failures"])


# ------------------------------------------------------------------------------------------------- json


def test_json_report_content(
    tiny: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {key: value.clone() for key, value in tiny.state.items()}
    state["lm_head.weight"] *= 2.0
    del state["model.layers.0.input_layernorm.weight"]
    a = save(tmp_path / "a.safetensors", state)
    json_path = tmp_path / "out" / "report.json"
    json_path.parent.mkdir()
    code, _, _ = run(capsys, a, tiny.sharded, json_path=json_path, rtol=0.5)
    assert code == 1
    assert [p.name for p in json_path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    report = json.loads(json_path.read_text())
    assert report["matched"] is False
    assert report["a"] == str(a) and report["b"] == str(tiny.sharded)
    assert report["rtol"] == 0.5 and report["per_tensor_rtol"] is None
    assert report["missing"] == ["model.layers.0.input_layernorm.weight"] and report["extra"] == []
    worst = report["tensors"][0]
    assert worst["name"] == "lm_head.weight"
    assert worst["shape"] == [256, 64] and worst["dtype_a"] == worst["dtype_b"] == "F32"
    assert worst["rel_err"] == pytest.approx(1.0)
    expected_global = math.sqrt(state["lm_head.weight"].double().square().sum() / 4) / math.sqrt(
        sum(v.double().square().sum() for k, v in tiny.state.items() if k in state)
    )
    assert report["global"]["rel_err"] == pytest.approx(expected_global, rel=1e-6)
    assert report["global"]["tensors_compared"] == len(report["tensors"]) == 68
    assert report["failures"] == ["1 key(s) missing from A"]  # global error 0.4 is within rtol 0.5


def test_write_json_atomic_replaces(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    write_json_atomic(target, {"new": True})
    assert json.loads(target.read_text()) == {"new": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------------- bad input


def _not_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights, just some text that is long enough")
    return path


def _pickle(tmp_path: Path) -> Path:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, path)
    return path


def _corrupt_header(tmp_path: Path) -> Path:
    path = save(tmp_path / "corrupt.safetensors", {"w": torch.zeros(4)})
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"#!@$"  # keep the length, break the JSON
    path.write_bytes(bytes(raw))
    return path


def _truncated(tmp_path: Path) -> Path:
    path = save(tmp_path / "truncated.safetensors", {"w": torch.zeros(64), "v": torch.ones(64)})
    path.write_bytes(path.read_bytes()[:-10])
    return path


def _missing_shard(tmp_path: Path, tiny: SimpleNamespace) -> Path:
    copy = tmp_path / "sharded"
    shutil.copytree(tiny.sharded, copy)
    (copy / "model-00002-of-00015.safetensors").unlink()
    return copy


def _no_weights_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    return tmp_path / "empty"


@pytest.mark.parametrize(
    ("make_bad", "expected"),
    [
        (lambda tmp, tiny: tmp / "does-not-exist", "does not exist"),
        (lambda tmp, tiny: _not_safetensors(tmp), "not a valid safetensors file"),
        (lambda tmp, tiny: _pickle(tmp), "never unpickles"),
        (lambda tmp, tiny: _corrupt_header(tmp), "header is not JSON"),
        (lambda tmp, tiny: _truncated(tmp), "is truncated"),
        (_missing_shard, "model-00002-of-00015.safetensors, which does not exist"),
        (lambda tmp, tiny: _no_weights_dir(tmp), "has no model.safetensors"),
    ],
    ids=[
        "missing-path",
        "not-safetensors",
        "pickle",
        "corrupt-header",
        "truncated",
        "missing-shard",
        "no-weights",
    ],
)
@pytest.mark.parametrize("side", ["a", "b"])
def test_bad_input_exits_2_with_one_line(
    tiny: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_bad,
    expected: str,
    side: str,
) -> None:
    bad = make_bad(tmp_path, tiny)
    a, b = (bad, tiny.hf) if side == "a" else (tiny.hf, bad)
    json_path = tmp_path / "never.json"
    code, out, err = run(capsys, a, b, json_path=json_path)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err and str(bad) in err
    assert not json_path.exists()
    with pytest.raises(UsageError):
        compare_checkpoints(a, b, progress=False)


def test_bad_options_exit_2(
    tiny: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, tiny.hf, tiny.fused, rtol=-1.0)[0] == 2
    assert run(capsys, tiny.hf, tiny.fused, json_path=tmp_path / "no" / "dir.json")[0] == 2
    assert run(capsys, tiny.hf, tiny.fused, top=-1)[0] == 2


# ------------------------------------------------------------------------------------------- numerics


def test_chunked_sums_match_float64_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (and values whose float32 squares overflow) give the float64 answer."""
    monkeypatch.setattr(comparison, "CHUNK_ELEMENTS", 7)
    monkeypatch.setattr(comparison, "TASK_ELEMENTS", 30)  # tensors split across tasks, tasks mixing tensors
    generator = torch.Generator().manual_seed(1)
    b_tensors = {
        "bf16": torch.randn(33, 5, generator=generator).to(torch.bfloat16),
        "huge": torch.randn(50, generator=generator) * 1e30,  # squares overflow float32
        "int": torch.arange(20, dtype=torch.int64),
    }
    a_tensors = {
        "bf16": (b_tensors["bf16"].float() + 0.01 * torch.randn(33, 5, generator=generator)).to(
            torch.bfloat16
        ),
        "huge": b_tensors["huge"] * 1.001,
        "int": b_tensors["int"] + 1,
    }
    a = save(tmp_path / "a.safetensors", a_tensors)
    b = save(tmp_path / "b.safetensors", b_tensors)
    report = compare_checkpoints(a, b, rtol=1.0, progress=False)
    assert not report.nonfinite
    rows = {t.name: t for t in report.tensors}
    for name in b_tensors:
        diff = a_tensors[name].double() - b_tensors[name].double()
        expected = diff.norm() / b_tensors[name].double().norm()
        assert rows[name].rel_err == pytest.approx(float(expected), rel=1e-6), name
        assert rows[name].max_abs_diff == pytest.approx(float(diff.abs().max()), rel=1e-6), name
    total_diff = sum((a_tensors[n].double() - b_tensors[n].double()).square().sum() for n in b_tensors)
    total_ref = sum(b_tensors[n].double().square().sum() for n in b_tensors)
    assert report.global_rel_err == pytest.approx(math.sqrt(total_diff / total_ref), rel=1e-6)


# ------------------------------------------------------------------------------------------ hf_layout


def test_split_and_fuse_round_trip_against_save_pretrained(tiny: SimpleNamespace) -> None:
    on_disk = load_file(str(tiny.hf / "model.safetensors"))
    split = split_expert_tensors(tiny.state)
    assert split.keys() == on_disk.keys()
    assert all(torch.equal(split[key], on_disk[key]) for key in on_disk)
    fused = fuse_expert_tensors(on_disk)
    assert fused.keys() == tiny.state.keys()
    assert all(torch.equal(fused[key], tiny.state[key]) for key in tiny.state)
    gate_up = tiny.state[f"{EXPERT_PREFIX}.gate_up_proj"]
    assert split[f"{EXPERT_PREFIX}.2.gate_proj.weight"].data_ptr() == gate_up[2].data_ptr()  # a view
    cloned = split_expert_tensors(tiny.state, clone=True)
    assert cloned[f"{EXPERT_PREFIX}.2.gate_proj.weight"].data_ptr() != gate_up[2].data_ptr()


def test_canonical_units_are_contiguous_views(tiny: SimpleNamespace) -> None:
    units = canonical_units({key: value.shape for key, value in tiny.state.items()})
    on_disk = load_file(str(tiny.hf / "model.safetensors"))
    assert units.keys() == on_disk.keys()
    for name, unit in units.items():
        source = tiny.state[unit.source_key]
        view = unit_view(source, unit)
        flat = source.reshape(-1)[unit.element_offset : unit.element_offset + unit.numel].view(unit.shape)
        assert view.is_contiguous() and torch.equal(view, on_disk[name]) and torch.equal(flat, view)


def test_fuse_rejects_incomplete_and_mixed_layouts(tiny: SimpleNamespace) -> None:
    on_disk = load_file(str(tiny.hf / "model.safetensors"))
    incomplete = {k: v for k, v in on_disk.items() if k != f"{EXPERT_PREFIX}.5.up_proj.weight"}
    with pytest.raises(ValueError, match="up_proj"):
        fuse_expert_tensors(incomplete)
    mixed = {**on_disk, f"{EXPERT_PREFIX}.down_proj": tiny.state[f"{EXPERT_PREFIX}.down_proj"]}
    with pytest.raises(ValueError, match="both"):
        fuse_expert_tensors(mixed)
    with pytest.raises(ValueError, match="one layout"):
        canonical_units({key: value.shape for key, value in mixed.items()})


# --------------------------------------------------------------------------------------------- command


def test_compare_weights_as_a_command(tiny: SimpleNamespace, tmp_path: Path) -> None:
    """`moectl compare-weights` itself: exit 0 on a match, 1 on a mismatch that only
    --per-tensor-rtol sees (with the --json report naming the tensor), 2 on bad input (one line,
    no report). The mismatch runs as a subprocess: the console entry point and its exit code."""
    report_path = tmp_path / "report.json"
    matched = run_moectl_in_process("compare-weights", str(tiny.hf), str(tiny.fused), "--rtol", "1e-7")
    assert matched.returncode == 0 and "MATCH" in matched.stdout, matched.stdout + matched.stderr

    state = {key: value.clone() for key, value in tiny.state.items()}
    state["model.norm.weight"] *= 1.05  # 5 % off, but a small share of the model's norm
    perturbed = save(tmp_path / "perturbed.safetensors", state)
    args = ["compare-weights", str(perturbed), str(tiny.hf), "--rtol", "0.03", "--json", str(report_path)]
    assert run_moectl_in_process(*args).returncode == 0  # the global error passes
    mismatch = run_moectl(*args, "--per-tensor-rtol", "1e-2")
    assert mismatch.returncode == 1, mismatch.stdout[-2000:] + mismatch.stderr[-2000:]
    assert "MISMATCH" in mismatch.stdout and "model.norm.weight" in mismatch.stdout
    report = json.loads(report_path.read_text())
    assert report["matched"] is False and report["per_tensor_rtol"] == 1e-2 and report["rtol"] == 0.03
    assert 0 < report["global"]["rel_err"] <= 0.03
    worst = report["tensors"][0]
    assert worst["name"] == "model.norm.weight" and worst["rel_err"] == pytest.approx(0.05, rel=1e-4)
    assert all(row["rel_err"] == 0.0 for row in report["tensors"][1:])

    report_path.unlink()
    bad = run_moectl_in_process(
        "compare-weights", str(tmp_path / "absent"), str(tiny.hf), "--json", str(report_path)
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    assert not report_path.exists()
