"""Bytes <-> Python values: msgpack framing and the float32/float16 vector blob."""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

# Wire dtype name -> numpy little-endian dtype. Vectors travel as one row-major blob.
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """Decode one msgpack frame; raises ValueError (and subclasses) on anything malformed."""
    return msgpack.unpackb(frame, raw=False)


def vectors_to_blob(vectors: np.ndarray, dtype: str = "float32") -> bytes:
    """(n, dim) array -> little-endian row-major bytes of the wire dtype, with no per-float work."""
    return np.ascontiguousarray(vectors, dtype=DTYPES[dtype]).tobytes()


def blob_to_vectors(data: bytes, shape: list[int] | tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    """Inverse of :func:`vectors_to_blob`; returns a float32 array in native byte order."""
    arr = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(tuple(shape))
    return arr.astype(np.float32)
