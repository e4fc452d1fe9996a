"""A loaded model ready to run: parameters, config and jitted entry points."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.model.mimo import MiMoModel, relayout_experts, with_draft_vocab
from mimo_jax.sharding import batch_sharding, place_model
from mimo_jax.weights import WEIGHT_MODES, load_params
from mimo_jax.weights.demo import demo_model_dir
from mimo_jax.weights.draft_vocab import read_draft_vocab
from mimo_jax.weights.orbax_store import is_converted, read_meta, restore_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class LanguageModel:
    """What `load_model` returns: `.model` (Flax NNX), `.config`, `.mesh`, and `.logits(...)`.

    With a mesh, the forward is traced and run inside `mesh_context()` (`jax.set_mesh`), which
    is how the model finds the mesh (activation constraints, expert-parallel MoE); code that
    jits its own model calls (the engine's device functions) runs them in `lm.mesh_context()` the same way.
    """

    def __init__(self, model: MiMoModel, mesh: jax.sharding.Mesh | None = None, source: str | None = None):
        self.model = model
        self.config: MiMoConfig = model.config
        self.mesh = mesh
        self.source = source
        if mesh is not None:
            place_model(model, mesh)
        self.graphdef, self.params = nnx.split(model)
        graphdef = self.graphdef

        def forward_logits(params: nnx.State, token_ids: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, params)(token_ids)[0]

        if mesh is None:
            self._logits = jax.jit(forward_logits)
        else:
            # params stay where the rules put them; logits come back whole (np.asarray works on every host)
            param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
            self._logits = jax.jit(
                forward_logits,
                in_shardings=(param_shardings, None),
                out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            )

    @property
    def options(self) -> RunOptions:
        return self.model.options

    def with_options(self, options: RunOptions) -> LanguageModel:
        """The same placed weights computed as `options` say (a new graph; nothing is copied or moved)."""
        return LanguageModel(self.model.with_options(options), mesh=self.mesh, source=self.source)

    def mesh_context(self):
        """Context to trace and run model calls in: `jax.set_mesh(self.mesh)`, or nothing without a mesh."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    @property
    def dtype(self) -> jnp.dtype:
        return self.model.dtype

    def logits(self, token_ids: Any) -> np.ndarray:
        """int token ids [batch, seq] -> float32 logits [batch, seq, vocab] (numpy)."""
        ids = np.asarray(token_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be a 2-D integer array [batch, seq], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        ids = ids.astype(np.int32)
        with self.mesh_context():
            if self.mesh is not None:
                # every process passes the same ids; each keeps its own devices' slice
                ids = jax.device_put(ids, batch_sharding(self.mesh, ids.shape))
            return np.asarray(self._logits(self.params, ids))


def load_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    weights: str = "bf16",
    mtp: bool | int = False,
    mesh: jax.sharding.Mesh | None = None,
    *,
    options: RunOptions | None = None,
    progress: bool = False,
    draft_vocab: int | None = None,
) -> LanguageModel:
    """Load a MiMo-V2 checkpoint directory (config.json + safetensors) into a `LanguageModel`.

    `weights`: "bf16" dequantizes FP8 checkpoints into `dtype` at load; "fp8" keeps FP8 blocks on
    the devices (dequantized inside the jitted matmuls). `mtp`: True loads every MTP layer the
    config declares (an int: that many). `path` may be "demo" (the embedded demo checkpoint,
    `mimo_jax/demo_model`), or an Orbax checkpoint written by
    `python -m mimo_jax.tools.convert`, restored onto `mesh` whatever mesh it was written from.
    `mesh`: where parameters live (None: the first device);
    each device receives only its own slices, read straight from the files.
    `options`: how the model computes (None: `RunOptions` for the devices' platform); the experts are
    stored in the layout its MoE implementation reads.
    `draft_vocab`: with MTP layers, the drafts choose among the N most frequent tokens of the checkpoint's
    `draft_vocab.json` (`mimo_jax.weights.draft_vocab`; None: the size that file names, or none without the
    file; 0: the whole vocabulary). Lossless: the verify scores every token.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_MODES}")
    if os.fspath(path) == "demo" and not os.path.exists(path):  # the checkpoint shipped in the package
        path = demo_model_dir()
    if options is None:
        devices = mesh.devices.flat if mesh is not None else jax.devices()
        options = RunOptions.for_platform(devices[0].platform)
    if is_converted(path):  # written by `python -m mimo_jax.tools.convert`
        mtp_layers = int(read_meta(path).get("mtp_layers", 0)) if mtp is True else int(mtp)
        model = restore_params(path, DTYPES[dtype], weights, mtp_layers, mesh, options)
    else:
        cfg = MiMoConfig.from_json(path) if os.path.isdir(path) else None
        mtp_layers = (cfg.num_mtp_layers if cfg else 0) if mtp is True else int(mtp)
        model = load_params(
            path, DTYPES[dtype], weights=weights, mtp_layers=mtp_layers, mesh=mesh, progress=progress, options=options
        )
    model = relayout_experts(model)  # expert weights in the layout the chosen implementation reads
    if len(model.mtp) and os.path.isdir(path):
        draft_ids = read_draft_vocab(path, draft_vocab)
        if draft_ids is not None:
            model = with_draft_vocab(model, draft_ids)
    elif draft_vocab:
        raise ValueError(f"draft_vocab={draft_vocab} needs MTP layers (mtp=True) and a checkpoint directory")
    return LanguageModel(model, mesh=mesh, source=os.fspath(path))
