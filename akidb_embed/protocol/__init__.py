"""The wire protocol: message types, codec and error codes (see docs/protocol.md)."""
from akidb_embed.protocol.codec import blob_to_vectors, pack, unpack, vectors_to_blob
from akidb_embed.protocol.errors import (
    BackendUnavailable, BadRequest, EmbedError, ErrorCode, InputTooLong, InternalError, Overloaded, PoisonInput,
    PayloadTooLarge, ShuttingDown, Timeout, UnknownBackend, Unauthorized, WorkerDied, error_from_wire,
)
from akidb_embed.protocol.messages import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION", "BackendUnavailable", "BadRequest", "EmbedError", "ErrorCode", "InputTooLong",
    "InternalError", "Overloaded", "PayloadTooLarge", "PoisonInput", "ShuttingDown", "Timeout", "Unauthorized",
    "UnknownBackend", "WorkerDied",
    "blob_to_vectors", "error_from_wire", "pack", "unpack", "vectors_to_blob",
]
