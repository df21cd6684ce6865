"""Minimal safetensors reading and writing on numpy, bf16 included.

`safetensors`' own numpy backend has no bfloat16, so tensors are read from the file's raw bytes
(memory-mapped: only the tensor being read is paged in) and viewed as `ml_dtypes.bfloat16`.
The library still validates every file first, so a truncated or corrupt file is reported with
its name. Writing produces the standard layout (8-byte header length, JSON header, data),
with `{"format": "pt"}` metadata so transformers' `from_pretrained` accepts the files.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

# safetensors' dtype codes (the file format's own names, not ours).
_CODES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _CODES.items()}


class SafetensorsFormatError(ValueError):
    """A safetensors file that is missing, truncated or malformed (message names the file)."""


class SafetensorsReader:
    """Lazily reads named tensors from one .safetensors file as numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            from safetensors import safe_open

            with safe_open(self.path, framework="numpy"):
                pass  # full header/coverage validation by the reference implementation
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except Exception as e:  # SafetensorError, OSError, JSON errors: one line, with the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SafetensorsFormatError(f"{self.path}: unreadable safetensors file ({msg})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._data_start = 8 + n
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name]["dtype"]
        if code not in _CODES:
            raise SafetensorsFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return _CODES[code]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the memory map."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._header[name]["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (numpy, any supported dtype incl. ml_dtypes.bfloat16) to `path`."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the spec recommends
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def shard_groups(items: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split (name, nbytes) in order into consecutive groups of at most max_bytes (>= 1 each)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups
