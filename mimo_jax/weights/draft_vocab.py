"""A checkpoint's draft vocabulary file, `draft_vocab.json`: its tokens ranked by frequency in a corpus, and how
many of them the MTP drafts choose among (FR-Spec; `mimo_jax.model.mimo.with_draft_vocab`).

    {"size": 2048, "token_ids": [most frequent, ...], "source": "what was counted"}

`load_model` reads it beside config.json (None: the file's `size`; 0: off). It changes which tokens are drafted,
never what is emitted: the verify scores the whole vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

FILENAME = "draft_vocab.json"


def rank_tokens(streams: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Token ids seen in `streams` (arrays of ids), most frequent first (ties: lower id first)."""
    counts = np.zeros(vocab_size, np.int64)
    for ids in streams:
        counts += np.bincount(np.asarray(ids, np.int64), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    return order[counts[order] > 0].astype(np.int32)


def write_draft_vocab(directory: str | os.PathLike, ranked: np.ndarray, size: int, source: str) -> str:
    """Write `draft_vocab.json` into a checkpoint directory; returns its path."""
    if not 0 < size <= len(ranked):
        raise ValueError(f"draft vocabulary size {size}: expected 1..{len(ranked)} (the tokens ranked)")
    path = os.path.join(directory, FILENAME)
    body = {"size": int(size), "source": source, "token_ids": [int(t) for t in ranked]}
    with open(path + ".tmp", "w") as f:
        json.dump(body, f, separators=(",", ":"))
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def read_draft_vocab(directory: str | os.PathLike, size: int | None = None) -> np.ndarray | None:
    """The draft vocabulary of the checkpoint in `directory`: the `size` most frequent tokens of its
    `draft_vocab.json` (None: the file's own size; 0: none). No file: None, unless a size > 0 was asked for."""
    path = os.path.join(directory, FILENAME)
    if size == 0:
        return None
    if not os.path.isfile(path):
        if size:
            raise FileNotFoundError(f"draft_vocab={size} asked for, but {path} does not exist (token frequency ranks)")
        return None
    with open(path) as f:
        body = json.load(f)
    ranked = body.get("token_ids")
    if not isinstance(ranked, list) or not all(isinstance(t, int) for t in ranked):
        raise ValueError(f"{path}: 'token_ids' must be a list of token ids")
    size = body.get("size") if size is None else size
    if not isinstance(size, int) or not 0 < size <= len(ranked):
        raise ValueError(f"{path}: draft vocabulary size {size!r} must lie in 1..{len(ranked)} (the tokens ranked)")
    return np.asarray(ranked[:size], np.int32)
