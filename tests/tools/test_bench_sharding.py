"""bench/bench_moe.py runs end to end on CPU at tiny dims, and its correctness check holds."""

import json

import pytest

from tests.fixtures import load_script


@pytest.fixture(scope="module")
def bench_moe():
    return load_script("bench/bench_moe.py")


def test_bench_moe_tiny_on_cpu(bench_moe, tmp_path, capsys):
    out = tmp_path / "moe.jsonl"
    argv = [
        "--hidden", "32", "--experts", "8", "--top-k", "2", "--intermediate", "16",
        "--tokens", "1,24", "--meshes", "expert=1;expert=2;tensor=2,expert=2;expert=16",
        "--impls", "ragged", "--dtype", "float32", "--reps", "2", "--warmup", "1",
        "--ceiling-mib", "4", "--matmul", "128", "--out", str(out),
    ]  # fmt: skip
    assert bench_moe.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # expert=1: local only; the two multi-device meshes: both strategies; expert=16 skipped (8 devices)
    assert len(rows) == 2 * (1 + 2 + 2)
    for r in rows:
        assert "error" not in r, r
        assert r["ok"] and r["rel_err"] < 1e-4 and r["ms"] > 0
        assert 0 < r["bw_frac"] and 0 < r["matmul_frac"]
        assert r["copy_bytes_per_s"] > 0 and r["matmul_flop_per_s"] > 0
    assert {(r["mesh"], r["strategy"]) for r in rows} == {
        ("expert=1", "local"),
        ("expert=2", "replicated"),
        ("expert=2", "all_to_all"),
        ("tensor=2,expert=2", "replicated"),
        ("tensor=2,expert=2", "all_to_all"),
    }
    printed = capsys.readouterr().out
    assert "skip mesh expert=16" in printed and "ALL_TO_ALL_MIN_TOKENS" in printed


def test_bench_moe_fp8_weights_tokens_split_over_experts(bench_moe, tmp_path):
    out = tmp_path / "moe.jsonl"
    argv = [
        "--hidden", "32", "--experts", "8", "--top-k", "2", "--intermediate", "16", "--tokens", "3,16",
        "--meshes", "expert=2", "--split-tokens", "--weights", "fp8", "--block", "16", "--impls", "ragged",
        "--dtype", "float32", "--reps", "2", "--warmup", "1", "--ceiling-mib", "4", "--matmul", "128",
        "--out", str(out), "--layers-per-call", "3",
    ]  # fmt: skip
    assert bench_moe.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tokens"], r["strategy"]) for r in rows] == [(16, "replicated"), (16, "all_to_all")]  # 3: no split
    assert all(r["tokens_split"] and r["ok"] and r["weights"] == "fp8" for r in rows)
    # fp8: 1 byte per weight plus one f32 scale per 16x16 block, 3 matrices of 32x16 per expert
    per_expert = 3 * (32 * 16 + 4 * 2 * 1)
    assert all(abs(r["touched_gb"] * 1e9 - r["experts_touched"] * per_expert) < 1e-6 for r in rows)


def test_layers_per_call_chains_the_residual_stream(bench_moe):
    import jax.numpy as jnp

    fn = bench_moe.repeated(lambda h, scale: h * scale, 3)  # h <- h + h * scale, three times
    assert float(fn(jnp.ones(()), 1.0)) == 8.0


def test_bench_moe_hands_each_implementation_its_weight_layout(bench_moe, tmp_path, monkeypatch):
    """An implementation that reads [E, out, in] weights (as the GPU kernels do) gets them re-laid out, with
    its gate spec permuted, beside one that reads [E, in, out], on one device and on meshes."""
    from mimo_jax import quant
    from mimo_jax.model import moe

    def dense_out_in(x, weights, ids, w_gate, w_up, w_down):
        ws = [moe.swap_expert_axes(w.dequantize(x.dtype) if isinstance(w, quant.BlockQuantized) else w)
              for w in (w_gate, w_up, w_down)]  # fmt: skip
        return moe.experts_dense(x, weights, ids, *ws)

    monkeypatch.setitem(moe.EXPERT_IMPLS, "dense_out_in", dense_out_in)
    monkeypatch.setattr(moe, "_OUT_IN_IMPLS", moe._OUT_IN_IMPLS | {"dense_out_in"})
    out = tmp_path / "moe.jsonl"
    argv = [
        "--hidden", "32", "--experts", "8", "--top-k", "2", "--intermediate", "16", "--tokens", "5",
        "--meshes", "expert=1;tensor=2,expert=2", "--impls", "ragged,dense_out_in", "--strategies", "replicated",
        "--dtype", "float32", "--reps", "2", "--warmup", "1", "--ceiling-mib", "4", "--matmul", "128",
        "--out", str(out),
    ]  # fmt: skip
    assert bench_moe.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["mesh"], r["impl"]) for r in rows} == {
        (mesh, impl) for mesh in ("expert=1", "tensor=2,expert=2") for impl in ("ragged", "dense_out_in")
    }
    for r in rows:
        assert "error" not in r, r
        assert r["ok"] and r["rel_err"] < 1e-4
