"""Every message of the protocol, typed, with its encoder and decoder. Documented in docs/protocol.md.

Two conversations use these frames:
* client <-> supervisor: one msgpack map per request and per response (``parse_request``,
  ``ok_response``, ``error_response``, ``embed_response``);
* supervisor <-> worker: multipart frames whose first part is a small msgpack header
  (``WorkerMsg`` constants and the ``*_header`` helpers); an embed job carries the client's
  original request frame unchanged, and an embed result carries the finished client response,
  so the supervisor never re-encodes texts or vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from akidb_embed.protocol.codec import DTYPES, pack, unpack, vectors_to_blob
from akidb_embed.protocol.errors import BadRequest, EmbedError

if TYPE_CHECKING:
    import numpy as np

PROTOCOL_VERSION = 1
MAX_TEXTS_PER_REQUEST = 4096

OPS = ("embed", "info", "health", "status", "metrics", "restart", "stop", "start")
CONTROL_OPS = ("restart", "stop", "start")


@dataclass(frozen=True)
class EmbedRequest:
    id: Any
    texts: list[str]
    backend: str | None = None
    normalize: bool = True
    timeout_ms: int | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class QueryRequest:
    """``info``, ``health``, ``status`` and ``metrics``: no arguments."""
    id: Any
    op: str


@dataclass(frozen=True)
class ControlRequest:
    """``restart``, ``stop`` and ``start`` of one backend."""
    id: Any
    op: str
    backend: str


Request = Union[EmbedRequest, QueryRequest, ControlRequest]


class RequestError(BadRequest):
    """A BAD_REQUEST raised while parsing; ``request_id`` is the id when it could be read."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _field(msg: dict, name: str, types: tuple[type, ...], rid: Any, *, required: bool = False,
           default: Any = None) -> Any:
    if name not in msg or msg[name] is None:
        if required:
            raise RequestError(f"missing field {name!r}", rid)
        return default
    value = msg[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise RequestError(f"field {name!r} must be {names}, got {type(value).__name__}", rid)
    return value


def parse_request(frame: bytes) -> Request:
    """Decode and validate one client frame. Raises :class:`RequestError` (BAD_REQUEST)."""
    try:
        msg = unpack(frame)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RequestError(f"frame is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(msg, dict):
        raise RequestError(f"frame must be a msgpack map, got {type(msg).__name__}")
    rid = msg.get("id")
    if not isinstance(rid, (int, str)) or isinstance(rid, bool):
        raise RequestError("field 'id' must be an integer or a string", None)
    version = msg.get("v")
    if version != PROTOCOL_VERSION:
        raise RequestError(f"unsupported protocol version {version!r}; this server speaks v={PROTOCOL_VERSION}", rid)
    op = msg.get("op")
    if op not in OPS:
        raise RequestError(f"unknown op {op!r}; expected one of {', '.join(OPS)}", rid)
    if op == "embed":
        return _parse_embed(msg, rid)
    if op in CONTROL_OPS:
        return ControlRequest(rid, op, _field(msg, "backend", (str,), rid, required=True))
    return QueryRequest(rid, op)


def _parse_embed(msg: dict, rid: Any) -> EmbedRequest:
    texts = _field(msg, "texts", (list,), rid, required=True)
    if not texts:
        raise RequestError("field 'texts' must hold at least one string", rid)
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise RequestError(f"too many texts ({len(texts)}); at most {MAX_TEXTS_PER_REQUEST} per request", rid)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f"texts[{i}] must be a string, got {type(text).__name__}", rid)
    timeout_ms = _field(msg, "timeout_ms", (int,), rid)
    if timeout_ms is not None and timeout_ms <= 0:
        raise RequestError("field 'timeout_ms' must be a positive integer", rid)
    dtype = _field(msg, "dtype", (str,), rid, default="float32")
    if dtype not in DTYPES:
        raise RequestError(f"field 'dtype' must be one of {', '.join(DTYPES)}", rid)
    return EmbedRequest(
        id=rid, texts=texts,
        backend=_field(msg, "backend", (str,), rid),
        normalize=_field(msg, "normalize", (bool,), rid, default=True),
        timeout_ms=timeout_ms, dtype=dtype,
    )


# ---- client requests (what Client sends) -------------------------------------------------

def request_frame(rid: Any, op: str, **fields: Any) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": rid, "op": op}
    body.update({k: v for k, v in fields.items() if v is not None})
    return pack(body)


# ---- responses (supervisor or worker -> client) ------------------------------------------

def ok_response(rid: Any, **fields: Any) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": rid, "ok": True}
    body.update(fields)
    return pack(body)


def error_response(rid: Any, err: EmbedError) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": err.to_wire()})


def embed_response(rid: Any, vectors: "np.ndarray", *, dtype: str, backend: str, model: str,
                   truncated: int) -> bytes:
    return ok_response(rid, shape=list(vectors.shape), dtype=dtype, data=vectors_to_blob(vectors, dtype),
                       backend=backend, model=model, truncated=truncated)


def parse_response(frame: bytes) -> dict[str, Any]:
    msg = unpack(frame)
    if not isinstance(msg, dict) or "ok" not in msg:
        raise ValueError("malformed response frame")
    return msg


# ---- supervisor <-> worker ----------------------------------------------------------------

class WorkerMsg:
    """The ``t`` field of a worker-channel header."""
    EMBED = "embed"      # sup -> worker: [header{t, seq, deadline}, client request frame]
    STOP = "stop"        # sup -> worker: [header{t}]: finish what you hold, then exit 0
    READY = "ready"      # worker -> sup: [header{t, wid, pid, info}]
    FAIL = "fail"        # worker -> sup: [header{t, wid, pid, error}]: could not load; exits next
    HEARTBEAT = "hb"     # worker -> sup: [header{t, wid, pid, busy}] every heartbeat interval
    DONE = "done"        # worker -> sup: [header{t, seq, code[, tokens][, runs]}, client response frame]


def embed_job(seq: int, deadline: float, client_frame: bytes) -> list[bytes]:
    return [pack({"t": WorkerMsg.EMBED, "seq": seq, "deadline": deadline}), client_frame]


MAX_RUNS_PER_DONE = 1024   # forward passes one done header may report


def done_msg(seq: int, code: str | None, response: bytes, *, tokens: int | None = None,
             runs: list[list[float]] | None = None) -> list[bytes]:
    """``tokens``: the request's tokens; ``runs``: [texts, tokens, seconds] per forward pass since the last done."""
    header: dict[str, Any] = {"t": WorkerMsg.DONE, "seq": seq, "code": code}
    if tokens is not None:
        header["tokens"] = tokens
    if runs:
        header["runs"] = runs
    return [pack(header), response]


def done_stats(header: dict[str, Any]) -> tuple[int | None, list[tuple[int, int, float]]]:
    """The validated ``tokens`` and ``runs`` of a done header (absent or malformed values are dropped)."""
    tokens = header.get("tokens")
    if type(tokens) is not int or tokens < 0:
        tokens = None
    runs = []
    raw = header.get("runs")
    if isinstance(raw, list):
        for run in raw[:MAX_RUNS_PER_DONE]:
            if (isinstance(run, list) and len(run) == 3 and type(run[0]) is int and type(run[1]) is int
                    and isinstance(run[2], (int, float)) and not isinstance(run[2], bool)
                    and run[0] >= 0 and run[1] >= 0 and 0.0 <= run[2] < 1e6):
                runs.append((run[0], run[1], float(run[2])))
    return tokens, runs


def worker_header(t: str, **fields: Any) -> bytes:
    body = {"t": t}
    body.update(fields)
    return pack(body)


def parse_header(frame: bytes) -> dict[str, Any]:
    msg = unpack(frame)
    if not isinstance(msg, dict) or "t" not in msg:
        raise ValueError("malformed worker header")
    return msg
