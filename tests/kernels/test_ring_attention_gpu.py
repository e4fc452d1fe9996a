"""Pallas sliding-window ring decode attention (mimo_jax.kernels.ring_attention_gpu) in interpreter mode on CPU,
against the model's XLA path (`update_and_read` then `attention`: the ring read before the write, concatenated
with the new keys). The compiled kernel lowers to Triton for CUDA here (jax.export); bench/check_ring_kernel.py
runs it on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.kernels import ring_attention_gpu as rk
from mimo_jax.model import attention as attn
from mimo_jax.model.cache import LayerKV, cache_shardings, ring_holds_window, update_and_read, write_ring
from mimo_jax.model.mimo import Attention
from mimo_jax.sharding import make_mesh
from tests.fixtures import TINY

# GQA groups of 4 q heads, unequal head dims (48 = 32 + 16 in MMA chunks); a window of 66 keys in a ring of 70
# slots: two blocks of 64 slots, the second cut at the ring's end.
B, N, KV, D, DV, WINDOW, SLOTS = 4, 8, 2, 48, 32, 66, 70


def make_case(seed: int, t: int, dtype=jnp.float32, slots: int = SLOTS):
    """(q, ring, new k, new v, q_pos, sink). Row 0 has a long history (the ring wrapped, its oldest slots outside
    the window), row 1 three keys and stale drafts past its next position (a rejected speculation), row 2 is
    padding, row 3's last query is padding."""
    rs = np.random.RandomState(seed)
    nxt = np.array([300, 3, -1, 40])  # each row's next position
    pos = np.full((B, slots), -1, np.int32)
    for row, n in enumerate(nxt):
        for p in range(max(0, n - slots), max(n, 0)):
            pos[row, p % slots] = p
    for p in (4, 5, 6):  # row 1: drafts at positions 4 .. 6 that verification rejected
        pos[1, p % slots] = p
    k = jnp.asarray(rs.randn(B, KV, slots, D) * 2, jnp.float32).astype(dtype)
    v = jnp.asarray(rs.randn(B, KV, slots, DV), jnp.float32).astype(dtype)
    ring = LayerKV(k, v, jnp.asarray(pos), ring=True)
    q_pos = np.where(nxt[:, None] >= 0, nxt[:, None] + np.arange(t)[None], -1)
    if t > 1:
        q_pos[3, -1] = -1
    new_k = jnp.asarray(rs.randn(B, t, KV, D), jnp.float32).astype(dtype)
    new_v = jnp.asarray(rs.randn(B, t, KV, DV), jnp.float32).astype(dtype)
    q = jnp.asarray(rs.randn(B, t, N, D), jnp.float32).astype(dtype)
    sink = jnp.asarray(rs.randn(N) + 1, jnp.float32)
    return q, ring, new_k, new_v, jnp.asarray(q_pos, jnp.int32), sink


def oracle(q, ring, new_k, new_v, q_pos, sink):
    keys, values, key_pos, _ = update_and_read(ring, new_k, new_v, q_pos)
    return attn.attention(q, keys, values, q_pos, key_pos, window_keys=WINDOW, sink=sink, scale=D**-0.5)


def run_kernel(q, ring, new_k, new_v, q_pos, sink):
    ring = write_ring(ring, new_k, new_v, q_pos)
    return rk.ring_attention(
        q, ring.k, ring.v, ring.pos, q_pos, window=WINDOW, scale=D**-0.5, sink=sink, interpret=True
    )


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("sink", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_xla_ring_attention(t, sink, dtype):
    q, ring, new_k, new_v, q_pos, sinks = make_case(t, t, dtype)
    assert ring_holds_window(SLOTS, WINDOW, t)
    args = (q, ring, new_k, new_v, q_pos, sinks if sink else None)
    want = np.asarray(oracle(*args), np.float32)
    got = np.asarray(run_kernel(*args), np.float32)
    assert got.shape == (B, t, N, DV) and (got[2] == 0).all()  # padding sees nothing
    real = np.asarray(q_pos) >= 0  # (XLA's padding rows without a sink average every value: never read)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got[real], want[real], rtol=tol, atol=tol)


def test_keys_outside_the_window_and_stale_drafts_are_invisible():
    """Poison what no query may see (row 0's slots older than the window, row 1's rejected drafts past its query):
    the output does not change."""
    q, ring, new_k, new_v, q_pos, sink = make_case(5, 1)
    pos, last = np.asarray(ring.pos), np.asarray(q_pos)[:, :1]
    hidden = (pos >= 0) & ((last - pos >= WINDOW) | (pos > last))
    assert hidden[0].any() and hidden[1].any()
    poisoned = LayerKV(jnp.where(hidden[:, None, :, None], 1e4, ring.k), ring.v, ring.pos, ring=True)
    np.testing.assert_allclose(
        np.asarray(run_kernel(q, poisoned, new_k, new_v, q_pos, sink)),
        np.asarray(run_kernel(q, ring, new_k, new_v, q_pos, sink)),
        rtol=1e-6,
    )


def test_ring_holds_window():
    assert ring_holds_window(129, 128, 1) and ring_holds_window(131, 128, 4)
    assert not ring_holds_window(129, 128, 3) and not ring_holds_window(128, 128, 2)
    full = LayerKV(jnp.zeros((1, 1, 4, 2)), jnp.zeros((1, 1, 4, 2)), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="sliding-window ring"):
        write_ring(full, jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1), jnp.int32))


def test_bad_inputs_are_named():
    q, ring, new_k, new_v, q_pos, sink = make_case(6, 1)
    call = lambda **kw: rk.ring_attention(**{**dict(q=q, k=ring.k, v=ring.v, pos=ring.pos, q_pos=q_pos, window=WINDOW,
                                                    scale=1.0, interpret=True), **kw})  # fmt: skip
    with pytest.raises(ValueError, match="do not match"):
        call(q=q[..., :16])
    with pytest.raises(ValueError, match="q_pos"):
        call(q_pos=q_pos[:2])
    with pytest.raises(ValueError, match="sink"):
        call(sink=sink[:3])
    with pytest.raises(ValueError, match="multiples of 16"):  # Triton's limits apply to the compiled kernel only
        rk.ring_attention(q[..., :24], ring.k[..., :24], ring.v, ring.pos, q_pos, window=WINDOW, scale=1.0)
    with pytest.raises(ValueError, match="unknown ring attention"):
        Attention(MiMoConfig.from_dict(TINY).layers[1], 64, 1.0, jnp.float32, None, ring_impl="triton")


def test_platform_picks_the_kernel():
    assert mimo_jax.RunOptions.for_platform("cuda").ring_attention_impl == "pallas_gpu"
    assert mimo_jax.RunOptions.for_platform("cpu").ring_attention_impl == "xla"
    assert mimo_jax.RunOptions.for_platform("tpu").ring_attention_impl == "xla"
    assert mimo_jax.RunOptions("gpu", ring_impl="xla").ring_attention_impl == "xla"


ring_jit = jax.jit(attn.ring_kernel, static_argnames=("window", "scale", "interpret"))


@pytest.mark.parametrize("axes", [dict(data=2, tensor=2, expert=2), dict(data=4, tensor=2)], ids=["dxtxe", "dxt"])
def test_ring_kernel_on_a_mesh_equals_one_device(axes):
    """`ring_kernel` in `jax.shard_map`: rows over the batch axes, q heads and their kv heads over tensor."""
    q, cache, new_k, new_v, q_pos, sink = make_case(9, 3)
    written = write_ring(cache, new_k, new_v, q_pos)
    kwargs = dict(window=WINDOW, sink=sink, scale=D**-0.5, interpret=True)
    want = np.asarray(ring_jit(q, written, q_pos, **kwargs))
    mesh = make_mesh(**axes)
    with jax.set_mesh(mesh):
        placed = jax.device_put(written, cache_shardings([written], mesh)[0])
        assert attn.ring_kernel_fits(q.shape, placed)
        got = np.asarray(ring_jit(q, placed, q_pos, **kwargs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kv_heads_not_split_with_the_q_heads_stay_on_xla():
    q, cache, *_ = make_case(10, 1)
    with jax.set_mesh(make_mesh(tensor=4, expert=2)):  # 8 q heads over 4 shards, 2 kv heads not
        assert not attn.ring_kernel_fits(q.shape, cache)


def test_lowers_for_cuda_inside_shard_map():
    """The model's path (ring_impl "pallas_gpu" on a mesh, varying-axis checks on) lowers for CUDA here."""
    q, cache, new_k, new_v, q_pos, sink = make_case(11, 1, jnp.bfloat16)
    mesh = make_mesh(data=2, tensor=2)
    with jax.set_mesh(mesh):
        placed = jax.device_put(cache, cache_shardings([cache], mesh)[0])
        lowered = ring_jit.trace(q, placed, q_pos, window=WINDOW, sink=sink, scale=0.1, interpret=False).lower(
            lowering_platforms=("cuda",)
        )
    assert "ring_attention" in lowered.as_text()


@pytest.mark.parametrize("t", [1, 4])
def test_lowers_to_triton_for_cuda_at_flash_shapes(t):
    """Flash SWA layers (64 q heads, 8 kv heads, D 192 = 128 + 64, Dv 128, a 128-key window in a ring of 128 + t
    slots): the compiled kernel lowers to Triton on this CPU host, so a kernel that would not lower fails here."""
    s = jax.ShapeDtypeStruct
    n, kv, d, dv, b, slots = 64, 8, 192, 128, 4, 128 + t
    args = (s((b, t, n, d), jnp.bfloat16), s((b, kv, slots, d), jnp.bfloat16), s((b, kv, slots, dv), jnp.bfloat16),
            s((b, slots), jnp.int32), s((b, t), jnp.int32), s((n,), jnp.float32))  # fmt: skip

    def fn(q, k, v, pos, q_pos, sink):
        return rk.ring_attention(q, k, v, pos, q_pos, window=128, scale=d**-0.5, sink=sink)

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()
    assert text.count("xla.gpu.triton") == 1 and 'name = "ring_attention"' in text
