"""FP8 vs model-dtype KV pages for the full-attention layers: logit error and greedy agreement (CPU).

    python bench/bench_kv_fp8.py --model demo --prompts 8 --prompt-len 256 --new-tokens 64
    python bench/bench_kv_fp8.py --model flash-slice-4 --prompts 8 --prompt-len 256 --new-tokens 64

The model runs directly (no engine) with paged full-attention layers (`PagedKV`) and SWA rings in the model
dtype. Per prompt: the reference (pages in the model dtype) prefills the prompt in one chunk and decodes
greedily; the FP8 run (e4m3 pages, one float32 scale per token and head) is fed the reference's tokens
(teacher forcing) to measure the logit error at every position (prompt and generated), then decodes greedily
on its own for the agreement length: tokens generated until its first token that differs from the reference's.
Logit errors: per position the largest over the vocabulary, then its max, 99th percentile and median over all
positions of all prompts (the max is a few positions where the MoE router flips an expert), and the mean over
every logit.

`demo`: the embedded demo checkpoint on windows of held-out standard-library text (bench_mtp's split).
`flash-slice-N`: MiMo-V2-Flash cut to N layers (full attention at layer 0 only, as the slice is defined) with
random weights, scaled down for a CPU (`bench_config(..., scale_down=True)`), on random token ids.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_mtp import heldout_prompts  # bench/ is this script's directory
from flax import nnx

from mimo_jax.lm import DTYPES, LanguageModel, load_model
from mimo_jax.model.cache import empty_layer_kv, empty_page_pools, page_bytes, paged_layer_caches, split_layer_caches
from mimo_jax.weights.demo import demo_model_dir
from mimo_jax.weights.random import bench_config, random_model

PAGE_SIZE = 16


def make_step(lm: LanguageModel):
    """Jitted (params, pools, rings, table, ids, positions) -> (float32 logits, pools, rings)."""
    cfg, graphdef = lm.config, lm.graphdef

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def step(params, pools, rings, table, ids, positions):
        model = nnx.merge(graphdef, params)
        logits, caches = model(ids, positions, paged_layer_caches(cfg, pools, table, rings))
        return (logits, *split_layer_caches(caches))

    return step


def run(lm: LanguageModel, step, prompt: list[int], new_tokens: int, kv: str, forced: list[int] | None = None):
    """(logits [len(prompt) + new_tokens - 1, vocab] of every position, the new tokens): greedy, or `forced`.
    `kv`: the pages' storage, "model" (the model dtype), "fp8" or a dtype name."""
    cfg, dtype = lm.config, lm.dtype
    length = len(prompt) + new_tokens
    pages = -(-length // PAGE_SIZE)
    store = dtype if kv in ("model", "fp8") else DTYPES[kv]
    pools = empty_page_pools(cfg, pages, PAGE_SIZE, store, fp8=kv == "fp8")
    rings = [empty_layer_kv(s, 1, length, dtype) for s in cfg.layers if s.sliding]
    table = jnp.asarray(np.random.RandomState(len(prompt)).permutation(pages)[None], jnp.int32)  # any page order
    ids = jnp.asarray([prompt], jnp.int32)
    logits, pools, rings = step(lm.params, pools, rings, table, ids, jnp.arange(len(prompt), dtype=jnp.int32)[None])
    out = [np.asarray(logits[0])]
    tokens = []
    for i in range(new_tokens):
        token = forced[i] if forced is not None else int(np.argmax(out[-1][-1]))
        tokens.append(token)
        if i == new_tokens - 1:
            break
        pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
        logits, pools, rings = step(lm.params, pools, rings, table, jnp.asarray([[token]], jnp.int32), pos)
        out.append(np.asarray(logits[0]))
    return np.concatenate(out), tokens


def agreement_length(a: list[int], b: list[int]) -> int:
    """Tokens until the first position where a and b differ (len(a) if none)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def compare(lm: LanguageModel, prompts: list[list[int]], new_tokens: int, kv: str) -> dict:
    """Pages stored as `kv` against pages in the model dtype (the reference), per prompt and summed up."""
    step = make_step(lm)
    rows = []
    for prompt in prompts:
        ref_logits, ref_tokens = run(lm, step, prompt, new_tokens, "model")
        kv_logits, _ = run(lm, step, prompt, new_tokens, kv, forced=ref_tokens)
        _, kv_tokens = run(lm, step, prompt, new_tokens, kv)
        err = np.abs(kv_logits - ref_logits)
        rows.append(
            dict(
                position_max_err=err.max(-1).tolist(),  # per position: the largest error over the vocabulary
                max_err=float(err.max()),
                mean_err=float(err.mean()),
                logit_std=float(ref_logits.std()),
                top1_agree=float(np.mean(kv_logits.argmax(-1) == ref_logits.argmax(-1))),
                agree_len=agreement_length(ref_tokens, kv_tokens),
            )
        )
    lengths = [r["agree_len"] for r in rows]
    position_max = np.concatenate([r.pop("position_max_err") for r in rows])
    return dict(
        prompts=len(prompts),
        max_err=max(r["max_err"] for r in rows),
        p99_err=float(np.percentile(position_max, 99)),  # of the positions' largest errors
        median_err=float(np.median(position_max)),
        mean_err=float(np.mean([r["mean_err"] for r in rows])),
        logit_std=float(np.mean([r["logit_std"] for r in rows])),
        top1_agree=float(np.mean([r["top1_agree"] for r in rows])),
        agree_len_mean=float(np.mean(lengths)),
        agree_len_min=min(lengths),
        all_agree=sum(n == new_tokens for n in lengths),
        per_prompt=rows,
    )


def build(model: str, dtype: str, prompts: int, prompt_len: int, seed: int) -> tuple[LanguageModel, list[list[int]]]:
    if model == "demo":
        lm = load_model("demo", dtype=dtype)
        return lm, heldout_prompts(str(demo_model_dir() / "tokenizer.json"), prompts, prompt_len)
    cfg = bench_config(model, scale_down=True)
    lm = LanguageModel(random_model(cfg, DTYPES[dtype]))
    rs = np.random.RandomState(seed)
    return lm, [rs.randint(0, cfg.vocab_size, prompt_len).tolist() for _ in range(prompts)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="demo, flash-slice-N or a config.json (random weights)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="model and reference KV dtype")
    parser.add_argument(
        "--kv", default="fp8", choices=["fp8", *sorted(DTYPES)], help="the pages compared (bfloat16: a scale for fp8)"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lm, prompts = build(args.model, args.dtype, args.prompts, args.prompt_len, args.seed)
    result = compare(lm, prompts, args.new_tokens, args.kv)
    cfg = lm.config
    result.update(
        model=args.model,
        dtype=args.dtype,
        kv=args.kv,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        full_layers=sum(not s.sliding for s in cfg.layers),
        layers=cfg.num_layers,
        page_bytes=page_bytes(cfg, PAGE_SIZE, jnp.dtype(lm.dtype).itemsize),
        page_bytes_fp8=page_bytes(cfg, PAGE_SIZE, fp8=True),
        seconds=time.perf_counter() - start,
        machine=f"{platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    )
    header = [
        "model",
        "model / reference KV",
        "KV compared",
        "full / all layers",
        "prompts x (prompt + new)",
        "largest abs logit err: max / p99 / median over positions",
        "mean abs err",
        "logit std",
        "top-1 agree (forced)",
        "greedy agreement mean / min (all N)",
    ]
    r = result
    row = [
        r["model"],
        r["dtype"],
        r["kv"],
        f"{r['full_layers']} / {r['layers']}",
        f"{r['prompts']} x ({r['prompt_len']} + {r['new_tokens']})",
        f"{r['max_err']:.3f} / {r['p99_err']:.3f} / {r['median_err']:.4f}",
        f"{r['mean_err']:.5f}",
        f"{r['logit_std']:.3f}",
        f"{r['top1_agree']:.4f}",
        f"{r['agree_len_mean']:.1f} / {r['agree_len_min']} ({r['all_agree']})",
    ]
    for cells in (header, ["---"] * len(header), row):
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
