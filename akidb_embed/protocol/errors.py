"""Error codes that cross process boundaries, and the exception tree used inside a process.

Exception tree (every class carries ``.code``, ``.retryable`` and a human message)::

    EmbedError
     ├── BadRequest            BAD_REQUEST          not retryable
     ├── UnknownBackend        UNKNOWN_BACKEND      not retryable
     ├── BackendUnavailable    BACKEND_UNAVAILABLE  retryable
     ├── Timeout               TIMEOUT              retryable
     ├── WorkerDied            WORKER_DIED          retryable
     ├── Overloaded            OVERLOADED           retryable
     ├── PoisonInput           POISON_INPUT         not retryable
     ├── InputTooLong          INPUT_TOO_LONG       not retryable
     ├── ShuttingDown          SHUTTING_DOWN        retryable
     ├── ServerUnavailable     SERVER_UNAVAILABLE   retryable (raised by the client: no server answers)
     ├── PayloadTooLarge       PAYLOAD_TOO_LARGE    not retryable
     ├── Unauthorized          UNAUTHORIZED         not retryable
     └── InternalError         INTERNAL             not retryable

On the wire an error is the map ``{"code": str, "message": str, "retryable": bool}``;
:func:`error_from_wire` turns it back into the matching exception class.
"""
from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_BACKEND = "UNKNOWN_BACKEND"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    TIMEOUT = "TIMEOUT"
    WORKER_DIED = "WORKER_DIED"
    OVERLOADED = "OVERLOADED"
    POISON_INPUT = "POISON_INPUT"
    INPUT_TOO_LONG = "INPUT_TOO_LONG"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    SERVER_UNAVAILABLE = "SERVER_UNAVAILABLE"
    INTERNAL = "INTERNAL"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNAUTHORIZED = "UNAUTHORIZED"


class EmbedError(Exception):
    """Base of every error the service reports. ``code`` is stable; ``message`` is for people."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "retryable": self.retryable}


class BadRequest(EmbedError):
    code = ErrorCode.BAD_REQUEST


class UnknownBackend(EmbedError):
    code = ErrorCode.UNKNOWN_BACKEND


class BackendUnavailable(EmbedError):
    code = ErrorCode.BACKEND_UNAVAILABLE
    retryable = True


class Timeout(EmbedError):
    code = ErrorCode.TIMEOUT
    retryable = True


class WorkerDied(EmbedError):
    code = ErrorCode.WORKER_DIED
    retryable = True


class Overloaded(EmbedError):
    code = ErrorCode.OVERLOADED
    retryable = True


class PoisonInput(EmbedError):
    code = ErrorCode.POISON_INPUT


class InputTooLong(EmbedError):
    """A text has more tokens than the model reads and the request asked for ``truncate = "none"``."""
    code = ErrorCode.INPUT_TOO_LONG


class ShuttingDown(EmbedError):
    code = ErrorCode.SHUTTING_DOWN
    retryable = True


class ServerUnavailable(EmbedError):
    """No supervisor at the endpoint, or the connection to it was lost while waiting (client side)."""
    code = ErrorCode.SERVER_UNAVAILABLE
    retryable = True


class InternalError(EmbedError):
    code = ErrorCode.INTERNAL


class PayloadTooLarge(EmbedError):
    """A frame, a text or a request over a configured byte limit (the message names the limit)."""
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Unauthorized(EmbedError):
    """An operator command from a peer that is not an operator."""
    code = ErrorCode.UNAUTHORIZED


_BY_CODE: dict[str, type[EmbedError]] = {
    cls.code.value: cls
    for cls in (
        BadRequest, UnknownBackend, BackendUnavailable, Timeout, WorkerDied,
        Overloaded, PoisonInput, InputTooLong, ShuttingDown, ServerUnavailable, InternalError, PayloadTooLarge,
        Unauthorized,
    )
}


def error_from_wire(obj: Any) -> EmbedError:
    """Rebuild the exception for a wire error map; unknown codes become :class:`InternalError`."""
    if not isinstance(obj, dict):
        return InternalError(f"malformed error object: {obj!r}")
    code = str(obj.get("code", "INTERNAL"))
    message = str(obj.get("message", ""))
    cls = _BY_CODE.get(code, InternalError)
    err = cls(message if cls is not InternalError or code == "INTERNAL" else f"{code}: {message}")
    if "retryable" in obj:
        err.retryable = bool(obj["retryable"])
    return err
