"""How far w8a8 (block-FP8 weights times activations quantized per token and 128 columns) moves results from the
fp8-weight path with bf16 activations (w16a16: weights widened or dequantized). Runs on CPU:

    python bench/check_w8a8_accuracy.py                 # (a) MoE layer, (b) flash-slice logits, (c) demo greedy
    python bench/check_w8a8_accuracy.py --parts a --tokens 256

(a) one MoE layer at Flash's expert shapes (hidden 4096, intermediate 2048, top-8; `--experts` of the 256, so
    it fits a CPU) on random inputs: the Pallas w8a8 kernels (interpreter) against the widened fp8 kernel;
(b) logits of a random scaled-down flash slice with fp8 weights, w8a8 "always" against "off" (XLA rounds the
    activations as the kernels quantize them: `RunOptions.w8a8`, tested equal to the kernels' math);
(c) the demo model with its experts and dense weights exported as 128 x 128 FP8 blocks (`export_release`):
    greedy generations with w8a8 "always" against "off".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

import mimo_jax
from mimo_jax.config import RunOptions
from mimo_jax.kernels import fp8_gemm_gpu, moe_gpu
from mimo_jax.weights.demo import demo_model_dir
from mimo_jax.weights.export import export_release, hub_tensors
from mimo_jax.weights.random import bench_config, random_model


def errors(got, ref) -> tuple[float, float]:
    """(max |err| / max |ref|, relative RMS) of got against ref."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max()), float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def moe_layer(tokens: int, experts: int, seed: int = 0) -> None:
    hidden, inter, top_k = 4096, 2048, 8
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    shapes = ((experts, inter, hidden), (experts, inter, hidden), (experts, hidden, inter))  # out_in
    w = [
        moe_gpu.quantize_fp8_blocks(jax.random.normal(k, s) / np.sqrt(s[2]))
        for k, s in zip(keys[:3], shapes, strict=True)
    ]
    x = jax.random.normal(keys[3], (tokens, hidden)).astype(jnp.bfloat16)
    ids = jnp.argsort(jax.random.uniform(keys[4], (tokens, experts)), axis=1)[:, :top_k].astype(jnp.int32)
    routing = jax.random.uniform(keys[4], (tokens, top_k), minval=0.1, maxval=1.0) / top_k
    run = lambda cfg: moe_gpu.experts_grouped(x, routing, ids, *w, config=cfg, layout="out_in", interpret=True)
    ref = run(moe_gpu.PREFILL_FP8)
    got = run(fp8_gemm_gpu.W8A8Config(fp8_gemm_gpu.GemmTiles(64, 128, 4, 3), fp8_gemm_gpu.GemmTiles(64, 128, 4, 3)))
    max_err, rms = errors(got, ref)
    print(f"(a) MoE layer, {tokens} tokens, {experts} experts of Flash shape, top-{top_k}: w8a8 kernel vs widened")
    print(f"    max|err|/max|ref| = {max_err:.4f}   relative RMS = {rms:.4f}")


def flash_slice_logits(tokens: int, seed: int = 0) -> None:
    cfg = bench_config("flash-slice-4", scale_down=True)
    model = random_model(cfg, jnp.bfloat16, RunOptions(w8a8="off"), weights="fp8")
    ids = jax.random.randint(jax.random.PRNGKey(seed), (1, tokens), 0, cfg.vocab_size)
    positions = jnp.arange(tokens)[None]

    def logits(mode: str):
        m = model.with_options(RunOptions(w8a8=mode))
        return m.logits(m.hidden_states(ids, positions)[0])

    ref, got = logits("off"), logits("always")
    max_err, rms = errors(got, ref)
    agree = float(np.mean(np.argmax(np.asarray(got), -1) == np.argmax(np.asarray(ref), -1)))
    print(f"(b) flash-slice-4 scaled down, fp8 weights, {tokens} tokens: logits w8a8 'always' vs 'off'")
    print(f"    max|err|/max|ref| = {max_err:.4f}   relative RMS = {rms:.4f}   argmax agreement = {agree:.3f}")


PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "    for i in range(len(items)):\n",
    "def parse_args():\n    parser = argparse.ArgumentParser(",
    "    if not isinstance(value, str):\n        raise TypeError(",
    "def _quote(s):\n    return",
)


def demo_greedy(new_tokens: int) -> None:
    demo = mimo_jax.load_model(str(demo_model_dir()), dtype="float32")
    hub = json.loads((demo_model_dir() / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = export_release(hub_tensors(demo.model), hub, f"{tmp}/fp8", layout="fused_qkv", block_size=128)
        lm = mimo_jax.load_model(out, dtype="bfloat16", weights="fp8")
    tokenizer = Tokenizer.from_file(str(demo_model_dir() / "tokenizer.json"))
    prompts = [tokenizer.encode(text).ids for text in PROMPTS]
    runs = {}
    for mode in ("off", "always"):
        view = lm.with_options(dataclasses.replace(lm.options, w8a8=mode))
        results = mimo_jax.generate(view, prompts, max_new_tokens=new_tokens)
        runs[mode] = [list(r.token_ids) for r in results]
    runs["demo"] = [list(r.token_ids) for r in mimo_jax.generate(demo, prompts, max_new_tokens=new_tokens)]
    print(f"(c) demo model, experts and dense weights in 128x128 FP8 blocks, {len(prompts)} x {new_tokens} greedy")
    comparisons = {
        "fp8 w8a8 vs fp8 w16a16": ("always", "off"),
        "fp8 w16a16 vs the float32 demo (weight rounding alone)": ("off", "demo"),
    }
    for name, (a, b) in comparisons.items():
        pairs = list(zip(runs[a], runs[b], strict=True))
        same = [sum(1 for _ in iter_common(x, y)) for x, y in pairs]
        identical, total = sum(x == y for x, y in pairs), sum(len(y) for _, y in pairs)
        print(f"    {name}: identical {identical}/{len(prompts)}; common prefix {sum(same)}/{total} tokens {same}")


def iter_common(a, b):
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--tokens", type=int, default=128, help="(a) tokens through the MoE layer")
    ap.add_argument("--experts", type=int, default=16, help="(a) experts (Flash has 256)")
    ap.add_argument("--slice-tokens", type=int, default=256, help="(b) prompt length")
    ap.add_argument("--new-tokens", type=int, default=48, help="(c) greedy tokens per prompt")
    args = ap.parse_args(argv)
    if "a" in args.parts:
        moe_layer(args.tokens, args.experts)
    if "b" in args.parts:
        flash_slice_logits(args.slice_tokens)
    if "c" in args.parts:
        demo_greedy(args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
