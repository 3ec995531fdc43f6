"""Documents packed into training rows, and the batches the loop trains on.

Packing (`data.packing`, on by default): the documents of an epoch, in an order drawn from (seed, epoch),
are laid back to back (each ended by EOS) and cut into rows of seq_len + 1 tokens (inputs and the next
token), a long document continuing into the next row. With document masking (`data.document_masking`,
on by default) every piece of a document in a row gets positions that restart at 0; transformers'
attention masks read those restarts as sequence boundaries (`masking_utils.find_packed_sequence_indices`),
so a token never attends to another document, and the token after a document's EOS (the next document's
first) is no target. Packed this way a document gets the loss and gradients it gets alone.

Without packing each row is one document, cut after seq_len + 1 tokens and padded with EOS tokens that
are no targets (causal attention keeps the padding out of every real token's view).

Global row g of the run is row g mod R of epoch g div R (R rows per epoch), so the global batch of step s
(rows s·G … s·G + G − 1) is a pure function of (seed, step): every layout reads the same rows, and a resume
reads on where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moectl.data.cache import TokenCache

#: label of a token that is not a training target (torch's cross-entropy default ignore_index)
IGNORE_INDEX = -100
#: documents held out by data.val_fraction are drawn with this seed, not the run's: every run of a corpus
#: holds out the same documents, whatever its seed
VALIDATION_SEED = 20_241_129


@dataclass
class Batch:
    """Rows of seq_len + 1 tokens, and how to train on them: `targets` [rows, seq_len] are the labels
    (IGNORE_INDEX where a token is no target; None: every next token is one), `position_ids` restart at
    every document of a packed row (None: 0 … seq_len − 1)."""

    tokens: torch.Tensor
    targets: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens[:, 1:] if self.targets is None else self.targets

    @property
    def masked(self) -> bool:
        return self.targets is not None

    def num_targets(self) -> int:
        if self.targets is None:
            return self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def _map(self, fn) -> Batch:
        return Batch(
            fn(self.tokens),
            None if self.targets is None else fn(self.targets),
            None if self.position_ids is None else fn(self.position_ids),
        )

    def rows(self, start: int, stop: int) -> Batch:
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def split(self, rows: int) -> list[Batch]:
        return [self.rows(start, start + rows) for start in range(0, self.num_rows, rows)]


class PackedDocuments:
    """Rows of seq_len + 1 tokens over some documents of a token cache (see the module's docstring)."""

    def __init__(
        self,
        cache: TokenCache,
        documents: np.ndarray,
        seq_len: int,
        seed: int,
        packing: bool = True,
        document_masking: bool = True,
        shuffle: bool = True,
    ):
        self.cache = cache
        self.documents = np.asarray(documents, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.packing = packing
        self.document_masking = document_masking and packing
        self.shuffle = shuffle
        self.starts = np.asarray(cache.offsets[:-1], dtype=np.int64)
        self.lengths = cache.lengths().astype(np.int64)
        self.num_tokens = int(self.lengths[self.documents].sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def rows_per_epoch(self) -> int:
        if not self.packing:
            return len(self.documents)
        return max(0, (self.num_tokens - 1) // self.seq_len)

    @property
    def is_masked(self) -> bool:
        return self.cache.targets is not None or self.document_masking or not self.packing

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, where each starts in the epoch's token stream) of one epoch."""
        if epoch not in self._epochs:
            order = self.documents
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.documents)
            starts = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.lengths[order], out=starts[1:])
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global row `index`: (tokens [L+1], labels [L], positions [L])."""
        length = self.seq_len + 1
        epoch, row = divmod(index, self.rows_per_epoch)
        order, stream = self._epoch(epoch)
        tokens = np.empty(length, dtype=np.int64)
        is_target = np.ones(length, dtype=bool)  # token k is a target (of the prediction from k - 1)
        positions = np.empty(length, dtype=np.int64)
        if not self.packing:
            document = order[row]
            size = min(int(self.lengths[document]), length)
            start = int(self.starts[document])
            tokens[:size] = self.cache.tokens[start : start + size]
            tokens[size:] = self.cache.eos_token_id
            is_target[size:] = False
            if self.cache.targets is not None:
                is_target[:size] &= self.cache.targets[start : start + size].astype(bool)
            positions[:] = np.arange(length)
        else:
            begin = row * self.seq_len
            piece = int(np.searchsorted(stream, begin, side="right")) - 1
            filled = 0
            while filled < length:
                document = order[piece]
                within = begin + filled - int(stream[piece])
                size = min(int(self.lengths[document]) - within, length - filled)
                start = int(self.starts[document]) + within
                tokens[filled : filled + size] = self.cache.tokens[start : start + size]
                if self.cache.targets is not None:
                    is_target[filled : filled + size] = self.cache.targets[start : start + size].astype(bool)
                if self.document_masking:
                    positions[filled : filled + size] = np.arange(size)
                    if within == 0:
                        is_target[filled] = False  # a document's first token follows another document's EOS
                filled += size
                piece += 1
            if not self.document_masking:
                positions[:] = np.arange(length)
        labels = np.where(is_target[1:], tokens[1:], IGNORE_INDEX)
        return tokens, labels, positions[:-1]

    def batch(self, first_row: int, num_rows: int) -> Batch:
        rows = [self.row(first_row + i) for i in range(num_rows)]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        if not self.is_masked:
            return Batch(tokens)
        targets = torch.from_numpy(np.stack([r[1] for r in rows]))
        positions = torch.from_numpy(np.stack([r[2] for r in rows])) if self.document_masking else None
        return Batch(tokens, targets, positions)

    def global_batch(self, step: int, num_sequences: int, seq_len: int) -> Batch:
        assert seq_len == self.seq_len, (seq_len, self.seq_len)
        return self.batch(step * num_sequences, num_sequences)


def split_validation(num_documents: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training documents, validation documents): round(fraction · n) whole documents, at least one,
    drawn with VALIDATION_SEED."""
    held_out = max(1, round(fraction * num_documents))
    chosen = np.random.default_rng(VALIDATION_SEED).choice(num_documents, size=held_out, replace=False)
    is_validation = np.zeros(num_documents, dtype=bool)
    is_validation[chosen] = True
    return np.flatnonzero(~is_validation), np.flatnonzero(is_validation)
