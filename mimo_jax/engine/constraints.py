"""Constrained decoding: the interface a token-mask backend (a grammar, a JSON schema, a regex) implements.

A request's `SamplingOptions.constraint` is a JSON-able spec the engine does not interpret; the
engine's `constraint_factory` builds a `TokenConstraint` from it when the request is added. While
such a request runs, the engine decodes it one token per step: before each it asks the constraint
for the next token's allowed set (`fill_allowed`), the device samples with every other token at
-inf, and after reading the token it reports it back (`accept`). `is_finished()` ends the request
(finish_reason "stop"), and so does a mask that allows nothing. Every host of a multi-host run
applies the same plans, builds the same constraints and accepts the same tokens, so the masks
agree without extra messages.

Masks are bitmasks of int32 words, the layout llguidance and XGrammar fill: bit t % 32 of word
t // 32 set = token t allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TokenConstraint(Protocol):
    """One request's constraint on its generated tokens (host side, stateful)."""

    def fill_allowed(self, bitmask: np.ndarray) -> None:
        """Write the tokens allowed next into `bitmask` (int32 [bitmask_words(vocab)], zeroed by the engine):
        bit t % 32 of word t // 32 set = token t allowed."""
        ...

    def accept(self, token: int) -> None:
        """The token the engine emitted (one of those the last `fill_allowed` allowed)."""
        ...

    def is_finished(self) -> bool:
        """Nothing more may follow: the request stops with finish_reason "stop"."""
        ...


ConstraintFactory = Callable[[dict], TokenConstraint]  # builds one from a JSON-able spec


def bitmask_words(vocab: int) -> int:
    """int32 words of a bitmask over `vocab` tokens: ceil(vocab / 32)."""
    return -(-vocab // 32)


def full_bitmask(vocab: int, rows: int | None = None) -> np.ndarray:
    """Every token allowed: int32 [W] (or [rows, W]) of all ones."""
    shape = (bitmask_words(vocab),) if rows is None else (rows, bitmask_words(vocab))
    return np.full(shape, -1, np.int32)


def bitmask_of(token_ids: Iterable[int], vocab: int) -> np.ndarray:
    """The int32 bitmask [W] allowing exactly `token_ids`."""
    bits = np.zeros(bitmask_words(vocab) * 32, np.uint8)
    ids = np.fromiter(token_ids, np.int64)
    bits[ids] = 1
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


def allowed_tokens(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """bool [..., vocab] from an int32 bitmask [..., W]: the tokens it allows."""
    words = np.ascontiguousarray(bitmask, dtype=np.int32).astype("<i4").view(np.uint8)
    bits = np.unpackbits(words.reshape(bitmask.shape[:-1] + (-1,)), axis=-1, bitorder="little")
    return bits[..., :vocab].astype(bool)


def allows_any(bitmask: np.ndarray, vocab: int) -> bool:
    """Whether the bitmask [W] allows at least one token below `vocab` (bits past it are ignored)."""
    return bool(allowed_tokens(bitmask, vocab).any())
