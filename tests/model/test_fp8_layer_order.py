"""fp8 weights are dequantized layer by layer (`quant.weight(p, after=x)`), not all at a program's start.

The behaviour shows in compiled memory: without the ordering, the TPU compiler schedules every layer's
dequantization first and the temporaries grow by a layer's bf16 experts per layer (206 -> 1026 MB
from 2 to 6 layers here); with it they stay flat. That growth is what ran a 35-layer Flash out of
memory on 2 x H200 (bench/RESULTS.md). Compiled for a TPU slice with libtpu on the CPU host.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mimo_jax.config import MiMoConfig
from mimo_jax.sharding import make_mesh
from mimo_jax.tools import aot
from mimo_jax.weights.loader import abstract_params
from tests.fixtures import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f'libtpu is not installed (pip install "jax[tpu]=={jax.__version__}"); TPU compilation untested',
)

FLASH = os.path.join(ROOT, "configs", "mimo-v2-flash.json")
EXPERTS, HIDDEN, MOE_INTER, EXPERT_SHARDS = 64, 1024, 1024, 4


def forward_temp_bytes(layers: int) -> int:
    """Temporaries of a compiled prefill forward of the first `layers` Flash layers (fp8, smaller widths)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    mesh = make_mesh(expert=EXPERT_SHARDS, devices=aot.tpu_devices("v5e:2x2"))
    cfg = (
        MiMoConfig.from_json(FLASH)
        .first_layers(layers)
        .replace(
            vocab_size=4096,
            hidden_size=HIDDEN,
            intermediate_size=2048,
            moe_intermediate_size=MOE_INTER,
            num_experts=EXPERTS,
        )
    )
    graphdef, params = abstract_params(cfg, jnp.bfloat16, mesh, "fp8")

    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return model.hidden_states(tokens, positions)[0]

    tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        compiled = jax.jit(forward).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_fp8_dequantization_temporaries_do_not_grow_with_depth():
    layer_experts_bf16 = (EXPERTS // EXPERT_SHARDS) * 3 * HIDDEN * MOE_INTER * np.dtype(jnp.bfloat16).itemsize
    growth = forward_temp_bytes(6) - forward_temp_bytes(2)
    # 4 more MoE layers: ordered, they add 0.8 x layer_experts_bf16 (libtpu 0.0.42); dequantized all at
    # once, 8x. The bound sits between the two.
    assert growth < 2 * layer_experts_bf16, (growth, layer_experts_bf16)
