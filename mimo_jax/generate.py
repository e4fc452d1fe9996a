"""`python -m mimo_jax.generate --model DIR --prompt "..."`: complete one prompt and print the text.

(The function itself lives in `mimo_jax.engine.generation` and is exported as `mimo_jax.generate`.)
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Sequence

from mimo_jax.engine.generation import GenerationResult, generate

__all__ = ["GenerationResult", "generate", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    from mimo_jax.lm import load_model
    from mimo_jax.weights.demo import demo_model_dir

    p = argparse.ArgumentParser(prog="python -m mimo_jax.generate", description="Complete a prompt with a MiMo model.")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--prompt", required=True, help="text (needs tokenizer.json) or, without one, space-separated ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    try:
        directory = args.model or str(demo_model_dir())
    except FileNotFoundError as e:
        p.error(str(e))
    tokenizer = None
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tok_path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tok_path)
        ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            p.error(f"{directory} has no tokenizer.json: give --prompt as space-separated token ids")
    lm = load_model(directory, dtype=args.dtype)
    (result,) = generate(
        lm,
        [ids],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if tokenizer is not None:
        print(args.prompt + tokenizer.decode(result.token_ids))
    else:
        print(" ".join(map(str, result.token_ids)))
    print(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module sets the attribute `mimo_jax.generate` to it; calling it still generates."""

    def __call__(self, *args, **kwargs) -> list[GenerationResult]:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
