"""Corpora: sources read through `datasets`, the token cache, packed rows with document masking, chat
targets and the validation split. (Every layout on packed chat data: the shared layouts, tests/conftest.py
`layout_data`; bad corpora: tests/test_bad_inputs.py.)"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from moectl.config import build_config
from moectl.data.cache import BuildSettings, TokenCache, ensure_cache, write_cache
from moectl.data.packing import IGNORE_INDEX, Batch, PackedDocuments, split_validation
from moectl.data.tokenizer import BYTE_EOS, load_tokenizer, render_chat
from moectl.model.build import build_meta_model, materialize, random_init_source
from moectl.model.loss import build_token_loss
from tests.corpus import (
    CHAT_TEMPLATE,
    conversations,
    make_tokenizer,
    save_chat_dataset,
    texts,
    write_chat_jsonl,
    write_parquet_shards,
)
from tests.util import REPO

EOS = 1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok")


def _cache(path: Path, sizes: list[int], chat: bool, seed: int = 0) -> TokenCache:
    """Documents of random tokens (never EOS inside), each ended by EOS; chat: targets in a middle span
    of each document (an "assistant turn") and on nothing else."""
    rng = np.random.default_rng(seed)
    documents, targets = [], []
    for size in sizes:
        document = rng.integers(2, 128, size)
        document[-1] = EOS
        documents.append(document)
        flags = np.zeros(size, dtype=np.uint8)
        flags[size // 3 : size - 1] = 1
        targets.append(flags)
    return TokenCache(write_cache(path, documents, EOS, targets if chat else None, vocab_size=128))


# ---- a packed document trains as it does alone ---------------------------------------------------
def _tiny_model(chunk_tokens: int):
    cfg = build_config("tiny").model
    model = build_meta_model(cfg, torch.float32)
    loss_fn = build_token_loss(model, chunk_tokens, compiled=False)
    materialize(model, torch.device("cpu"), random_init_source(cfg, seed=3))
    return model, loss_fn


def _loss_and_grads(model, loss_fn, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, 1.0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale > 0 else (a - b).norm().item()


@pytest.mark.parametrize("chunk_tokens", [0, 16], ids=["logits", "chunked-loss"])
@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_a_packed_document_gets_the_loss_and_gradients_it_gets_alone(tmp_path, chat, chunk_tokens):
    """A row of three documents: with only document k's targets counted, the packed row's summed loss
    and every parameter's gradient equal document k trained alone (fp32, ≤ 1e-6), under both loss
    paths; without document masking the same row does not (the test can tell)."""
    sizes = [10, 17, 13]
    cache = _cache(tmp_path / "cache", sizes, chat)
    seq_len = sum(sizes) - 1  # one row holds the three documents exactly
    packed = PackedDocuments(cache, np.arange(3), seq_len, seed=0, shuffle=False).batch(0, 1)
    assert torch.equal(packed.tokens[0], torch.from_numpy(np.asarray(cache.tokens, dtype=np.int64)))
    assert packed.position_ids[0].tolist() == [i for size in sizes for i in range(size)][:seq_len]
    model, loss_fn = _tiny_model(chunk_tokens)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    # The predictions across a document boundary (an EOS predicting the next document's first token)
    assert (packed.targets[0, starts[1:-1] - 1] == IGNORE_INDEX).all()
    for k in range(len(sizes)):
        alone_tokens = packed.tokens[:, starts[k] : starts[k + 1]]
        alone_labels = alone_tokens[:, 1:].clone()
        if chat:
            flags = torch.from_numpy(np.asarray(cache.targets[starts[k] : starts[k + 1]], dtype=bool))
            alone_labels[:, ~flags[1:]] = IGNORE_INDEX
        alone = Batch(alone_tokens, alone_labels)
        only_k = torch.full_like(packed.targets, IGNORE_INDEX)
        span = slice(starts[k], starts[k + 1] - 1)  # the predictions made from document k's tokens
        only_k[:, span] = packed.targets[:, span]
        assert torch.equal(only_k[:, span], alone_labels), "the packed row's targets of document k"
        packed_k = Batch(packed.tokens, only_k, packed.position_ids)

        alone_loss, alone_grads = _loss_and_grads(model, loss_fn, alone)
        packed_loss, packed_grads = _loss_and_grads(model, loss_fn, packed_k)
        assert abs(packed_loss - alone_loss) <= 1e-6 * abs(alone_loss), (k, packed_loss, alone_loss)
        assert packed_grads.keys() == alone_grads.keys()
        worst = max(_relative(packed_grads[n], alone_grads[n]) for n in alone_grads)
        assert worst <= 1e-6, (k, worst)
        if k > 0:  # the document after another one: without masks it would see its predecessor
            unmasked_loss, _ = _loss_and_grads(model, loss_fn, Batch(packed.tokens, only_k))
            assert abs(unmasked_loss - alone_loss) > 1e-3 * abs(alone_loss), (k, unmasked_loss, alone_loss)


# ---- rows ---------------------------------------------------------------------------------------
def test_packed_rows_are_a_pure_function_of_seed_and_step_and_cover_every_document(tmp_path):
    sizes = [5, 40, 3, 90, 12, 7, 30, 1 + 1, 60, 25]
    cache = _cache(tmp_path / "cache", sizes, chat=False)
    seq_len = 16
    data = PackedDocuments(cache, np.arange(len(sizes)), seq_len, seed=4)
    again = PackedDocuments(cache, np.arange(len(sizes)), seq_len, seed=4)
    other_seed = PackedDocuments(cache, np.arange(len(sizes)), seq_len, seed=5)
    rows = data.rows_per_epoch
    assert rows == (sum(sizes) - 1) // seq_len
    first = data.global_batch(3, 4, seq_len)
    assert torch.equal(first.tokens, again.global_batch(3, 4, seq_len).tokens)
    assert not torch.equal(first.tokens, other_seed.global_batch(3, 4, seq_len).tokens)
    # One epoch's rows, end to end, are its documents in its order (rows overlap by the one next token).
    epoch = data.batch(0, rows)
    stream = torch.cat([epoch.tokens[0]] + [row[1:] for row in epoch.tokens[1:]])
    order, _ = data._epoch(0)
    documents = [np.asarray(cache.tokens[cache.offsets[d] : cache.offsets[d + 1]]) for d in order]
    assert stream.tolist() == np.concatenate(documents)[: len(stream)].tolist()
    assert sorted(order.tolist()) == list(range(len(sizes)))
    # Positions restart at every document and at every row; a document's first token is no target.
    starts = set(np.cumsum([0] + [len(d) for d in documents]).tolist())
    for r in range(rows):
        for i in range(seq_len):
            position = r * seq_len + i
            begins = position in starts or i == 0
            assert (epoch.position_ids[r, i] == 0) == begins, (r, i)
            assert (epoch.targets[r, i] == IGNORE_INDEX) == (position + 1 in starts), (r, i)
    # The next epoch: another order of the same documents.
    assert not np.array_equal(data._epoch(1)[0], order)
    assert torch.equal(data.global_batch(rows, 1, seq_len).tokens[0], data.batch(rows, 1).tokens[0])


def test_without_packing_each_row_is_one_document_padded_or_cut(tmp_path):
    cache = _cache(tmp_path / "cache", [5, 30], chat=False)
    data = PackedDocuments(cache, np.arange(2), 16, seed=0, packing=False, shuffle=False)
    batch = data.batch(0, 2)
    assert batch.position_ids is None and data.rows_per_epoch == 2
    short, cut = batch.tokens, batch.targets
    assert short[0, :5].tolist() == np.asarray(cache.tokens[:5]).tolist()
    assert (short[0, 5:] == EOS).all() and (cut[0, 4:] == IGNORE_INDEX).all() and (cut[0, :4] >= 0).all()
    assert short[1].tolist() == np.asarray(cache.tokens[5:22]).tolist() and (cut[1] >= 0).all()


def test_validation_holds_out_whole_documents_the_same_for_every_seed():
    train, held_out = split_validation(1000, 0.05)
    assert len(held_out) == 50 and len(train) == 950
    assert not set(train) & set(held_out)
    again, same = split_validation(1000, 0.05)
    assert np.array_equal(held_out, same) and np.array_equal(train, again)
    assert len(split_validation(10, 0.01)[1]) == 1  # at least one document


# ---- chat ---------------------------------------------------------------------------------------
def test_chat_targets_are_the_assistant_turns(tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    chat = conversations(4, seed=2)[0]
    ids, flags = render_chat(tokenizer, chat, "row 0")
    assert ids[-1] == tokenizer.eos_token_id and flags[-1] == 0
    said = tokenizer.decode([t for t, f in zip(ids, flags, strict=True) if f])
    expected = "".join(turn["content"] + "<|im_end|>\n" for turn in chat if turn["role"] == "assistant")
    assert said == expected
    assert tokenizer.decode(ids[:-1]) == tokenizer.apply_chat_template(chat, tokenize=False)
    # A template with {% generation %} markers goes through transformers' own assistant mask: the same
    marked = CHAT_TEMPLATE.replace(
        "{{ m['content'] }}<|im_end|>\n",
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}",
    )
    tokenizer.chat_template = marked
    assert render_chat(tokenizer, chat, "row 0") == (ids, flags)


# ---- sources and the cache ----------------------------------------------------------------------
def _build(source: Path, cache_dir: Path, tokenizer: Path | None, fmt: str = "text", column: str = "text"):
    notes: list[str] = []
    settings = BuildSettings(str(source), str(tokenizer) if tokenizer else None, fmt, column, num_proc=2)
    return TokenCache(ensure_cache(settings, cache_dir, notes.append)), notes


def test_sources_read_through_datasets_in_name_order(tmp_path, tokenizer_dir):
    documents = texts(30, seed=5)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    parquet = write_parquet_shards(tmp_path / "parquet", documents, shards=3)
    cache, notes = _build(parquet, tmp_path / "cache", tokenizer_dir)
    in_shard_order = [doc for shard in range(3) for doc in documents[shard::3]]
    expected = [tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id] for doc in in_shard_order]
    assert np.asarray(cache.tokens).tolist() == [t for ids in expected for t in ids]
    assert cache.num_documents == 30 and len(notes) == 1 and notes[0].startswith("tokenized 30 documents")

    (tmp_path / "txt").mkdir()
    for index, doc in enumerate(documents[:4]):
        (tmp_path / "txt" / f"{index:02d}.txt").write_text(doc)
    by_file, _ = _build(tmp_path / "txt", tmp_path / "cache", None)  # byte-level: bytes, then 256
    assert np.asarray(by_file.tokens).tolist() == [
        b for doc in documents[:4] for b in [*doc.encode(), BYTE_EOS]
    ]

    chats = conversations(6, seed=3)
    from_jsonl, _ = _build(
        write_chat_jsonl(tmp_path / "c.jsonl", chats), tmp_path / "cache", tokenizer_dir, "chat", "messages"
    )
    from_disk, _ = _build(
        save_chat_dataset(tmp_path / "saved", chats), tmp_path / "cache", tokenizer_dir, "chat", "messages"
    )
    rendered = [render_chat(tokenizer, chat, "") for chat in chats]
    for cache in (from_jsonl, from_disk):
        assert np.asarray(cache.tokens).tolist() == [t for ids, _ in rendered for t in ids]
        assert np.asarray(cache.targets).tolist() == [f for _, flags in rendered for f in flags]


def _build_in_child(args) -> None:
    source, cache_dir, out = args
    notes: list[str] = []
    ensure_cache(BuildSettings(source, None, "text", "text", num_proc=1), Path(cache_dir), notes.append)
    Path(out).write_text(json.dumps(notes))


def test_the_cache_is_built_once_shared_and_keyed_by_the_content(tmp_path):
    source = write_parquet_shards(tmp_path / "corpus", texts(400, seed=6), shards=2)
    cache_dir = tmp_path / "cache"
    jobs = [(str(source), str(cache_dir), str(tmp_path / f"notes{i}.json")) for i in range(2)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_build_in_child, jobs)
    notes = [json.loads(Path(job[2]).read_text()) for job in jobs]
    builds = [line for said in notes for line in said if line.startswith("tokenized ")]
    assert len(builds) == 1, notes  # one process built it; the other waited for it, or found it done
    built = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and not [p for p in cache_dir.iterdir() if ".tmp-" in p.name]
    again, said = _build(source, cache_dir, None)
    assert said == [] and again.path == built[0]
    write_parquet_shards(source, texts(401, seed=6), shards=2)  # a changed file: another cache
    changed, said = _build(source, cache_dir, None)
    assert changed.path != built[0] and changed.num_documents == 401 and said


# ---- the README's corpus commands ----------------------------------------------------------------
def _corpus_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Training on a corpus") :]
    block = section[
        section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)
    ]
    return [line.strip() for line in block.strip().splitlines()]


@pytest.mark.readme(*_corpus_commands())
def test_the_readme_pretrains_on_parquet_and_fine_tunes_on_chat_as_printed(readme_run):
    """The README's commands as printed, on the small corpus, chats and tokenizer `readme_run` makes: the
    cache `data prepare` built is the one the pre-training maps; both runs report a validation loss; the
    fine-tuning starts from the pre-trained model and learns only the assistant turns."""
    prepare, pretrain, finetune = _corpus_commands()
    results = [readme_run(command) for command in (prepare, pretrain, finetune)]
    for command, result in zip((prepare, pretrain, finetune), results, strict=True):
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "tokenized 2,000 documents" in results[0].stdout, results[0].stdout
    assert "tokenized" not in results[1].stdout  # the cache of `data prepare`, mapped
    assert "data: 1,800 documents" in results[1].stdout and "validation: 200 documents" in results[1].stdout
    for name, evaluated in (("pretrain", [10, 20, 30, 40]), ("chat", [20])):
        run = readme_run.cwd / "runs" / name
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [n for n, r in enumerate(records, 1) if "val_loss" in r] == evaluated  # after steps 10, 20, …
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_val_loss"] == records[-1]["val_loss"] and summary["final_val_ppl"] > 1
        assert records[-1]["loss"] < records[0]["loss"]
    chat_records = [
        json.loads(line) for line in (readme_run.cwd / "runs/chat/metrics.jsonl").read_text().splitlines()
    ]
    assert all(0 < r["target_tokens"] < 16 * 64 / 2 for r in chat_records)  # assistant turns only
    assert "val loss" in results[2].stdout and "validation   loss" in results[2].stdout


def test_evaluation_leaves_routing_and_gradients_alone(tmp_path):
    """A validation pass moves no router bias, adds nothing to the expert load, leaves no gradient and
    gives back a token-weighted loss: the sum over its batches' targets ÷ their count."""
    from moectl.model.routing import Routing
    from moectl.parallel.dims import ParallelDims
    from moectl.run.loop import evaluate
    from strategies.single import Single

    cfg = build_config("tiny", {"train": {"router_bias_update": 0.01, "global_batch": 4, "micro_batch": 2}})
    model, loss_fn = _tiny_model(0)
    routing = Routing(model, cfg.model, cfg.train, torch.device("cpu"))
    biases = [bias.clone() for bias in routing.biases()]
    cache = _cache(tmp_path / "cache", [30, 50, 20, 70, 40, 25], chat=True)
    validation = PackedDocuments(cache, np.arange(6), 16, seed=0, shuffle=False)
    figures = evaluate(
        model,
        Single(ParallelDims(1), cfg.model, cfg.parallel),
        validation,
        cfg.train,
        loss_fn,
        torch.device("cpu"),
    )
    assert all(torch.equal(a, b) for a, b in zip(routing.biases(), biases, strict=True))
    assert not routing.step_load.any() and not routing.total_load.any()
    assert all(p.grad is None for p in model.parameters()) and model.training
    batches = validation.rows_per_epoch // 4
    assert batches == 3
    total = count = 0
    with torch.no_grad():
        for index in range(batches):
            batch = validation.batch(index * 4, 4)
            total += loss_fn(model, batch, 1.0).item()
            count += batch.num_targets()
    assert figures["val_tokens"] == count and figures["val_loss"] == pytest.approx(total / count, rel=1e-6)
    assert figures["val_ppl"] == pytest.approx(np.exp(total / count), rel=1e-6)
