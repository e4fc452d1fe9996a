"""Checkpoint reading, the tensor table, streamed loading and the release-layout writer."""

from mimo_jax.weights.checkpoint import Checkpoint
from mimo_jax.weights.loader import WEIGHT_MODES, abstract_model, load_params, validate
from mimo_jax.weights.safetensors_io import CheckpointError, SafetensorsFile
from mimo_jax.weights.table import CheckpointTensor, ParamSource, checkpoint_tensors, parameter_sources

__all__ = [
    "WEIGHT_MODES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointTensor",
    "ParamSource",
    "SafetensorsFile",
    "abstract_model",
    "checkpoint_tensors",
    "load_params",
    "parameter_sources",
    "validate",
]
