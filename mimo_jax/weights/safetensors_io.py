"""Memory-mapped safetensors reading with strict validation.

Our own reader (instead of `safetensors.safe_open`) because it gives zero-copy numpy views for
every dtype the checkpoints use (bf16, float8_e4m3fn via ml_dtypes), and lets each device read
only its own slice of a tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; the message names file and tensor."""


class SafetensorsFile:
    """One .safetensors file: validated header, lazily memory-mapped tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors header "
                        f"(claims {header_len} bytes, file has {size})"
                    )
                raw = f.read(header_len)
        except FileNotFoundError as e:
            raise CheckpointError(f"{self.path}: file not found") from e
        try:
            header: dict[str, Any] = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has unsupported dtype or bad entry ({e})"
                ) from None
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry ({e})") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - start != nbytes or start < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans {end - start} bytes but shape {list(shape)} "
                    f"{info['dtype']} needs {nbytes}"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data section "
                    f"but only {data_len} bytes are present"
                )
            self._entries[name] = (dtype, shape, start, end)
        self._check_layout(data_len)
        self._mmap: np.memmap | None = None
        self._fd: int | None = None

    def _check_layout(self, data_len: int) -> None:
        """The tensors tile the data section exactly, as the safetensors library requires: no two share a
        byte, none leaves a gap before it, and nothing follows the last one."""
        spans = sorted((start, end, name) for name, (_, _, start, end) in self._entries.items())
        covered, last, gap = 0, None, None  # bytes [0, covered) are claimed, by `last` at the end
        for start, end, name in spans:
            if start < covered:
                a_start, a_end = self._entries[last][2:]
                raise CheckpointError(
                    f"{self.path}: tensors {last!r} (bytes {a_start}-{a_end}) and {name!r} (bytes {start}-{end}) "
                    "overlap (corrupt safetensors header)"
                )
            if start > covered and gap is None:
                where = f"between {last!r} and {name!r}" if last is not None else f"before {name!r}"
                gap = f"bytes {covered}-{start} of the data section belong to no tensor ({where})"
            covered, last = end, name
        if gap is not None:
            raise CheckpointError(f"{self.path}: {gap} (corrupt safetensors header)")
        if covered < data_len:
            after = f"the last tensor {last!r}" if last is not None else "the header"
            raise CheckpointError(
                f"{self.path}: {data_len - covered} bytes after {after} belong to no tensor (corrupt safetensors file)"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._entries[name]
        return end - start

    def get(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor (backed by the memory map)."""
        dtype, shape, start, end = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self._data_start + start : self._data_start + end]
        return buf.view(dtype).reshape(shape)

    def read_rows(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A copy of the given rows (first-axis indices, sorted and unique; None = all) read with pread.

        Consecutive rows are read in one call, so a device's slice costs a few large reads and
        the process holds only what it asked for (no page-cache-backed memory map grows RSS).
        """
        dtype, shape, start, _ = self._entries[name]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        if rows is None:
            rows = np.arange(shape[0] if shape else 1)
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), *shape[1:]) if shape else (), dtype)
        if not len(rows) or not row_bytes:
            return out
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        flat = out.reshape(-1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run_start, run_end in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            offset = self._data_start + start + int(rows[run_start]) * row_bytes
            view = memoryview(flat[run_start * row_bytes : run_end * row_bytes])
            while len(view):
                n = os.preadv(self._fd, [view], offset)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: tensor {name!r}: file ended while reading (truncated?)")
                view, offset = view[n:], offset + n
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mmap = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (atomically: temporary sibling, then rename)."""
    path = os.fspath(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {
            "dtype": DTYPE_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
