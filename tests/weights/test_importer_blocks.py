"""Row/scale maps at the released sizes (128x128 blocks, head_dim 192, v_head_dim 128), against straight loops."""

import math

import numpy as np
import pytest

from mimo_jax.quant import FP8, dequantize_blocks, quantize_blocks
from mimo_jax.weights.export import _quantize_kv_per_head
from mimo_jax.weights.table import (
    HEADS_IN,
    CheckpointTensor,
    ParamSource,
    QKVLayout,
    attention_rows,
    kv_blocked_per_head,
)

B = 128
H = 256  # input width (two column blocks)


def random_fp8(rng, rows):
    return rng.integers(0, 0x7E, (rows, H), dtype=np.uint8).view(FP8)


def dequant_rows(w8, stacked_scales, value_rows, scale_rows):
    cols = np.arange(H) // B
    return w8[value_rows].astype(np.float32) * stacked_scales[scale_rows][:, cols]


@pytest.mark.parametrize(("n", "kv", "shards"), [(128, 8, 8), (64, 4, 4), (64, 8, 4)])  # Pro, V2.5 full, V2.5 SWA
def test_fused_qkv_per_shard_dequant_and_deinterleave(n, kv, shards):
    rng = np.random.default_rng(0)
    d, dv = 192, 128
    shard_rows = n // shards * d + kv // shards * (d + dv)
    rows = shards * shard_rows
    w8 = random_fp8(rng, rows)
    per_shard_blocks = math.ceil(shard_rows / B)
    scale = rng.uniform(0.5, 2, (shards * per_shard_blocks, H // B)).astype(np.float32)
    if (n, kv) == (128, 8):
        assert (rows, scale.shape[0]) == (27136, 216)
    # straight loops: dequantize each shard with its own blocks, then split it
    q, k, v = [], [], []
    for s in range(shards):
        w = dequantize_blocks(
            w8[s * shard_rows : (s + 1) * shard_rows], scale[s * per_shard_blocks : (s + 1) * per_shard_blocks], (B, B)
        )
        nq, nk = n // shards * d, kv // shards * d
        q.append(w[:nq])
        k.append(w[nq : nq + nk])
        v.append(w[nq + nk :])
    expected = {"q": np.concatenate(q), "k": np.concatenate(k), "v": np.concatenate(v)}
    layout = QKVLayout(n, kv, d, dv, shards)
    t = CheckpointTensor("qkv", (rows, H), FP8, True, shards)
    for part, heads, hd in (("q", n, d), ("k", kv, d), ("v", kv, dv)):
        src = ParamSource(("x",), HEADS_IN, (t,), heads, hd, part, layout)
        value_rows, scale_rows = attention_rows(src, B, (scale.shape[0],))
        np.testing.assert_array_equal(dequant_rows(w8, scale, value_rows, scale_rows), expected[part])


@pytest.mark.parametrize("kv", [4, 8])
@pytest.mark.parametrize("per_head", [True, False])
def test_flash_kv_blocks_detected_from_scale_shape(kv, per_head):
    rng = np.random.default_rng(kv)
    d, dv = 192, 128
    k = rng.standard_normal((kv * d, H)).astype(np.float32)
    v = rng.standard_normal((kv * dv, H)).astype(np.float32)
    if per_head:
        k8, ks, v8, vs = _quantize_kv_per_head(k, v, kv, (B, B))
        assert ks.shape[0] == 2 * kv and vs.shape[0] == kv  # k_scale: 2 rows per head, v_scale: 1
        expected_k, expected_v = [], []
        for h in range(kv):  # one [K_h | V_h] column of 3 blocks per head (320 rows padded to 384)
            w = np.concatenate([k8[h * d : (h + 1) * d], v8[h * dv : (h + 1) * dv]])
            s = np.concatenate([ks[2 * h : 2 * h + 2], vs[h : h + 1]])
            full = dequantize_blocks(w, s, (B, B))
            expected_k.append(full[:d])
            expected_v.append(full[d:])
        expected_k, expected_v = np.concatenate(expected_k), np.concatenate(expected_v)
        # V's first 64 rows use K's second block scale
        np.testing.assert_array_equal(expected_v[:64], v8[:64].astype(np.float32) * ks[1][np.arange(H) // B])
    else:
        (k8, ks), (v8, vs) = quantize_blocks(k, (B, B)), quantize_blocks(v, (B, B))
        expected_k, expected_v = dequantize_blocks(k8, ks, (B, B)), dequantize_blocks(v8, vs, (B, B))
    assert kv_blocked_per_head(ks.shape[0], kv, d, B) == per_head
    layout = QKVLayout(kv * 8, kv, d, dv, 0)
    tk = CheckpointTensor("k", (kv * d, H), FP8, True)
    tv = CheckpointTensor("v", (kv * dv, H), FP8, True)
    stacked = np.concatenate([ks, vs])
    for part, hd, w8, expected in (("k", d, k8, expected_k), ("v", dv, v8, expected_v)):
        src = ParamSource(("x",), HEADS_IN, (tk, tv), kv, hd, part, layout)
        value_rows, scale_rows = attention_rows(src, B, (ks.shape[0], vs.shape[0]))
        np.testing.assert_array_equal(dequant_rows(w8, stacked, value_rows, scale_rows), expected)
    # the blocks that were used reproduce the weights to FP8 precision
    assert np.abs(expected_k - k).max() <= 0.07 * np.abs(k).max()


def test_quantize_partial_edge_blocks():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    q, s = quantize_blocks(w, (B, B))
    assert q.dtype == FP8 and s.shape == (3, 2)
    np.testing.assert_allclose(s[2, 1], np.abs(w[256:, 128:]).max() / 448, rtol=1e-6)
    back = dequantize_blocks(q, s, (B, B))
    assert np.abs(back - w).max() <= np.abs(w).max() / 16
