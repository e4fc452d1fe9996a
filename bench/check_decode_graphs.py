"""The decode round recorded into CUDA graphs (`RunOptions.decode_graphs`) against the plain one: the same greedy
tokens, and the engine's decode rate with each (one GPU, flash-slice-4 random weights).

    python bench/check_decode_graphs.py --requests 16 --prompt 256 --output 128 --round 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import RunOptions
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.lm import LanguageModel
from mimo_jax.weights.random import bench_config, random_model


def run(lm: LanguageModel, args: argparse.Namespace) -> tuple[dict, float]:
    """Every request's tokens, and the decode rate (tok/s) of the second pass (the first compiles)."""
    engine = Engine(
        lm,
        max_batch=args.requests,
        max_context=args.prompt + args.output + 8,
        prefill_chunk=args.prompt,
        max_round_tokens=args.round,
    )
    engine.overlap = True  # as the server runs it
    rng = np.random.RandomState(0)
    prompts = [rng.randint(10, lm.config.vocab_size - 10, args.prompt).tolist() for _ in range(args.requests)]
    rate = 0.0
    for _ in range(2):  # the first pass compiles
        tokens: dict = {i: [] for i in range(args.requests)}
        for i, prompt in enumerate(prompts):
            engine.add(i, prompt, SamplingOptions(max_new_tokens=args.output, temperature=0.0))
        t0, counted = None, 0
        while engine.has_work():
            for out in engine.step(max_tokens_per_round=args.round):
                tokens[out.request_id] += out.token_ids
                if t0 is not None:
                    counted += len(out.token_ids)
            if t0 is None and all(tokens.values()):  # every request decodes: the prefills are done
                t0 = time.perf_counter()
        rate = counted / (time.perf_counter() - t0)
    return tokens, rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flash-slice-4")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--round", type=int, default=8)
    p.add_argument("--scale-down", action="store_true", help="divided sizes (a CPU smoke run)")
    args = p.parse_args()
    platform = jax.devices()[0].platform
    cfg = bench_config(args.model, args.scale_down)
    model = random_model(cfg, jnp.bfloat16, RunOptions.for_platform(platform), None)
    lm = LanguageModel(model, source=f"random:{args.model}")
    results = {}
    for graphs in (False, True):
        view = lm.with_options(dataclasses.replace(lm.options, decode_graphs=graphs))
        print(f"decode_graphs={graphs}: compile options {view.options.decode_compiler_options}")
        results[graphs] = run(view, args)
        rate = results[graphs][1]
        print(f"  {args.requests} requests x {args.output} tokens, rounds of {args.round}: {rate:.1f} tok/s")
    same = results[False][0] == results[True][0]
    print(f"graphs / plain = {results[True][1] / results[False][1]:.3f}x; tokens identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
