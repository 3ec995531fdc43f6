"""A token cache of random documents with long-tailed lengths, for the packing benchmarks on a GPU machine
(no tokenizer, no `datasets`): `python bench/packed_cache.py DIR [--tokens N] [--mean-length L]`.

Lengths are log-normal (sigma 1.2, so a few documents run over several 4,096-token rows and many are a
few dozen tokens) scaled to the asked mean; tokens are uniform over Qwen3's vocabulary, each document
ended by EOS (151643, Qwen's <|endoftext|>).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moectl.data.cache import write_cache

EOS = 151_643
VOCAB = 151_936


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tokens", type=int, default=8_000_000)
    parser.add_argument("--mean-length", type=float, default=1_000.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sigma = 1.2
    lengths = rng.lognormal(np.log(args.mean_length) - sigma**2 / 2, sigma, size=args.tokens // 200)
    lengths = np.maximum(2, lengths.astype(np.int64))
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), args.tokens) + 1]
    documents = []
    for length in lengths:
        document = rng.integers(0, EOS, length, dtype=np.int64)
        document[-1] = EOS
        documents.append(document)
    write_cache(args.directory, documents, EOS, vocab_size=VOCAB)
    print(
        f"{args.directory}: {len(lengths):,} documents, {int(lengths.sum()):,} tokens, mean length "
        f"{lengths.mean():,.0f}, median {np.median(lengths):,.0f}, longest {lengths.max():,}"
    )


if __name__ == "__main__":
    main()
