"""The gather-based expert paths (decode) compute the same as the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.model import moe


def test_gather_experts_equal_dense():
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (5, 16))
    w_gate, w_up = jax.random.normal(k[1], (8, 16, 12)), jax.random.normal(k[2], (8, 16, 12))
    w_down = jax.random.normal(k[3], (8, 12, 16))
    router = jax.random.normal(k[4], (8, 16))
    weights, ids = moe.route(
        x, router, jnp.zeros(8), top_k=3, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.5
    )
    want = moe.experts_dense(x, weights, ids, w_gate, w_up, w_down)
    for impl in ("gather", "gather_fused"):
        got = moe.EXPERT_IMPLS[impl](x, weights, ids, w_gate, w_up, w_down)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=impl)
