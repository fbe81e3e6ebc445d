"""Bytes <-> Python values: msgpack framing and the float32/float16 vector blob."""
from __future__ import annotations

import re
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


MAX_CONTAINERS = 32   # arrays + maps in one request frame (a valid request has 2)


class TooLarge(ValueError):
    """A string or an array in a frame is longer than the decoder's limit."""

    def __init__(self, what: str, size: int) -> None:
        super().__init__(f"{what} of {size}")
        self.what, self.size = what, size


def unpack_bounded(frame: bytes, *, max_str: int, max_array: int, max_map: int = 64) -> Any:
    """Decode one untrusted frame with explicit limits, so its Python objects stay within a small
    multiple of its bytes: every string and bin at most ``max_str`` bytes, every array at most
    ``max_array`` items, every map at most ``max_map`` pairs, at most MAX_CONTAINERS arrays and maps,
    no ext types. Raises :class:`TooLarge` for a length limit, ValueError (and subclasses) otherwise.
    """
    count = [0]

    def container(obj: Any) -> Any:
        count[0] += 1
        if count[0] > MAX_CONTAINERS:
            raise ValueError(f"more than {MAX_CONTAINERS} arrays and maps")
        return obj

    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, max_str_len=max_str, max_bin_len=max_str,
                               max_array_len=max_array, max_map_len=max_map, max_ext_len=0,
                               list_hook=container, object_hook=container)
    except ValueError as exc:
        m = re.fullmatch(r"(\d+) exceeds max_(str|bin|array)_len\(\d+\)", str(exc))
        if m:
            raise TooLarge("an array" if m.group(2) == "array" else "a string", int(m.group(1))) from exc
        raise


def peek_field(frame: bytes, name: str, peek_bytes: int = 4096, max_pairs: int = 16) -> Any:
    """The value of ``name`` in a map frame, read from its first ``peek_bytes`` only (for a frame too
    big or too broken to decode whole); None when it is not found there or not a short scalar."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=peek_bytes, max_str_len=peek_bytes,
                                    max_bin_len=peek_bytes, max_array_len=0, max_map_len=0, max_ext_len=0)
        unpacker.feed(frame[:peek_bytes])
        for _ in range(min(unpacker.read_map_header(), max_pairs)):
            if unpacker.unpack() == name:
                return unpacker.unpack()
            unpacker.skip()
    except Exception:  # noqa: BLE001  out of data, not a map, a container where a scalar was expected
        return None
    return None


def vectors_to_blob(vectors: "np.ndarray", dtype: str = "float32") -> bytes:
    """(n, dim) array -> little-endian row-major bytes of the wire dtype, with no per-float work."""
    import numpy as np
    return np.ascontiguousarray(vectors, dtype=DTYPES[dtype]).tobytes()


def blob_to_vectors(data: bytes, shape: list[int] | tuple[int, ...], dtype: str = "float32") -> "np.ndarray":
    """Inverse of :func:`vectors_to_blob`; returns a float32 array in native byte order."""
    import numpy as np
    arr = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(tuple(shape))
    return arr.astype(np.float32)
