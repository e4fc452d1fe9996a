"""Model math, independent of serving: the MiMo-V2 decoder (`mimo`), attention with sinks (`attention`), the KV
cache layout (`cache`) and the mixture of experts with its expert-parallel dispatch (`moe`)."""

from mimo_jax.model.mimo import MiMoModel, MoE

__all__ = ["MiMoModel", "MoE"]
