"""What the HTTP and gRPC fronts share: addresses, API keys, error-code mapping, model directory."""
from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from akidb_embed.client import AsyncClient

log = logging.getLogger(__name__)

READY_STATES = ("READY", "DEGRADED")
INFO_TTL_S = 5.0          # the model directory is refreshed this often (and at once on a miss)
QUERY_WAIT_S = 3.0        # info / health from the supervisor: a front answers its probes quickly
MAX_KEY_FILE_BYTES = 1 << 20

# Error code (string: codes added by other modules work before this one knows them) ->
# (HTTP status, OpenAI-shaped error type, gRPC status name).
ERROR_MAP: dict[str, tuple[int, str, str]] = {
    "BAD_REQUEST": (400, "invalid_request_error", "INVALID_ARGUMENT"),
    "INPUT_TOO_LONG": (400, "invalid_request_error", "INVALID_ARGUMENT"),
    "UNAUTHORIZED": (401, "authentication_error", "UNAUTHENTICATED"),
    "UNKNOWN_BACKEND": (404, "invalid_request_error", "NOT_FOUND"),
    "NOT_FOUND": (404, "invalid_request_error", "NOT_FOUND"),           # the fronts' own: no such route
    "PAYLOAD_TOO_LARGE": (413, "invalid_request_error", "RESOURCE_EXHAUSTED"),
    "POISON_INPUT": (422, "invalid_request_error", "FAILED_PRECONDITION"),
    "OVERLOADED": (429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
    "BACKEND_UNAVAILABLE": (503, "server_error", "UNAVAILABLE"),
    "SERVER_UNAVAILABLE": (503, "server_error", "UNAVAILABLE"),
    "SHUTTING_DOWN": (503, "server_error", "UNAVAILABLE"),
    "WORKER_DIED": (503, "server_error", "UNAVAILABLE"),
    "TIMEOUT": (504, "timeout_error", "DEADLINE_EXCEEDED"),
    "INTERNAL": (500, "server_error", "INTERNAL"),
}
RETRY_AFTER_S = {"OVERLOADED": 1, "BACKEND_UNAVAILABLE": 5, "SERVER_UNAVAILABLE": 2, "SHUTTING_DOWN": 5,
                 "WORKER_DIED": 1}


def error_status(code: str) -> tuple[int, str, str]:
    return ERROR_MAP.get(code, ERROR_MAP["INTERNAL"])


class FrontError(Exception):
    """An error answer of a front: a stable code (as on the ZeroMQ wire) and a message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def raise_for_answer(msg: dict[str, Any]) -> dict[str, Any]:
    """A supervisor answer map -> itself when ok, else FrontError with its wire code."""
    if msg.get("ok"):
        return msg
    err = msg.get("error")
    if not isinstance(err, dict):
        raise FrontError("INTERNAL", "malformed error answer from the supervisor")
    raise FrontError(str(err.get("code", "INTERNAL")), str(err.get("message", ""))[:2000])


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def local_endpoint(endpoint: str) -> str:
    """The supervisor's endpoint as a local front connects to it (a wildcard tcp bind -> loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard):]
    return endpoint


class ApiKeys:
    """Keys from a file (one per line, ``#`` comments); a presented key is checked in constant time."""

    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys

    @classmethod
    def load(cls, path: str | None) -> "ApiKeys | None":
        if not path:
            return None
        raw = Path(path).read_bytes()[:MAX_KEY_FILE_BYTES]
        keys = [line.strip() for line in raw.splitlines() if line.strip() and not line.startswith(b"#")]
        if not keys:
            raise ValueError(f"{path}: no API key in the file")
        return cls(keys)

    def check(self, presented: str | None) -> bool:
        """Compare against every key, without stopping at the first match (constant in the key's value)."""
        if not presented:
            return False
        token = presented.encode("utf-8", "replace")
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(token, key)
        return found


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return header or None


@dataclass
class Route:
    """Where a request for a model goes: the backend name, its model id, dimension and abilities."""
    backend: str
    model: str
    dim: int | None
    matryoshka_dims: tuple[int, ...] = ()   # info's extra.matryoshka_dims: the sizes a request may ask for

    @property
    def dimensions_ok(self) -> bool:
        return bool(self.matryoshka_dims)


class Directory:
    """Model id or backend name -> backend, from the supervisor's ``info`` (refreshed on a miss)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.info: dict[str, Any] = {}
        self._at = 0.0

    async def refresh(self, force: bool = False) -> dict[str, Any]:
        if force or not self.info or time.monotonic() - self._at > INFO_TTL_S:
            self.info = raise_for_answer(await self.client.request("info", QUERY_WAIT_S))
            self._at = time.monotonic()
        return self.info

    def _find(self, name: str | None) -> Route | None:
        backends: dict[str, Any] = self.info.get("backends") or {}
        default = self.info.get("default_backend")
        if not name:
            name = default
        if name in backends:
            return _route(name, backends[name])
        # by model id: the default backend first, then in configuration order
        for bname in sorted(backends, key=lambda b: b != default):
            if backends[bname].get("model") == name:
                return _route(bname, backends[bname])
        return None

    async def route(self, name: str | None) -> Route:
        await self.refresh()
        found = self._find(name)
        if found is None:
            await self.refresh(force=True)
            found = self._find(name)
        if found is None:
            names = sorted(set(self.info.get("backends") or {}) |
                           {b.get("model") for b in (self.info.get("backends") or {}).values() if b.get("model")})
            raise FrontError("UNKNOWN_BACKEND", f"no backend or model named {name!r}; available: {', '.join(names)}")
        return found

    def models(self) -> list[dict[str, Any]]:
        """One entry per backend name and per distinct model id (both select a backend)."""
        out: dict[str, dict[str, Any]] = {}
        default = self.info.get("default_backend")
        backends: dict[str, Any] = self.info.get("backends") or {}
        for bname in sorted(backends, key=lambda b: b != default):
            b = backends[bname]
            entry = {"backend": bname, "model": b.get("model"), "dimension": b.get("dim"),
                     "max_tokens": b.get("max_tokens"), "state": b.get("state"), "kind": b.get("kind")}
            out.setdefault(bname, {"id": bname, **entry})
            if b.get("model"):
                out.setdefault(b["model"], {"id": b["model"], **entry})
        return list(out.values())


def _route(name: str, b: dict[str, Any]) -> Route:
    extra = b.get("extra") or {}
    raw = extra.get("matryoshka_dims") if isinstance(extra, dict) else None   # docs/protocol.md, info
    dims = tuple(d for d in raw if type(d) is int and d > 0) if isinstance(raw, list) else ()
    dim = b.get("dim")
    return Route(name, str(b.get("model") or name), dim if isinstance(dim, int) else None, dims)


def check_dimensions(route: Route, dimensions: Any) -> int | None:
    """The ``dimensions`` to pass to the supervisor (None: not needed); FrontError when refused."""
    if dimensions is None:
        return None
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        raise FrontError("BAD_REQUEST", "'dimensions' must be a positive integer")
    if route.dim is not None and dimensions == route.dim:
        return None                      # the model's own size: nothing to cut
    if not route.matryoshka_dims:
        raise FrontError("BAD_REQUEST", f"model {route.model!r} (backend {route.backend!r}) does not support "
                         f"'dimensions' other than its own ({route.dim})")
    if dimensions not in route.matryoshka_dims:
        raise FrontError("BAD_REQUEST", f"model {route.model!r} (backend {route.backend!r}) supports "
                         f"'dimensions' in {list(route.matryoshka_dims)}, not {dimensions}")
    return dimensions


def truncated_count(msg: dict[str, Any]) -> int:
    """Inputs cut at the model's limit: an int today, a per-input list once answers carry one."""
    value = msg.get("truncated", 0)
    if isinstance(value, list):
        return sum(1 for t in value if t)
    return int(value) if isinstance(value, (int, float)) else 0


async def readiness(client: AsyncClient) -> tuple[bool, dict[str, Any]]:
    """(ready, body): ready when the default backend is READY or DEGRADED."""
    try:
        info = raise_for_answer(await client.request("info", QUERY_WAIT_S))
    except Exception as exc:  # the supervisor is not answering: not ready, say why
        return False, {"status": "unavailable", "error": str(exc)[:500]}
    default = info.get("default_backend")
    states = {name: b.get("state") for name, b in (info.get("backends") or {}).items()}
    ready = states.get(default) in READY_STATES
    return ready, {"status": "ready" if ready else "unavailable", "default_backend": default, "backends": states}
