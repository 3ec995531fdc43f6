import json

import numpy as np
import pytest
import torch

from moectl.config import DataConfig
from moectl.data.sources import SyntheticData, build_data, rank_slice
from moectl.errors import UsageError


def test_synthetic_batch_is_a_pure_function_of_seed_and_step():
    a, b = SyntheticData(128, seed=3), SyntheticData(128, seed=3)
    assert torch.equal(a.global_batch(5, 8, 32).tokens, b.global_batch(5, 8, 32).tokens)
    assert not torch.equal(a.global_batch(5, 8, 32).tokens, a.global_batch(6, 8, 32).tokens)
    assert not torch.equal(
        a.global_batch(5, 8, 32).tokens, SyntheticData(128, seed=4).global_batch(5, 8, 32).tokens
    )


def test_synthetic_data_is_learnable_bigram():
    data = SyntheticData(128, seed=0)
    batch = data.global_batch(0, 4, 16).tokens
    assert torch.equal(batch[:, 1:], data.successor[batch[:, :-1]])


def test_rank_slices_tile_the_global_batch():
    batch = SyntheticData(128, seed=0).global_batch(2, 8, 16)
    pieces = [rank_slice(batch, rank, 4).tokens for rank in range(4)]
    assert all(piece.shape == (2, 17) for piece in pieces)
    assert torch.equal(torch.cat(pieces), batch.tokens)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_token_file(tmp_path, dtype):
    tokens = np.arange(1000, dtype=dtype) % 100
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    data = build_data(DataConfig(source=str(path), token_dtype=dtype), vocab_size=128, seed=0)
    batch = data.global_batch(0, 4, 10).tokens
    assert batch.shape == (4, 11)
    assert ((batch[:, 1:] - batch[:, :-1]) % 100 == 1).all()  # contiguous windows of the file
    again = build_data(DataConfig(source=str(path), token_dtype=dtype), 128, 0).global_batch(0, 4, 10)
    assert torch.equal(batch, again.tokens)


def test_npy_and_text_files(tmp_path):
    npy = tmp_path / "t.npy"
    np.save(npy, np.arange(500, dtype=np.int32) % 64)
    assert build_data(DataConfig(source=str(npy)), 64, 0).global_batch(1, 2, 8).tokens.shape == (2, 9)
    # Text is a corpus: without a tokenizer its bytes, each document ended by id 256, packed in rows.
    txt = tmp_path / "t.txt"
    txt.write_text("hello world " * 50)
    cfg = DataConfig(source=str(txt), cache_dir=str(tmp_path / "cache"), num_proc=1)
    batch = build_data(cfg, 512, 0, seq_len=8).global_batch(0, 2, 8)
    assert bytes(batch.tokens[0].tolist()).decode() in ("hello world " * 50)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(40)))
    cfg = DataConfig(source=str(jsonl), cache_dir=str(tmp_path / "cache"), num_proc=1)
    assert build_data(cfg, 512, 0, seq_len=8).global_batch(0, 2, 8).tokens.shape == (2, 9)


def test_token_ids_beyond_vocab_are_refused(tmp_path):
    path = tmp_path / "big.bin"
    np.array([1, 2, 300], dtype=np.uint16).repeat(50).tofile(path)
    with pytest.raises(UsageError, match="vocab_size"):
        build_data(DataConfig(source=str(path)), vocab_size=128, seed=0)
