"""Small real corpora for the tests, made on the spot (no downloads): a BPE tokenizer trained with the
`tokenizers` library and saved as transformers saves one (with a chat template that ends each turn),
text documents and chat conversations, written as parquet shards, jsonl or a `datasets.save_to_disk`
directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

#: Qwen's turn markers; the template has no {% generation %} markers, as Qwen's has none
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "the cat sat on a mat and dog ran to park with ball red blue green big small one two three it was "
    "then we saw old new tree house"
).split()
#: the tiny preset's vocab_size is 128: the tokenizer fits under it
TOKENIZER_VOCAB = 120


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def texts(count: int, seed: int = 0, longest: int = 60) -> list[str]:
    """Documents of 3 to `longest` words (a long tail: some run over a 64-token row)."""
    rng = random.Random(seed)
    return [sentence(rng, min(longest, int(rng.paretovariate(1.2) * 4) + 2)) for _ in range(count)]


def conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """User / assistant exchanges of one to three rounds, some opening with a system turn."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        turns = [{"role": "system", "content": sentence(rng, 3)}] if index % 4 == 0 else []
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": sentence(rng, rng.randint(2, 10))})
            turns.append({"role": "assistant", "content": sentence(rng, rng.randint(2, 16))})
        out.append(turns)
    return out


def make_tokenizer(directory: Path, chat_template: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = texts(200, seed=99) + ["system user assistant\n"] * 20
    tokenizer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def write_parquet_shards(
    directory: Path, documents: list[str], shards: int = 3, column: str = "text"
) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        part = documents[shard::shards]
        table = pa.table({column: part, "id": list(range(len(part)))})
        pq.write_table(table, directory / f"part-{shard:05d}.parquet")
    return directory


def write_chat_jsonl(path: Path, chats: list[list[dict[str, str]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": turns}) + "\n" for turns in chats))
    return path


def save_chat_dataset(directory: Path, chats: list[list[dict[str, str]]]) -> Path:
    import datasets

    datasets.Dataset.from_dict({"messages": chats}).save_to_disk(str(directory))
    return directory


def make_readme_files(directory: Path) -> None:
    """What the README's corpus commands read, in the directory they run from: `tokenizer/`, `corpus/`
    (parquet shards of text) and `chats/train.jsonl`, `chats/val.jsonl`."""
    make_tokenizer(directory / "tokenizer")
    write_parquet_shards(directory / "corpus", texts(2000, seed=11), shards=4)
    write_chat_jsonl(directory / "chats" / "train.jsonl", conversations(400, seed=12))
    write_chat_jsonl(directory / "chats" / "val.jsonl", conversations(80, seed=13))
