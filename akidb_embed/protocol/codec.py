"""Bytes <-> Python values: msgpack framing and the float32/float16 vector blob."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import numpy as np

# Wire dtype name -> numpy little-endian dtype. Vectors travel as one row-major blob. numpy is
# imported only where vectors are made or read (workers, clients), never by the supervisor.
DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """Decode one msgpack frame; raises ValueError (and subclasses) on anything malformed."""
    return msgpack.unpackb(frame, raw=False)


def vectors_to_blob(vectors: "np.ndarray", dtype: str = "float32") -> bytes:
    """(n, dim) array -> little-endian row-major bytes of the wire dtype, with no per-float work."""
    import numpy as np
    return np.ascontiguousarray(vectors, dtype=DTYPES[dtype]).tobytes()


def blob_to_vectors(data: bytes, shape: list[int] | tuple[int, ...], dtype: str = "float32") -> "np.ndarray":
    """Inverse of :func:`vectors_to_blob`; returns a float32 array in native byte order."""
    import numpy as np
    arr = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(tuple(shape))
    return arr.astype(np.float32)
