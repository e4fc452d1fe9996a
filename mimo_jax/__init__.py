"""mimo_jax: a JAX/Flax inference engine for Xiaomi's MiMo-V2 models."""

from mimo_jax.config import ConfigError, MiMoConfig
from mimo_jax.lm import LanguageModel, load_model
from mimo_jax.model import MiMoModel

__all__ = ["ConfigError", "LanguageModel", "MiMoConfig", "MiMoModel", "load_model"]
__version__ = "0.1.0"
