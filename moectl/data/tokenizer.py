"""Text to token ids: a local tokenizer directory (transformers' AutoTokenizer, never the network) or the
byte-level fallback, and chat conversations rendered with the tokenizer's own chat template, each token
marked as a training target or not (only assistant turns are targets).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moectl.errors import UsageError
from moectl.io.paths import require_directory

TOKENIZER_FIX = "give data.tokenizer a local tokenizer directory"

#: the byte-level fallback: token ids 0-255 are bytes, 256 ends a document
BYTE_EOS = 256
BYTE_VOCAB = 257
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ByteTokenizer:
    """UTF-8 bytes as token ids, and one end-of-document id after them (no chat template)."""

    eos_token_id = BYTE_EOS
    chat_template = None

    def __len__(self) -> int:
        return BYTE_VOCAB

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]


def load_tokenizer(directory: str | None) -> Any:
    """The tokenizer of a local directory (AutoTokenizer, local files only), or ByteTokenizer for None."""
    if directory is None:
        return ByteTokenizer()
    path = require_directory(
        Path(directory), "tokenizer directory", "give data.tokenizer a local tokenizer directory"
    )
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here; all mean "not a usable tokenizer"
        raise UsageError(
            f"cannot load a tokenizer from {path} ({type(exc).__name__}); check the directory"
        ) from None
    if tokenizer.eos_token_id is None:
        raise UsageError(
            f"the tokenizer in {path} has no end-of-sequence token (eos_token); packing needs one to end "
            "each document: set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def tokenizer_fingerprint(directory: str | None) -> str:
    """Hash of every file of the tokenizer directory (names and contents): a changed tokenizer is a new
    token cache. 'bytes' for the byte-level fallback."""
    if directory is None:
        return "bytes"
    require_directory(Path(directory), "tokenizer directory", TOKENIZER_FIX)
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(directory)).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def check_chat_template(tokenizer: Any, directory: str | None) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        where = (
            f"the tokenizer in {directory}" if directory else "the byte-level fallback (no data.tokenizer)"
        )
        raise UsageError(
            f"data.format=chat renders conversations with the tokenizer's chat template, and {where} has "
            "none; give --set data.tokenizer=DIR of a tokenizer with a chat template (chat_template.jinja)"
        )


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, each ended by the tokenizer's EOS (added when not there already)."""
    if isinstance(tokenizer, ByteTokenizer):
        encoded = tokenizer.encode_texts(texts)
    else:
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    for ids in encoded:
        if not ids or ids[-1] != eos:
            ids.append(eos)
    return encoded


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not all(
        isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
        for turn in messages
    ):
        raise UsageError(f"{where} is not a list of {{role, content}} turns with string values")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], text: str, where: str
) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the whole rendered conversation), found by
    rendering prefixes: the prompt up to turn i (with the generation prompt) and up to its end.

    Why prefixes: most chat templates (Qwen's among them) have no {% generation %} markers, which
    transformers' own assistant mask needs. A template that renders an earlier turn differently once later
    turns follow cannot be split this way; it gets one line asking for the markers.
    """
    spans = []
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[: index + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise UsageError(
                f"{where}: the chat template renders turn {index + 1} differently once later turns follow, "
                "so its assistant tokens cannot be found by rendering prefixes; add {% generation %} "
                "markers around the assistant content in the template"
            )
        spans.append((len(before), len(through)))
    return spans


def render_chat(tokenizer: Any, messages: Any, where: str) -> tuple[list[int], list[int]]:
    """(token ids, target flags) of one conversation rendered with the tokenizer's chat template and
    ended by EOS: flag 1 for assistant tokens (the template's own turn end included), 0 otherwise."""
    messages = _check_messages(messages, where)
    template = tokenizer.chat_template
    if _GENERATION_MARKER.search(template if isinstance(template, str) else str(template)):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, flags = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        text = _render(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, text, where)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        flags = [
            int(start < end and any(lo <= start < hi for lo, hi in spans))
            for start, end in encoded["offset_mapping"]
        ]
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
        flags.append(0)
    return ids, flags
