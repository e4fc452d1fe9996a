"""Install demo model v2 from the files of the `bench/train_demo_gpu.sh` device call.

    python bench/install_demo_v2.py FILES_AT [--data .carry/demo_data] [--update-tests]

FILES_AT is the folder the call's files came back to (it holds `demo_model/` and `eval.json`). Checks the
checkpoint (release layout, no `mtp_hidden_before_norm`, loads with mimo_jax, greedy plain decoding equals MTP
speculative decoding, the pre-filled `</think>\\n\\n` tokenizes apart from the answer), then replaces
`mimo_jax/demo_model/` (weights, config, tokenizer files; README.md regenerated from the figures), moves the
v1 figures to `bench/demo/v1/`, writes the v2 run's log, summary, evaluation and data manifest to `bench/demo/`,
and prints the new golden continuation of `tests/weights/test_demo_model.py` (`--update-tests` writes it there).
Run from the repository root, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages importable
    sys.path.insert(0, str(ROOT))

DEMO = ROOT / "mimo_jax" / "demo_model"
BENCH_DEMO = ROOT / "bench" / "demo"
TEST_FILE = ROOT / "tests" / "weights" / "test_demo_model.py"
RELEASE_FILES = ("config.json", "model.safetensors.index.json", "model_mtp.safetensors", "tokenizer.json")
# v2's tokenizer splits a newline run apart from what follows but joins it to punctuation before it ("):\n"),
# so prompts end on a complete line with its newline.
GOLDEN_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
GOLDEN_MAX_TOKENS = 24


def check_release(directory: Path) -> dict:
    missing = [f for f in RELEASE_FILES if not (directory / f).is_file()]
    if missing:
        raise SystemExit(f"{directory}: not a release-layout demo checkpoint (missing {missing})")
    config = json.loads((directory / "config.json").read_text())
    if "mtp_hidden_before_norm" in config:
        raise SystemExit(f"{directory}/config.json has mtp_hidden_before_norm: this is not the v2 (post-norm) run")
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    absent = sorted({f for f in index.values() if not (directory / f).is_file()})
    if absent:
        raise SystemExit(f"{directory}: the index names files that are not there: {absent}")
    return config


def check_model(directory: Path) -> dict:
    """Loads, generates, decodes losslessly with MTP, and the tokenizer keeps the pre-filled block apart."""
    from tokenizers import Tokenizer

    import mimo_jax
    from launch import train_demo as td

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prefill = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for answer in ("Here is `f`:", "`os.path.join(a, b)` joins paths."):
        whole = tok.encode(prefill + answer, add_special_tokens=False).ids
        parts = tok.encode(prefill, add_special_tokens=False).ids + tok.encode(answer, add_special_tokens=False).ids
        if whole != parts:
            raise SystemExit(f"{directory}/tokenizer.json merges the pre-filled think block with {answer!r}")
    lm = mimo_jax.load_model(str(directory), mtp=True)
    ids = tok.encode(GOLDEN_PROMPT, add_special_tokens=False).ids
    row = [int(t) for t in td.greedy_generate(lm.model, [ids], GOLDEN_MAX_TOKENS)[0]]
    eos = set(lm.config.eos_token_ids)
    golden = row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]
    logits = lm.logits([ids + golden])[0, len(ids) - 1 : len(ids) + len(golden) - 1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    if not all(int(np.argmax(step)) == t for step, t in zip(logits, golden, strict=True)):
        raise SystemExit("the cached greedy continuation differs from the full forward's argmax")
    kwargs = dict(max_new_tokens=48, ignore_eos=True)
    (plain,) = mimo_jax.generate(lm, [ids], **kwargs)
    (spec,) = mimo_jax.generate(lm, [ids], speculative_steps=3, **kwargs)
    if spec.token_ids != plain.token_ids:
        raise SystemExit("MTP speculative decoding changed the greedy output")
    return {
        "golden_ids": golden,
        "golden_text": tok.decode(golden, skip_special_tokens=False),
        "golden_min_gap": float(np.min(top2[:, 1] - top2[:, 0])),
        "spec_accept_length": spec.mean_accept_length,
    }


FEATURE_ROWS = (
    ("layers", "6: full attention at layers 0 and 5, sliding window (128 + itself, sinks) at 1-4"),
    (
        "attention",
        "8 query heads; 2 kv heads (full) / 4 kv heads (SWA); q/k head dim 96, v 64; RoPE on the first 32 dims "
        "(factor 0.334); v scale 0.707",
    ),
    (
        "MLP",
        "layer 0 dense SwiGLU (512); layers 1-5 MoE: 8 experts of 128, top-2, sigmoid router with correction bias "
        "(aux-loss-free balancing)",
    ),
    (
        "MTP",
        "3 layers (SWA block + dense SwiGLU), each reading the target's hidden state after its final norm at t and "
        "token t+k+1, predicting t+k+2 (the released checkpoints' wiring; no `mtp_hidden_before_norm`)",
    ),
    (
        "vocab",
        "{vocab}, byte-level BPE with Qwen2's pre-tokenizer split; `<|endoftext|>`=0, `<|im_start|>`=1, "
        "`<|im_end|>`=2; `<think>`, `</think>`, `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>`",
    ),
    (
        "files",
        "release layout: fused `qkv_proj` (2 shards), FP8 e4m3 128x128 blocks (`ignored_layers`: every o_proj), "
        "`model_mtp.safetensors`, index",
    ),
    ("context", "trained on 512-token windows (`max_position_embeddings` {context})"),
)


def demo_readme(config: dict, evaluation: dict, summary: dict, params: int) -> str:
    acc, text = evaluation["acceptance"], evaluation["text_acceptance"]
    chat = evaluation["chat_behaviour"]
    by_k = ", ".join(f"{a:.2f}" for a in acc["acceptance_length_by_k"])
    minutes = summary["train_time_s"] / 60
    features = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in FEATURE_ROWS])
    features = features.replace("{context}", str(config["max_position_embeddings"]))
    features = features.replace("{vocab}", str(config["vocab_size"]))
    return f"""# mimo_jax demo model

A {params / 1e6:.1f}M-parameter MiMo-V2 (`MiMoV2ForCausalLM`, `mimo_v2`) trained in {minutes:.1f} minutes on one GPU
({evaluation["device"]}) on the Python 3.11 standard library's source, plus chat samples made from its documented
functions. It is the default model of `python -m mimo_jax.generate` / `serve`, and
`mimo_jax.load_model("demo", mtp=True)` loads it. It writes Python-looking code; do not expect it to
be correct.

It has every MiMo-V2 feature, only smaller:

{features}

Quality (this checkpoint, FP8, see bench/RESULTS.md, "Demo checkpoint"): held-out loss
{evaluation["heldout_loss"]:.2f} nats/token (perplexity {evaluation["heldout_perplexity"]:.1f},
{evaluation["heldout_bits_per_byte"]:.2f} bits per byte); MTP acceptance length {by_k} with k = 1, 2, 3 greedy
draft steps on its own continuations ({text["acceptance_length"]:.2f} with k = 3 against held-out text).

Chat: `tokenizer_config.json` has a MiMo/Qwen3-style template (`enable_thinking`, on by default as in
MiMo-V2.5 / V2.5-Pro; tools in the system turn, MiMo's `<tool_call><function=...><parameter=...>` markup).
Trained on requests to write a function (answered with code), plain questions (answered in a sentence), the
same with tools offered but not needed, and requests that name the `read_source` tool (a call); half with a
reasoning block, half with the empty block the template pre-fills when thinking is off. On held-out probes it
calls a tool for {chat["tool_call_rate_when_asked"]:.0%} of the requests that ask for one,
{chat["tool_call_rate_with_tools_not_asked"]:.0%} of those that offer tools without asking, and
{chat["tool_call_rate_without_tools"]:.0%} without tools. Text prompts are best ended on a complete line with
its newline (the pre-tokenizer joins a newline run to the punctuation before it, not to the next line).

Rebuild: `launch/train_demo.py prepare` (CPU), then `bench/train_demo_gpu.sh` in one device call (train,
export, evaluate), then `bench/install_demo_v2.py`; the training log and evaluation JSON of this checkpoint
are in `bench/demo/`.
"""


def install(src: Path, data: Path | None) -> tuple[dict, dict, dict]:
    model_dir = src / "demo_model"
    config = check_release(model_dir)
    bundle = json.loads((src / "eval.json").read_text())
    checks = check_model(model_dir)
    summary, log = bundle.pop("train_summary"), bundle.pop("train_log")
    manifest = bundle.get("data_manifest") or {}
    if data is not None and (data / "manifest.json").is_file():
        manifest = json.loads((data / "manifest.json").read_text())  # with the held-out file list
    # The new checkpoint: staged beside, then swapped in.
    staged = Path(tempfile.mkdtemp(prefix=".demo_model.v2-", dir=DEMO.parent))
    for f in sorted(model_dir.iterdir()):
        shutil.copy2(f, staged / f.name)
    (staged / "README.md").write_text(demo_readme(config, bundle, summary, summary["params"]))
    old = DEMO.with_name(".demo_model.v1")
    if DEMO.exists():
        DEMO.rename(old)
    staged.rename(DEMO)
    shutil.rmtree(old, ignore_errors=True)
    # The v1 figures stay for history; the v2 run's beside them.
    v1 = BENCH_DEMO / "v1"
    if not v1.exists() and BENCH_DEMO.exists():
        v1.mkdir()
        for f in sorted(BENCH_DEMO.iterdir()):
            if f.is_file():
                f.rename(v1 / f.name)
    BENCH_DEMO.mkdir(exist_ok=True)
    (BENCH_DEMO / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    (BENCH_DEMO / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (BENCH_DEMO / "eval_gpu_shipped_fp8.json").write_text(json.dumps(bundle, indent=2) + "\n")
    (BENCH_DEMO / "corpus_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return bundle, summary, checks


def update_tests(checks: dict) -> None:
    """Rewrite the GOLDEN_PROMPT ... GOLDEN_IDS block of the demo test (lines within ruff's 120 columns)."""
    text = TEST_FILE.read_text()
    comment = (
        "Greedy continuation of GOLDEN_PROMPT by the shipped checkpoint (float32, FP8 weights dequantized): "
        f"{checks['golden_text']!r}. The smallest top-1/top-2 logit gap along it is {checks['golden_min_gap']:.3f}, "
        "far above float32 noise across machines."
    )
    lines = textwrap.wrap(comment, 116, break_long_words=True, replace_whitespace=False, drop_whitespace=False)
    flat = ", ".join(map(str, checks["golden_ids"]))
    if len(f"GOLDEN_IDS = [{flat}]") <= 120:  # the three shapes `ruff format` gives a list
        ids = f"GOLDEN_IDS = [{flat}]\n"
    elif len(f"    {flat}") <= 120:
        ids = f"GOLDEN_IDS = [\n    {flat}\n]\n"
    else:
        ids = "GOLDEN_IDS = [\n" + "".join(f"    {t},\n" for t in checks["golden_ids"]) + "]\n"
    block = f"GOLDEN_PROMPT = {GOLDEN_PROMPT!r}\n" + "".join(f"# {line}".rstrip() + "\n" for line in lines) + ids
    new, n = re.subn(r"GOLDEN_PROMPT = .*?\nGOLDEN_IDS = \[[^\]]*\]\n", lambda _: block, text, flags=re.DOTALL)
    if n != 1:
        raise SystemExit(f"{TEST_FILE}: could not find the GOLDEN_PROMPT ... GOLDEN_IDS block")
    TEST_FILE.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files_at", type=Path, help="folder with demo_model/ and eval.json from the device call")
    parser.add_argument("--data", type=Path, default=ROOT / ".carry" / "demo_data", help="the prepared data dir")
    parser.add_argument("--update-tests", action="store_true", help="write the new golden ids into the test")
    args = parser.parse_args()
    bundle, summary, checks = install(args.files_at, args.data)
    acc, text, chat = bundle["acceptance"], bundle["text_acceptance"], bundle["chat_behaviour"]
    print(f"installed {DEMO} ({sum(f.stat().st_size for f in DEMO.iterdir()) / 1e6:.1f} MB)")
    print(
        f"training: {summary['steps']} of {summary['planned_steps']} steps in {summary['train_time_s']:.0f} s"
        f"{' (stopped early: time bound)' if summary['stopped_early'] else ''}; held-out loss at the end "
        f"{summary['heldout']['main']:.4f} (bf16 params)"
    )
    print(
        f"shipped FP8 on {bundle['device']}: held-out loss {bundle['heldout_loss']:.4f}, perplexity "
        f"{bundle['heldout_perplexity']:.2f}, bits/byte {bundle['heldout_bits_per_byte']:.3f}"
    )
    print(f"MTP acceptance k = 1, 2, 3 (greedy continuations): {acc['acceptance_length_by_k']}")
    print(f"MTP acceptance k = 1, 2, 3 (held-out text): {text['acceptance_length_by_k']}")
    print(
        f"tool calls: when asked {chat['tool_call_rate_when_asked']}, offered but not asked "
        f"{chat['tool_call_rate_with_tools_not_asked']}, without tools {chat['tool_call_rate_without_tools']}"
    )
    print(f"CPU check: speculative == plain; accept length {checks['spec_accept_length']:.2f} on the golden prompt")
    print(f"golden: {checks['golden_text']!r} (min top-1/top-2 gap {checks['golden_min_gap']:.3f})")
    if args.update_tests:
        update_tests(checks)
        print(f"updated {TEST_FILE}")
    else:
        print(f"GOLDEN_PROMPT = {GOLDEN_PROMPT!r}\nGOLDEN_IDS = {checks['golden_ids']}")


if __name__ == "__main__":
    main()
