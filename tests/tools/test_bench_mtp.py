"""bench/bench_mtp.py runs end to end at tiny scale (random weights: drafts are never accepted)."""

import json

from tests.fixtures import load_script

bench_mtp = load_script("bench/bench_mtp.py")


def test_bench_mtp_smoke(tmp_path, capsys):
    """The plain step, k=1 with the full vocabulary and with a draft vocabulary of 64 tokens, in one run."""
    out = str(tmp_path / "mtp.json")
    args = ["--model", "flash-slice-2", "--scale-down", "--batch", "2", "--steps", "1", "--iters", "2"]
    args += ["--draft-vocab", "0,64", "--weights", "fp8"]
    assert bench_mtp.main(args + ["--rounds", "1", "--context", "20", "--json", out]) == 0
    result = json.load(open(out))
    runs = result["runs"]
    assert [(r["batch"], r["k"], r["draft_vocab"]) for r in runs] == [(2, 0, 0), (2, 1, 0), (2, 1, 64)]
    assert all(r["tokens"] > 0 and r["accept_length"] >= 1 for r in runs)
    assert runs[0]["accept_length"] == 1 and runs[0]["speedup"] == 1
    # the draft vocabulary reads 64 of the head's columns per draft step instead of all of them
    h, v = 4096 // 16, 152576 // 32
    assert runs[1]["bytes"]["draft_head"] - runs[2]["bytes"]["draft_head"] == h * (v - 64) * 4
    assert runs[2]["hbm_cost"] < runs[1]["hbm_cost"]
    printed = capsys.readouterr().out
    assert "| 2 | 1 | full |" in printed and "| 2 | 1 | 64 |" in printed and "| HBM cost (plain steps) |" in printed


def test_iteration_bytes_parts():
    """The verify of k+1 tokens reads the experts those tokens route to (uniform routing), the KV cache once; the
    plain step is the engine bench's decode bytes."""
    from mimo_jax.tools.bench import decode_step_bytes, expected_experts_touched
    from mimo_jax.weights.random import bench_config

    cfg = bench_config("flash-slice-4")
    plain = bench_mtp.iteration_bytes(cfg, 1, 0, 2048, 2)
    assert plain["total"] - plain["logits"] == decode_step_bytes(cfg, 1, 2048, 2)["total"]
    spec = bench_mtp.iteration_bytes(cfg, 1, 3, 2048, 2, draft_vocab=32768)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    extra = 3 * (expected_experts_touched(cfg, 4) - cfg.experts_per_token) * expert  # 3 MoE layers
    assert abs(spec["verify_layers"] - plain["verify_layers"] - extra) < 1e3
    assert spec["kv"] == plain["kv"] and spec["draft_head"] == 3 * cfg.hidden_size * 32768 * 2
