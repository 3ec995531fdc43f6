"""`moectl export`: a step checkpoint of any layout becomes the HF model the run would have written at
that step (the layouts of tests/layouts.py checkpoint every 2 of their 8 steps, so the export of step 8
must be their final model/), transformers loads it to moectl's logits, memory stays near one tensor,
and bad input is one line with nothing written. The streaming writer behind both writes the files
save_pretrained writes."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.layouts import LAYOUTS
from tests.util import (
    NUMERICS_STEPS,
    REPO,
    load_weights,
    refused_in_process,
    run_moectl_in_process,
    train_run,
)

FINAL_STEP = f"step_{NUMERICS_STEPS:06d}"


def _export(checkpoint: Path, out: Path, *flags: str) -> None:
    result = run_moectl_in_process("export", str(checkpoint), str(out), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("exported step"), result.stdout


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_of_the_last_step_is_the_final_model(name, trained, tmp_path):
    """Every layout's checkpoint (FSDP shards, tp's permuted gate/up rows, ep's expert slices) exports
    to exactly its final model/: compare-weights finds no difference, and the weight files are the same
    bytes."""
    run = trained(name)
    out = tmp_path / "exported"
    _export(run / "checkpoints" / FINAL_STEP, out)
    compared = run_moectl_in_process(
        "compare-weights", str(out), str(run / "model"), "--rtol", "0", "--per-tensor-rtol", "0"
    )
    assert compared.returncode == 0 and "MATCH" in compared.stdout, compared.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (run / "model").iterdir())
    for file in out.glob("*.safetensors"):
        assert filecmp.cmp(file, run / "model" / file.name, shallow=False), file.name


def _moectl_model_from_checkpoint(run: Path, step_dir: Path) -> torch.nn.Module:
    """moectl's own model with the checkpoint's weights, read by torch.distributed.checkpoint directly."""
    import torch.distributed.checkpoint as dcp

    from moectl.config import build_config
    from moectl.io.checkpoint import placeholder_source, single_process_is_fine
    from moectl.model.build import build_meta_model, materialize

    cfg = build_config(str(run / "config.yaml"))
    model = build_meta_model(cfg.model, torch.float32)
    materialize(model, torch.device("cpu"), placeholder_source)
    with single_process_is_fine():
        dcp.load({"model": dict(model.state_dict())}, checkpoint_id=str(step_dir), no_dist=True)
    return model.eval()


def test_transformers_loads_an_export_to_moectls_logits(trained, tmp_path):
    """A mid-run step of a dp × tp run (step 6: no model/ exists for it), sharded and in bfloat16 too:
    `AutoModelForCausalLM.from_pretrained` of the export gives the logits of moectl's model holding the
    checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    run = trained("mixed")
    step_dir = run / "checkpoints" / "step_000006"
    reference = _moectl_model_from_checkpoint(run, step_dir)
    tokens = torch.randint(
        0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits

    out = tmp_path / "fp32"
    _export(step_dir, out, "--max-shard-size", "100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, rtol=1e-5, atol=1e-5)

    half = tmp_path / "bf16"
    _export(step_dir, half, "--dtype", "bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_weights(half)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    full = load_weights(out)
    assert all(torch.equal(weights[k], full[k].to(torch.bfloat16)) for k in full)


def test_the_streaming_writer_writes_what_save_pretrained_writes(tmp_path):
    """Same files, byte for byte, as transformers' save_pretrained of the same weights, tied embeddings
    and bfloat16 included."""
    from transformers import Qwen3MoeForCausalLM

    from moectl.config import build_config
    from moectl.io.hf import save_hf_model
    from moectl.model.build import build_meta_model, hf_config, materialize, random_init_source

    for tied, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        cfg = build_config("tiny").model
        cfg.tie_word_embeddings = tied
        model = build_meta_model(cfg, torch.float32)
        materialize(model, torch.device("cpu"), random_init_source(cfg, 3))
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        mine, theirs = tmp_path / f"mine-{tied}", tmp_path / f"theirs-{tied}"
        save_hf_model(state, hf_config(cfg), mine)
        with torch.device("meta"):
            reference = Qwen3MoeForCausalLM(hf_config(cfg))
        reference.load_state_dict(state, assign=True, strict=True)
        reference.tie_weights()
        reference.save_pretrained(theirs)
        names = sorted(p.name for p in theirs.iterdir())
        assert sorted(p.name for p in mine.iterdir()) == names
        for name in names:
            assert filecmp.cmp(mine / name, theirs / name, shallow=False), (tied, dtype, name)


def _word_tokenizer(directory: Path) -> Path:
    """A small word-level tokenizer made here (no download), saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", *"the cat sat on a mat and dog ran far".split()]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(directory))
    return directory


def test_a_run_with_a_tokenizer_exports_it_beside_the_weights(tmp_path):
    """data.tokenizer: the export and model/ both hold the tokenizer, which encodes as the run's did;
    --no-tokenizer leaves it out."""
    from transformers import AutoTokenizer

    tokenizer_dir = _word_tokenizer(tmp_path / "tokenizer")
    text = tmp_path / "stories.txt"
    text.write_text("the cat sat on a mat and the dog ran far\n" * 200)
    run = train_run(
        tmp_path / "run", "--data", str(text), "--set", f"data.tokenizer={tokenizer_dir}",
        "--steps", "2", "--global-batch", "8", "--micro-batch", "2", "--checkpoint-every", "2",
        in_process=True,
    )  # fmt: skip
    sample = "the dog sat on the mat"
    expected = AutoTokenizer.from_pretrained(str(tokenizer_dir))(sample)["input_ids"]
    out = tmp_path / "exported"
    _export(run / "checkpoints" / "step_000002", out)
    for directory in (out, run / "model"):
        assert (directory / "tokenizer.json").is_file(), sorted(p.name for p in directory.iterdir())
        assert AutoTokenizer.from_pretrained(str(directory))(sample)["input_ids"] == expected
    bare = tmp_path / "bare"
    _export(run / "checkpoints" / "step_000002", bare, "--no-tokenizer")
    assert sorted(p.name for p in bare.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


# The export in a fresh interpreter: the growth of its resident memory over the export alone (the peak
# is reset once the imports are done: building a tiny model on the meta device imports transformers'
# Qwen3-MoE code, about 90 MiB), against the size of its largest tensor and of the whole model.
MEASURE = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    from moectl.config import build_config
    from moectl.io.export import export_checkpoint
    from moectl.io.hf_writer import saved_tensor_shapes
    from moectl.model.build import hf_config

    saved_tensor_shapes(hf_config(build_config("tiny").model))

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text())[1])

    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS")
    export_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({"growth_bytes": (kib("VmHWM") - before) * 1024}))
    """
)


def _wide_checkpoint(run_dir: Path) -> Path:
    """A step checkpoint of a model of 12 layers whose experts are 8 MiB tensors (155 MiB in all),
    written by the checkpoint writer training uses (no training: the weights do not matter here)."""
    from moectl.config import build_config
    from moectl.io.checkpoint import save_checkpoint
    from moectl.io.outputs import create_run_dir
    from moectl.model.build import build_meta_model, materialize, random_init_source
    from moectl.parallel.dims import ParallelDims
    from moectl.run.loop import build_optimizer
    from strategies.single import Single

    model_keys = dict(vocab_size=8192, hidden_size=128, num_layers=12, num_heads=2, num_kv_heads=1,
                      head_dim=64, num_experts=16, top_k=2, moe_intermediate_size=512)  # fmt: skip
    cfg = build_config("tiny", {"model": model_keys, "train": {"momentum": 0.0}})
    create_run_dir(run_dir, cfg.to_yaml())
    model = build_meta_model(cfg.model, torch.float32)
    materialize(model, torch.device("cpu"), random_init_source(cfg.model, 0))
    strategy = Single(ParallelDims(1), cfg.model, cfg.parallel)
    return save_checkpoint(run_dir, 1, model, build_optimizer(model, cfg.train), strategy, keep=0)


def test_export_memory_stays_near_the_largest_tensor(tmp_path):
    """Exporting a model of 155 MiB whose largest tensors are 8 MiB grows the process by about two of
    them (DCP's read and the tensor it is copied into) and some fixed overhead, never by the model.
    (Measured: 26 MiB here; 33 MiB for a model of 280 MiB with 16 MiB tensors.)"""
    from moectl.io.export import CheckpointModelReader

    checkpoint = _wide_checkpoint(tmp_path / "run")
    reader = CheckpointModelReader(checkpoint)
    sizes = [entry.size.numel() * entry.properties.dtype.itemsize for entry in reader.tensors.values()]
    largest, total = max(sizes), sum(sizes)
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint), str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth_bytes"]
    bound = 3 * largest + (16 << 20)
    assert total > 3.5 * bound, "the model is too small for the measurement to tell"
    assert growth < bound, (
        f"export grew by {growth >> 20} MiB; largest tensor {largest >> 20} MiB, model {total >> 20} MiB"
    )
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) > total - (1 << 20)


# ---- bad input: one line, exit code 2, nothing written -------------------------------------------
def _run_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _cut_short(run: Path) -> Path:
    (run / "checkpoints" / FINAL_STEP / "COMPLETE").unlink()
    return run / "checkpoints" / FINAL_STEP


def _partial(run: Path) -> Path:
    partial = run / "checkpoints" / f".{FINAL_STEP}.partial"
    (run / "checkpoints" / FINAL_STEP).rename(partial)
    return partial


def _truncated(run: Path) -> Path:
    shard = run / "checkpoints" / FINAL_STEP / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.parent


def _without_config(run: Path) -> Path:
    (run / "config.yaml").unlink()
    return run / "checkpoints" / FINAL_STEP


def _other_model(run: Path) -> Path:
    config = run / "config.yaml"
    config.write_text(re.sub(r"num_experts: \d+", "num_experts: 4", config.read_text()))
    return run / "checkpoints" / FINAL_STEP


def _gone_tokenizer(run: Path) -> Path:
    config = run / "config.yaml"
    text, count = re.subn(r"(?m)^(  tokenizer:).*$", rf"\1 {run / 'no-such-tokenizer'}", config.read_text())
    assert count == 1, "config.yaml names no data.tokenizer"
    config.write_text(text)
    return run / "checkpoints" / FINAL_STEP


BAD_CHECKPOINTS = {
    "missing": (lambda run: run / "checkpoints" / "step_999999", "no such checkpoint"),
    "not-a-checkpoint": (lambda run: run / "checkpoints", "is not a moectl checkpoint"),
    "cut-short": (_cut_short, "cut short"),
    "partial": (_partial, "cut short"),
    "truncated-shard": (_truncated, "the checkpoint is damaged"),
    "no-config": (_without_config, "config.yaml not found"),
    "config-of-another-model": (_other_model, "does not match"),
    "tokenizer-gone": (_gone_tokenizer, "--no-tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_and_nothing_written(case, trained, tmp_path, capsys):
    make, message = BAD_CHECKPOINTS[case]
    checkpoint = make(_run_copy(trained("single"), tmp_path))
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    refused_in_process(["export", str(checkpoint), str(out_parent / "model")], capsys, message)
    assert list(out_parent.iterdir()) == []


def test_output_that_exists_and_is_not_empty_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    checkpoint = trained("single") / "checkpoints" / FINAL_STEP
    refused_in_process(["export", str(checkpoint), str(out)], capsys, "already exists and is not empty")
    refused_in_process(["export", str(checkpoint), str(out / "notes.txt")], capsys, "already exists")
    refused_in_process(
        ["export", str(checkpoint), str(tmp_path / "new"), "--max-shard-size", "lots"],
        capsys,
        "--max-shard-size",
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
