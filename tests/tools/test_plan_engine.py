"""KV memory planning: the numbers match the caches the engine allocates, and Flash saves ~6x at 256K."""

import os

import jax
import jax.numpy as jnp

from mimo_jax.config import MiMoConfig
from mimo_jax.model.cache import empty_cache, kv_plan
from mimo_jax.tools.plan import main
from tests.fixtures import ROOT, TINY

CONFIGS = os.path.join(ROOT, "configs")


def test_flash_256k_is_about_6x_below_all_full_attention():
    cfg = MiMoConfig.from_json(os.path.join(CONFIGS, "mimo-v2-flash.json"))
    plan = kv_plan(cfg, 262144)
    assert (plan.full_layers, plan.swa_layers) == (9, 39)
    assert plan.full_bytes_per_token == 9 * 4 * (192 + 128) * 2
    assert plan.swa_ring_slots == 129  # the query and 128 earlier keys
    assert plan.swa_bytes == 39 * 8 * (192 + 128) * 2 * 129  # constant in the context
    assert 5.0 < plan.saving < 7.0
    assert kv_plan(cfg, 2 * 262144).swa_bytes == plan.swa_bytes


def test_plan_counts_the_bytes_the_cache_allocates(capsys):
    cfg = MiMoConfig.from_dict(TINY)
    for context, extra in ((40, 0), (40, 3), (3, 0)):
        cache = jax.eval_shape(lambda c=context, e=extra: empty_cache(cfg, 1, c, jnp.bfloat16, e))
        allocated = sum(layer.k.size * 2 + layer.v.size * 2 for layer in cache)
        assert kv_plan(cfg, context, 2, extra).total_bytes == allocated
    main(["--config", os.path.join(CONFIGS, "mimo-v2.5-pro.json"), "--context", "1048576"])
    assert "10 full + 60 SWA layers" in capsys.readouterr().out
