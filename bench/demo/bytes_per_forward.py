"""Text per target forward of greedy MTP decoding (k = 3) on byte-identical held-out prompts.

    PYTHONPATH=. python bench/demo/bytes_per_forward.py   # the demo checkpoint of this tree

Tokens per forward do not compare across tokenizers; bytes of generated text per forward do, when
the prompts are the same text (held-out stdlib passages of ~480 characters ending on a line).
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer

import mimo_jax
from mimo_jax.weights.demo import demo_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ as a package root
from bench_mtp import HELDOUT_FILES  # noqa: E402


def passages(limit: int = 48) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for rel in HELDOUT_FILES:
        path = root / rel
        if not path.is_file():
            continue
        src = path.read_text(encoding="utf-8")
        for where in (0.3, 0.6):
            i = src.find("\n", int(len(src) * where))
            j = src.find("\n", i + 480)
            if i > 0 and j > 0:
                texts.append(src[i + 1 : j + 1])
    return texts[:limit]


def main() -> None:
    tok = Tokenizer.from_file(str(demo_model_dir() / "tokenizer.json"))
    texts = passages()
    lm = mimo_jax.load_model("demo", dtype="float32", mtp=3)
    prompts = [tok.encode(t).ids for t in texts]
    outs = mimo_jax.generate(lm, prompts, max_new_tokens=128, ignore_eos=True, speculative_steps=3, max_batch=48)
    tokens = sum(len(o.token_ids) for o in outs)
    nbytes = sum(len(tok.decode(o.token_ids).encode()) for o in outs)
    forwards = sum(len(o.token_ids) / o.mean_accept_length for o in outs)
    print(
        json.dumps(
            dict(
                prompts=len(texts),
                tokens=tokens,
                bytes=nbytes,
                forwards=forwards,
                tokens_per_forward=tokens / forwards,
                bytes_per_forward=nbytes / forwards,
            )
        )
    )


if __name__ == "__main__":
    main()
