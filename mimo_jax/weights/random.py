"""Random weights at a config's real shapes, made on the devices (benchmarks, load tests, the AOT table).

"flash-slice-N" is MiMo-V2-Flash (configs/mimo-v2-flash.json) cut to N layers in the real pattern: layer 0
full attention + dense MLP, the rest SWA + MoE; "flash-layers-N" its first N layers as released. Any
config.json path also works. Weights are created on the device by jitted initializers (no host copy).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.quant import BlockQuantized
from mimo_jax.sharding import make_mesh
from mimo_jax.weights.loader import abstract_params

# the repository's configs/ (a source checkout; installed packages take a config.json path instead)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def bench_config(model: str, scale_down: bool = False) -> MiMoConfig:
    """'flash-slice-N' or a config.json path; `scale_down` divides the sizes for a CPU run."""
    if model.startswith("flash-layers-"):  # the real Flash pattern (full attention at 0, 5, 11, ...)
        cfg = MiMoConfig.from_json(os.path.join(CONFIG_DIR, "mimo-v2-flash.json"))
        cfg = cfg.first_layers(int(model.rsplit("-", 1)[1]))
    elif model.startswith("flash-slice-"):
        n = int(model.rsplit("-", 1)[1])
        cfg = MiMoConfig.from_json(os.path.join(CONFIG_DIR, "mimo-v2-flash.json"))
        cfg = cfg.replace(num_layers=n, sliding=(False,) + (True,) * (n - 1), moe=(False,) + (True,) * (n - 1))
    else:
        cfg = MiMoConfig.from_json(model)
    if scale_down:
        cfg = cfg.replace(
            vocab_size=cfg.vocab_size // 32,
            hidden_size=cfg.hidden_size // 16,
            intermediate_size=cfg.intermediate_size // 32,
            moe_intermediate_size=cfg.moe_intermediate_size // 16,
            num_heads=max(cfg.num_heads // 16, 1),
            swa_num_heads=max(cfg.swa_num_heads // 16, 1),
            num_kv_heads=1,
            swa_num_kv_heads=max(cfg.swa_num_kv_heads // 4, 1),
            head_dim=cfg.head_dim // 4,
            swa_head_dim=cfg.swa_head_dim // 4,
            v_head_dim=cfg.v_head_dim // 4,
            swa_v_head_dim=cfg.swa_v_head_dim // 4,
            num_experts=max(cfg.num_experts // 16, cfg.experts_per_token),
            experts_per_token=max(cfg.experts_per_token // 4, 1),
            partial_rotary_factor=0.5,
        )
    return cfg


def random_model(
    cfg: MiMoConfig,
    dtype: jnp.dtype,
    options: RunOptions | None = None,
    mesh: jax.sharding.Mesh | None = None,
    weights: str = "bf16",
    mtp_layers: int = 0,
):
    """A MiMoModel (with `mtp_layers` MTP layers) with random weights made on the device, one jitted
    initializer per parameter shape, built with `options` (default: for the mesh's platform), its experts
    in the layout that implementation reads.

    `weights="fp8"`: the parameters `load_model(..., weights="fp8")` would place for this config
    (float8 blocks + float32 scales for the kinds the loader keeps in FP8), filled with random values.
    """
    if weights == "fp8" and cfg.quantization is None:
        cfg = cfg.replace(quantization={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    graphdef, state = abstract_params(cfg, dtype, mesh, weights, mtp_layers, options)

    @functools.cache
    def initializer(kind: str, shape: tuple, leaf_dtype: jnp.dtype, sharding):
        if kind == "ones":
            fn = lambda k: jnp.ones(shape, leaf_dtype)
        elif kind == "zeros":
            fn = lambda k: jnp.zeros(shape, leaf_dtype)
        elif kind == "scale":
            fn = lambda k: jnp.full(shape, 0.02 / 4, leaf_dtype)  # fp8 values ~ N(0, 4^2) -> weights ~ N(0, 0.02^2)
        elif kind == "fp8":
            fn = lambda k: (4.0 * jax.random.normal(k, shape, jnp.float32)).astype(leaf_dtype)
        else:
            fn = lambda k: jax.random.normal(k, shape, leaf_dtype) * jnp.asarray(0.02, leaf_dtype)
        return jax.jit(fn, out_shardings=sharding)

    def make(path: tuple, leaf, key: jax.Array):
        if isinstance(leaf, BlockQuantized):
            k1, k2 = jax.random.split(key)
            return dataclasses.replace(
                leaf,
                values=initializer("fp8", tuple(leaf.values.shape), leaf.values.dtype, leaf.values.sharding)(k1),
                scales=initializer("scale", tuple(leaf.scales.shape), leaf.scales.dtype, leaf.scales.sharding)(k2),
            )
        name = "/".join(map(str, path))
        if name.endswith("norm/weight") or "layernorm" in name:
            kind = "ones"
        elif name.endswith("correction_bias"):
            kind = "zeros"
        else:
            kind = "normal"
        return initializer(kind, tuple(leaf.shape), jnp.dtype(leaf.dtype), leaf.sharding)(key)

    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(0), len(flat))
    values = [(path, var.replace(make(path, var.get_value(), k))) for (path, var), k in zip(flat, keys, strict=True)]
    return nnx.merge(graphdef, nnx.from_flat_state(values))
