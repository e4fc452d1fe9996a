"""mimo_jax: a JAX/Flax inference engine for Xiaomi's MiMo-V2 models."""

from mimo_jax.config import ConfigError, MiMoConfig
from mimo_jax.engine import Engine
from mimo_jax.generation import GenerationResult, generate
from mimo_jax.lm import LanguageModel, load_model
from mimo_jax.model import MiMoModel
from mimo_jax.sampling import SamplingOptions

__all__ = [
    "ConfigError",
    "Engine",
    "GenerationResult",
    "LanguageModel",
    "MiMoConfig",
    "MiMoModel",
    "SamplingOptions",
    "generate",
    "load_model",
]
__version__ = "0.1.0"
