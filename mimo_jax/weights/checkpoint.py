"""A checkpoint directory: config.json plus one or many safetensors files (with or without index)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from mimo_jax.config import MiMoConfig
from mimo_jax.weights.safetensors_io import CheckpointError, SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """Name -> tensor lookup across every safetensors file of a checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: not a checkpoint directory")
        self.config = MiMoConfig.from_json(self.directory)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index_path = os.path.join(self.directory, INDEX_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            for file_name in sorted(set(weight_map.values())):
                if not os.path.exists(os.path.join(self.directory, file_name)):
                    names = [n for n, fn in weight_map.items() if fn == file_name]
                    raise CheckpointError(
                        f"{index_path}: names file {file_name!r} (for {len(names)} tensors, e.g. {names[0]!r}) "
                        "which does not exist"
                    )
            file_names = sorted(set(weight_map.values()))
            # Files beside the index but not named in it (e.g. model_mtp.safetensors) still count.
            extra = {os.path.basename(p) for p in glob.glob(os.path.join(self.directory, "*.safetensors"))}
            file_names += sorted(extra - set(file_names))
        else:
            weight_map = None
            file_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.directory, "*.safetensors")))
            if not file_names:
                raise CheckpointError(f"{self.directory}: no *.safetensors files")
        for file_name in file_names:
            st = SafetensorsFile(os.path.join(self.directory, file_name))
            self._files[file_name] = st
            for name in st.keys():
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._where[name]} and {file_name}")
                self._where[name] = file_name
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if self._where.get(name) != file_name:
                    raise CheckpointError(
                        f"{index_path}: tensor {name!r} is listed in {file_name} but not stored there"
                    )

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self._where[name])

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def read_rows(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A copy of rows of a tensor (sorted unique first-axis indices; None = all), read without a memory map."""
        return self._file(name).read_rows(name, rows)

    def nbytes(self, name: str) -> int:
        return self._file(name).nbytes(name)

    def close(self) -> None:
        for st in self._files.values():
            st.close()
