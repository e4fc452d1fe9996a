"""mimo_jax: a JAX/Flax inference engine for Xiaomi's MiMo-V2 models."""

from mimo_jax.config import ConfigError, MiMoConfig, RunOptions
from mimo_jax.engine.generation import GenerationResult, generate
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.lm import LanguageModel, load_model
from mimo_jax.model.mimo import MiMoModel
from mimo_jax.sharding import make_mesh

__all__ = [
    "ConfigError",
    "Engine",
    "GenerationResult",
    "LanguageModel",
    "MiMoConfig",
    "MiMoModel",
    "RunOptions",
    "SamplingOptions",
    "generate",
    "load_model",
    "make_mesh",
]
__version__ = "0.1.0"
