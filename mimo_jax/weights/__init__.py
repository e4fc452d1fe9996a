"""Checkpoint reading and import into model parameters."""

from mimo_jax.weights.checkpoint import Checkpoint
from mimo_jax.weights.loader import abstract_model, load_params, parameter_sources
from mimo_jax.weights.safetensors_io import CheckpointError, SafetensorsFile

__all__ = ["Checkpoint", "CheckpointError", "SafetensorsFile", "abstract_model", "load_params", "parameter_sources"]
