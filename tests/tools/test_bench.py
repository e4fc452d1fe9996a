"""The engine benchmark: its byte/FLOP model against the issue's figures, and a tiny CPU run end to end."""

import json

import pytest

from mimo_jax.tools.bench import decode_step_bytes, main, prefill_flops
from mimo_jax.weights.random import bench_config


def test_flash_slice_4_step_costs_match_the_issue():
    cfg = bench_config("flash-slice-4")
    assert cfg.sliding == (False, True, True, True) and cfg.moe == (False, True, True, True)
    one = decode_step_bytes(cfg, batch=1, context=2048, dtype_bytes=2)
    assert one["weights"] / 1e9 == pytest.approx(3.6, abs=0.05)  # "3.6 GB of weights per step"
    b32 = decode_step_bytes(cfg, batch=32, context=2048, dtype_bytes=2)
    assert b32["weights"] / 1e9 == pytest.approx(27, abs=0.5)  # "about 163 of 256 experts, 27 GB"
    # KV read: the full layer's 2048 positions and the SWA rings' 129, per sequence.
    assert one["kv"] == 2048 * 4 * 320 * 2 + 3 * 129 * 8 * 320 * 2
    per_token = prefill_flops(cfg, 8192) / 8192 / 1e9
    assert 2.3 < per_token < 3.1  # ~2.4 GFLOP of matmuls per token + attention (lm_head once per prompt)


def test_bench_runs_on_cpu(tmp_path, capsys):
    small = ["--model", "flash-slice-2", "--scale-down", "--read-mb", "8", "--copy-mb", "8", "--matmul-n", "128"]
    decode_json, prefill_json = tmp_path / "d.json", tmp_path / "p.json"
    main(["decode", *small, "--batch", "2", "--context", "40", "--steps", "2", "--rounds", "1", "--moe-impl",
          "gather", "--paged", "xla,pallas_interpret", "--json", str(decode_json), "--profile", "3"])  # fmt: skip
    main(["prefill", *small, "--prompt-len", "40", "--chunk", "16", "--reps", "1", "--moe-impl", "ragged",
          "--attention", "split", "--json", str(prefill_json)])  # fmt: skip
    runs = json.loads(decode_json.read_text())["runs"]
    assert [r["paged"] for r in runs] == ["xla", "pallas_interpret"]  # both paged paths timed in one run
    for decode in runs:
        assert decode["batch"] == 2 and decode["tok_s"] > 0 and decode["finite"] and decode["moe"] == "gather"
    prefill_results = json.loads(prefill_json.read_text())
    assert prefill_results["attention"] == "split" and prefill_results["attention_check_rel_err"] < 0.05
    (prefill,) = prefill_results["runs"]
    assert prefill["prompt_len"] == 40 and prefill["tok_s"] > 0 and prefill["finite"]
    printed = capsys.readouterr().out
    assert "one decode round of 2 steps:" in printed and "| kernel (first device" in printed
