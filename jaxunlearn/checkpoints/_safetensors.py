"""Memory-mapped safetensors reading and streaming writing, with bfloat16 via ml_dtypes.

The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header
length, a JSON header mapping each tensor name to dtype, shape and byte offsets, then the
raw little-endian tensor bytes, contiguous. We parse it ourselves instead of using
`safetensors.safe_open` because its numpy backend cannot represent bfloat16 (the dtype of
most published checkpoints) and its flax backend copies each tensor onto the default
device first; a numpy view into a memory map lets the loader copy only the slices each
device needs. The checks mirror the reference implementation, so a truncated or corrupt
file fails here, naming the file, before anything is placed on a device.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class CorruptFileError(ValueError):
    """A weights file is truncated or not valid safetensors."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    Attributes:
      dtype: numpy dtype of the stored values.
      shape: stored shape.
      begin: byte offset of the first value, from the start of the file.
      end: byte offset one past the last value.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _corrupt(path: str | os.PathLike, what: str) -> CorruptFileError:
    return CorruptFileError(
        f"{os.fspath(path)} is not a valid safetensors file ({what}); it is probably truncated "
        "or corrupt: download or save it again."
    )


class SafetensorsFile:
    """Read-only, memory-mapped view of one safetensors file.

    Args:
      path: the ``.safetensors`` file.

    Raises:
      FileNotFoundError: if the file does not exist.
      CorruptFileError: if the header or the data size is inconsistent.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _corrupt(path, f"only {size} bytes, no header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise _corrupt(path, f"header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _corrupt(path, f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise _corrupt(path, "header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                b, e = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(path, f"bad header entry for tensor {name!r}: {entry!r}") from None
            if e - b != math.prod(shape) * dtype.itemsize or b < 0:
                raise _corrupt(path, f"tensor {name!r} has offsets {[b, e]} for shape {shape}")
            self.tensors[name] = TensorInfo(dtype, shape, start + b, start + e)
        # Tensors must tile the data section exactly, as the reference reader requires.
        offset = start
        for info in sorted(self.tensors.values(), key=lambda t: t.begin):
            if info.begin != offset:
                raise _corrupt(path, f"tensor data is not contiguous at byte {info.begin}")
            offset = info.end
        if offset != size:
            raise _corrupt(path, f"header describes {offset} bytes, the file has {size}")
        self._buffer: np.ndarray | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        """Returns tensor `name` as a read-only numpy view into the memory-mapped file."""
        info = self.tensors[name]
        if info.begin == info.end:
            return np.zeros(info.shape, info.dtype)
        if self._buffer is None:
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._buffer[info.begin : info.end].view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class TensorToWrite:
    """One tensor for `write_file`, fetched only when its bytes are written.

    Attributes:
      name: tensor name (the Hugging Face key).
      shape: shape of the array `fetch` returns.
      dtype: numpy dtype of the array `fetch` returns.
      fetch: returns the host array; called once, so only one tensor is in host memory.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_file(
    path: str | os.PathLike, tensors: Iterable[TensorToWrite], metadata: dict[str, str]
) -> None:
    """Writes a safetensors file, streaming one tensor at a time.

    Args:
      path: destination file (written in place; the caller makes the directory atomic).
      tensors: tensors in the order to store them.
      metadata: string-to-string ``__metadata__`` (transformers wants ``{"format": "pt"}``).

    Raises:
      ValueError: if a fetched array does not match its declared shape or dtype.
    """
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _CODES[np.dtype(t.dtype)],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            x = np.ascontiguousarray(t.fetch())
            if x.shape != tuple(t.shape) or x.dtype != np.dtype(t.dtype):
                raise ValueError(
                    f"tensor {t.name!r}: got {x.dtype}{list(x.shape)}, "
                    f"declared {np.dtype(t.dtype)}{list(t.shape)}"
                )
            f.write(x.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
