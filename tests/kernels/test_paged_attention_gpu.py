"""Pallas paged decode attention (mimo_jax.kernels.paged_attention_gpu) in interpreter mode on CPU, against the
XLA `attention_paged` (the oracle, itself checked against the contiguous cache in tests/model/test_paged_cache.py).

The compiled kernel lowers to Triton for CUDA here (jax.export); bench/check_paged_kernel.py runs it on a GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import mimo_jax
from mimo_jax.kernels import paged_attention_gpu as pk
from mimo_jax.model import attention as attn
from mimo_jax.model.cache import PagedKV, PagePool, page_pool_shardings, quantize_fp8
from mimo_jax.sharding import make_mesh

# GQA groups of 16 q heads, unequal head dims (48 = 32 + 16 in MMA chunks), pages of 8 keys, 6 table entries.
B, N, KV, D, DV, PAGE, MAX_PAGES, POOL_PAGES = 4, 32, 2, 48, 32, 8, 6, 30
# Two pages per loop iteration: the 6 entries are 3 blocks, so the loop and (with splits) its partition run.
SMALL_BLOCKS = pk.PagedConfig(block_keys=2 * PAGE)


def make_case(seed: int, t: int, fp8: bool, dtype=jnp.float32, kv: int = KV, n: int = N):
    """(q, PagedKV, q_pos, sink) on shuffled pages (page 0 is nobody's). Row 0 fills the table (last page partly: 45 keys), row 1 has a
    -1 hole in its middle page and its first query is padding, row 2 is all padding, row 3 holds two keys."""
    rs = np.random.RandomState(seed)
    k = jnp.asarray(rs.randn(POOL_PAGES, kv, PAGE, D) * 2, jnp.float32)
    v = jnp.asarray(rs.randn(POOL_PAGES, kv, PAGE, DV), jnp.float32)
    if fp8:
        (k8, k_scale), (v8, v_scale) = quantize_fp8(k), quantize_fp8(v)
        pool = PagePool(k8, v8, k_scale, v_scale)
    else:
        pool = PagePool(k.astype(dtype), v.astype(dtype))
    table = (1 + rs.permutation(POOL_PAGES - 1))[: B * MAX_PAGES].reshape(B, MAX_PAGES).astype(np.int32)  # not page 0
    table[1, 1] = -1  # a hole: positions 8 .. 15 of row 1 are invisible
    table[1, 3:] = table[3, 1:] = -1
    last = np.array([MAX_PAGES * PAGE - 3, 3 * PAGE - 2, -1, 1])  # each row's last query position
    q_pos = last[:, None] - (t - 1) + np.arange(t)[None]
    q_pos = np.where(last[:, None] >= 0, np.maximum(q_pos, 0), -1)
    q_pos[1, 0] = -1 if t > 1 else q_pos[1, 0]
    q = jnp.asarray(rs.randn(B, t, n, D), jnp.float32).astype(dtype)
    sink = jnp.asarray(rs.randn(n) + 1, jnp.float32)
    return q, PagedKV(pool, jnp.asarray(table)), jnp.asarray(q_pos, jnp.int32), sink


def oracle(q, cache, q_pos, sink):
    return attn.attention_paged(q, cache, q_pos, window_keys=None, sink=sink, scale=D**-0.5)


def run_kernel(q, cache, q_pos, sink, config=SMALL_BLOCKS):
    pool = cache.pool
    return pk.paged_attention(
        q, pool.k, pool.v, cache.page_table, q_pos, scale=D**-0.5, sink=sink, k_scale=pool.k_scale,
        v_scale=pool.v_scale, config=config, interpret=True,
    )  # fmt: skip


CASES = [  # (t, fp8, sink, dtype, splits)
    (1, False, True, jnp.float32, 1),
    (4, False, True, jnp.float32, 1),
    (4, False, False, jnp.float32, 2),
    (1, False, True, jnp.bfloat16, 3),
    (1, True, True, jnp.bfloat16, 1),
    (4, True, False, jnp.bfloat16, 2),
]


@pytest.mark.parametrize("t,fp8,sink,dtype,splits", CASES)
def test_kernel_equals_xla_attention_paged(t, fp8, sink, dtype, splits):
    q, cache, q_pos, sinks = make_case(t + 10 * fp8, t, fp8, dtype)
    sinks = sinks if sink else None
    got = run_kernel(q, cache, q_pos, sinks, dataclasses.replace(SMALL_BLOCKS, splits=splits))
    want = oracle(q, cache, q_pos, sinks)
    assert got.shape == want.shape == (B, t, N, DV) and got.dtype == q.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    real = np.asarray(q_pos) >= 0
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the kernel scales fp8 keys after the dot, the oracle before
    np.testing.assert_allclose(got[real], want[real], rtol=tol, atol=tol)
    assert not got[~real].any()  # padding queries and the row with no query: zeros
    assert np.abs(got[real]).max() > 0.1


def test_many_rows_share_a_kv_head_among_programs(monkeypatch):
    """Past MAX_ROWS MMA rows (16 q heads x 4 queries = 64 > 16 here) a kv head's q heads are split over programs."""
    monkeypatch.setattr(pk, "MAX_ROWS", 16)
    q, cache, q_pos, sink = make_case(9, 4, False)
    real = np.asarray(q_pos) >= 0
    got, want = np.asarray(run_kernel(q, cache, q_pos, sink)), np.asarray(oracle(q, cache, q_pos, sink))
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_holes_and_pages_past_the_last_query_are_invisible():
    """Garbage (huge values) in page 0 (what a -1 entry such as row 1's hole would read) and in row 3's page past
    its last query changes nothing: invisible keys are masked by position and page id, not by their contents."""
    q, cache, q_pos, sink = make_case(5, 1, False)
    pool, table = cache.pool, np.asarray(cache.page_table)
    junk = jnp.full_like(pool.k[0], 1e4)
    k = pool.k.at[0].set(junk).at[table[3, 0], :, 2:].set(1e4)  # row 3's page 0 beyond position 1
    poisoned = PagedKV(PagePool(k, pool.v.at[0].set(1e4)), cache.page_table)
    real = np.asarray(q_pos) >= 0
    got = np.asarray(run_kernel(q, poisoned, q_pos, sink))
    np.testing.assert_allclose(got[real], np.asarray(run_kernel(q, cache, q_pos, sink))[real], rtol=1e-6)


def test_launch_choices():
    assert pk.pow2_chunks(192) == ((0, 128), (128, 64))
    assert pk.pow2_chunks(128) == ((0, 128),) and pk.pow2_chunks(48) == ((0, 32), (32, 16))
    assert pk.pages_per_block(64, 2048) == 2  # 128 keys per iteration
    assert pk.pages_per_block(256, 10) == 1 and pk.pages_per_block(4, 3) == 4  # a page at least; the table's pad
    # Flash decode: 4 kv heads. Batch 1 splits its 2K context into 4 splits of 4 blocks; batch 64 fills the GPU.
    assert pk.default_splits(4, 16) == 4 and pk.default_splits(4, 1024) == pk.TARGET_PROGRAMS // 4
    assert pk.default_splits(64 * 4, 16) == 1 and pk.default_splits(32 * 4, 1024) == 2


def test_bad_inputs_are_named():
    q, cache, q_pos, sink = make_case(6, 1, False)
    pool = cache.pool
    call = lambda **kw: pk.paged_attention(**{**dict(q=q, k_pages=pool.k, v_pages=pool.v, page_table=cache.page_table,
                                                     q_pos=q_pos, scale=1.0, interpret=True), **kw})  # fmt: skip
    with pytest.raises(ValueError, match="head dim"):
        call(q=q[..., :16])
    with pytest.raises(ValueError, match="q_pos"):
        call(q_pos=q_pos[:2])
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        call(k_scale=jnp.ones(pool.k.shape[:3]))
    with pytest.raises(ValueError, match="sink"):
        call(sink=sink[:3])
    with pytest.raises(ValueError, match="groups"):
        call(kv_heads=jnp.arange(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match="multiples of 16"):  # Triton's limits apply to the compiled kernel only
        pk.paged_attention(q[..., :24], pool.k[..., :24], pool.v, cache.page_table, q_pos, scale=1.0)
    with pytest.raises(ValueError, match="unknown paged attention"):
        attn.attention_paged(q, cache, q_pos, window_keys=None, sink=None, scale=1.0, paged_impl="triton")


def test_platform_picks_the_kernel():
    assert mimo_jax.RunOptions.for_platform("cuda").paged_attention_impl == "pallas_gpu"
    assert mimo_jax.RunOptions.for_platform("cpu").paged_attention_impl == "xla"
    assert mimo_jax.RunOptions.for_platform("tpu").paged_attention_impl == "xla"
    assert mimo_jax.RunOptions("gpu", paged_impl="xla").paged_attention_impl == "xla"


paged = jax.jit(attn.attention_paged, static_argnames=("window_keys", "scale", "paged_impl"))


@pytest.mark.parametrize(
    "axes,kv,n",
    [(dict(data=2, tensor=2, expert=2), KV, N), (dict(data=2, tensor=4), KV, N), (dict(tensor=8), 1, 8)],
    ids=["kv-split", "kv-replicated", "half-groups"],
)
def test_attention_paged_routes_decode_rows_through_the_kernel_on_a_mesh(axes, kv, n):
    """attention_paged with paged_impl="pallas_interpret" (the kernel in shard_map: rows over data x expert, q heads
    over tensor, kv heads split with them or replicated and picked per shard) equals the XLA path on one device."""
    q, cache, q_pos, sink = make_case(7, 2, True, kv=kv, n=n)
    kwargs = dict(window_keys=None, sink=sink, scale=D**-0.5)
    want = np.asarray(paged(q, cache, q_pos, **kwargs))
    mesh = make_mesh(**axes)
    with jax.set_mesh(mesh):
        pool = jax.device_put(cache.pool, page_pool_shardings([cache.pool], mesh)[0])
        got = np.asarray(paged(q, PagedKV(pool, cache.page_table), q_pos, **kwargs, paged_impl="pallas_interpret"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _triton_module(fn, *args) -> str:
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()


@pytest.mark.parametrize("t,fp8,splits", [(1, False, 1), (4, True, 2)], ids=["bf16-T1", "fp8-T4-split"])
def test_lowers_to_triton_for_cuda_at_flash_shapes(t, fp8, splits):
    """Flash full layers (64 q heads, 4 kv heads, D 192 = 128 + 64, Dv 128, pages of 64): the compiled kernel
    lowers to Triton on this CPU host, so a kernel that would not lower fails here before any GPU run."""
    s = jax.ShapeDtypeStruct
    n, kv, d, dv, page, pages, b = 64, 4, 192, 128, 64, 512, 8
    store = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    scales = (s((pages, kv, page), jnp.float32),) * 2 if fp8 else ()
    args = (s((b, t, n, d), jnp.bfloat16), s((pages, kv, page, d), store), s((pages, kv, page, dv), store),
            s((b, 32), jnp.int32), s((b, t), jnp.int32), s((n,), jnp.float32), *scales)  # fmt: skip

    def fn(q, k, v, table, pos, sink, *scales):
        return pk.paged_attention(
            q, k, v, table, pos, scale=d**-0.5, sink=sink, k_scale=scales[0] if scales else None,
            v_scale=scales[1] if scales else None, config=pk.PagedConfig(splits=splits),
        )  # fmt: skip

    text = _triton_module(fn, *args)
    assert text.count("xla.gpu.triton") == 1 and 'name = "paged_attention"' in text


def test_lowers_for_cuda_inside_shard_map():
    """The model's path (paged_impl "pallas_gpu" on a mesh, varying-axis checks on) lowers for CUDA here."""
    q, cache, q_pos, sink = make_case(8, 1, False, jnp.bfloat16)
    mesh = make_mesh(data=2, tensor=4)
    with jax.set_mesh(mesh):
        pool = jax.device_put(cache.pool, page_pool_shardings([cache.pool], mesh)[0])
        lowered = paged.trace(
            q, PagedKV(pool, cache.page_table), q_pos, window_keys=None, sink=sink, scale=0.1, paged_impl="pallas_gpu"
        ).lower(lowering_platforms=("cuda",))
    assert "paged_attention" in lowered.as_text()
