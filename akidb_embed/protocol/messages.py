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

from akidb_embed.protocol.codec import (
    DTYPES,
    TooLarge,
    pack,
    peek_field,
    unpack,
    unpack_bounded,
    vectors_to_blob,
)
from akidb_embed.protocol.errors import BadRequest, EmbedError, InternalError
from akidb_embed.protocol.errors import PayloadTooLarge as _PayloadTooLarge

if TYPE_CHECKING:
    import numpy as np

PROTOCOL_VERSION = 1
MAX_TEXTS_PER_REQUEST = 4096
MAX_PROMPT_CHARS = 4096

PRIORITIES = ("high", "normal", "low")   # scheduling classes, in the order they are served
TRUNCATE_POLICIES = ("end", "start", "none")
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
    deadline_unix_ms: int | None = None   # the caller's own deadline (its wall clock): stale requests are dropped
    priority: str | None = None   # None: the backend's default_priority
    prompt_name: str | None = None    # a prompt the model defines; checked by the worker
    prompt: str | None = None         # a literal prefix; "" = no prompt, not even the default
    dimensions: int | None = None     # Matryoshka: keep the first N dims; checked by the worker
    truncate: str = "end"             # "end" | "start" | "none" (too long -> INPUT_TOO_LONG)


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


class PayloadTooLarge(_PayloadTooLarge):
    """PAYLOAD_TOO_LARGE raised while parsing; ``request_id`` is the id when it could be read."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _field(msg: dict[str, Any], name: str, types: tuple[type, ...], rid: Any, *, required: bool = False,
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


@dataclass(frozen=True)
class Limits:
    """What one request may hold (``[server]`` keys of the same names; docs/protocol.md "Limits")."""
    max_frame_bytes: int = 8 * 2**20       # a bigger frame: PAYLOAD_TOO_LARGE
    max_texts_per_request: int = MAX_TEXTS_PER_REQUEST
    max_text_bytes: int = 256 * 2**10      # UTF-8 bytes of one text (and of any string field)


DEFAULT_LIMITS = Limits()
# a worker re-parses frames the supervisor already checked against its configured limits
WORKER_LIMITS = Limits(max_frame_bytes=2**62, max_text_bytes=2**31 - 1)
MAX_ID_BYTES = 256
CLIP_CHARS = 200           # a value quoted in an error message or a log line is cut to this


def clip(value: Any, limit: int = CLIP_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: untrusted input never reaches a message whole."""
    text = repr(value) if not isinstance(value, (str, bytes)) or len(value) <= 4 * limit else repr(value[:limit])
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def valid_id(rid: Any) -> bool:
    """An id is an int within 64 bits or a str of at most MAX_ID_BYTES UTF-8 bytes."""
    if type(rid) is int:
        return -2**63 <= rid < 2**64
    return type(rid) is str and len(rid) <= MAX_ID_BYTES and len(rid.encode()) <= MAX_ID_BYTES


def echo_id(rid: Any) -> Any:
    """What an error answer carries as ``id`` for a request whose id is invalid: the value itself when
    it is a short scalar a client could match (a float, a bool, a short bin), else nil."""
    if valid_id(rid) or isinstance(rid, (bool, float)):
        return rid
    if isinstance(rid, bytes) and len(rid) <= MAX_ID_BYTES:
        return rid
    return None


def peek_id(frame: bytes) -> Any:
    """The id of a frame that cannot be decoded whole (too big, or broken after the id), or None."""
    return echo_id(peek_field(frame, "id"))


def parse_request(frame: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    """Decode and validate one client frame against ``limits``.

    Raises :class:`RequestError` (BAD_REQUEST) or :class:`PayloadTooLarge`; both carry
    ``request_id``, the id when it could be read.
    """
    if len(frame) > limits.max_frame_bytes:
        raise PayloadTooLarge(f"frame of {len(frame)} bytes is over max_frame_bytes = {limits.max_frame_bytes}; "
                              "split the texts into several requests", peek_id(frame))
    try:
        msg = unpack_bounded(frame, max_str=limits.max_text_bytes, max_array=limits.max_texts_per_request)
    except TooLarge as exc:
        if exc.what == "an array":
            raise RequestError(f"too many texts ({exc.size}); at most {limits.max_texts_per_request} per request "
                               "(max_texts_per_request)", peek_id(frame)) from exc
        raise PayloadTooLarge(f"a text (or string field) of {exc.size} bytes is over max_text_bytes = "
                              f"{limits.max_text_bytes}", peek_id(frame)) from exc
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RequestError(f"frame is not valid msgpack ({type(exc).__name__})", peek_id(frame)) from exc
    if not isinstance(msg, dict):
        raise RequestError(f"frame must be a msgpack map, got {type(msg).__name__}")
    rid = msg.get("id")
    if not valid_id(rid):
        raise RequestError("field 'id' must be an integer (64 bits) or a string of at most "
                           f"{MAX_ID_BYTES} bytes, got {type(rid).__name__}", echo_id(rid))
    version = msg.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise RequestError(f"unsupported protocol version {clip(version)}; this server speaks the integer "
                           f"v={PROTOCOL_VERSION}", rid)
    op = msg.get("op")
    if op not in OPS:
        raise RequestError(f"unknown op {clip(op)}; expected one of {', '.join(OPS)}", rid)
    if op == "embed":
        return _parse_embed(msg, rid)
    if op in CONTROL_OPS:
        return ControlRequest(rid, op, _field(msg, "backend", (str,), rid, required=True))
    return QueryRequest(rid, op)


def _parse_embed(msg: dict[str, Any], rid: Any) -> EmbedRequest:
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
    priority = _field(msg, "priority", (str,), rid)
    if priority is not None and priority not in PRIORITIES:
        raise RequestError(f"field 'priority' must be one of {', '.join(PRIORITIES)}", rid)
    return EmbedRequest(
        id=rid, texts=texts, priority=priority,
        backend=_field(msg, "backend", (str,), rid),
        normalize=_field(msg, "normalize", (bool,), rid, default=True),
        timeout_ms=timeout_ms, dtype=dtype,
        deadline_unix_ms=_field(msg, "deadline_unix_ms", (int,), rid), **_embed_options(msg, rid),
    )


def _embed_options(msg: dict[str, Any], rid: Any) -> dict[str, Any]:
    """``prompt_name``, ``prompt``, ``dimensions``, ``truncate``: types here, meaning in the worker."""
    prompt_name = _field(msg, "prompt_name", (str,), rid)
    prompt = _field(msg, "prompt", (str,), rid)
    if prompt_name is not None and prompt is not None:
        raise RequestError("give either 'prompt_name' or 'prompt', not both", rid)
    for name, value in (("prompt_name", prompt_name), ("prompt", prompt)):
        if value is not None and len(value) > MAX_PROMPT_CHARS:
            raise RequestError(f"field {name!r} is longer than {MAX_PROMPT_CHARS} characters", rid)
    dimensions = _field(msg, "dimensions", (int,), rid)
    if dimensions is not None and dimensions <= 0:
        raise RequestError("field 'dimensions' must be a positive integer", rid)
    truncate = _field(msg, "truncate", (str,), rid, default="end")
    if truncate not in TRUNCATE_POLICIES:
        raise RequestError(f"field 'truncate' must be one of {', '.join(TRUNCATE_POLICIES)}", rid)
    return {"prompt_name": prompt_name, "prompt": prompt, "dimensions": dimensions, "truncate": truncate}


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
                   truncated: int, tokens: list[int] | None = None,
                   truncated_rows: list[bool] | None = None) -> bytes:
    """``truncated`` counts the cut texts (v1 meaning); ``tokens``/``truncated_rows`` say it per text."""
    extra: dict[str, Any] = {}
    if tokens is not None:
        extra["tokens"] = tokens
    if truncated_rows is not None:
        extra["truncated_rows"] = truncated_rows
    return ok_response(rid, shape=list(vectors.shape), dtype=dtype, data=vectors_to_blob(vectors, dtype),
                       backend=backend, model=model, truncated=truncated, **extra)


def parse_response(frame: bytes) -> dict[str, Any]:
    msg = unpack(frame)
    if not isinstance(msg, dict) or "ok" not in msg:
        raise ValueError("malformed response frame")
    return msg


# ---- supervisor <-> worker ----------------------------------------------------------------

class WorkerMsg:
    """The ``t`` field of a worker-channel header."""
    EMBED = "embed"      # sup -> worker: [header{t, seq, budget_ms}, client request frame]
    STOP = "stop"        # sup -> worker: [header{t}]: finish what you hold, then exit 0
    READY = "ready"      # worker -> sup: [header{t, wid, pid, info}]
    FAIL = "fail"        # worker -> sup: [header{t, wid, pid, error}]: could not load; exits next
    HEARTBEAT = "hb"     # worker -> sup: [header{t, wid, pid, busy, running}] every heartbeat interval
    DONE = "done"        # worker -> sup: [header{t, seq, code, tokens[, passes]}, client response frame]


def embed_job(seq: int, budget_ms: int, client_frame: bytes) -> list[bytes]:
    """A job with a relative budget: the worker turns it into its own monotonic deadline on receipt."""
    return [pack({"t": WorkerMsg.EMBED, "seq": seq, "budget_ms": budget_ms}), client_frame]


def done_msg(seq: int, code: str | None, response: bytes, tokens: int | None = None,
             passes: list[list[float]] | None = None) -> list[bytes]:
    """``passes``: forward passes finished since the last message, each [texts, tokens, seconds]."""
    header: dict[str, Any] = {"t": WorkerMsg.DONE, "seq": seq, "code": code, "tokens": tokens}
    if passes:
        header["passes"] = passes
    return [pack(header), response]


def worker_header(t: str, **fields: Any) -> bytes:
    body = {"t": t}
    body.update(fields)
    return pack(body)


def parse_header(frame: bytes) -> dict[str, Any]:
    msg = unpack(frame)
    if not isinstance(msg, dict) or "t" not in msg:
        raise ValueError("malformed worker header")
    return msg


# ---- large requests cut into parts (supervisor) --------------------------------------------

SUMMED_ANSWER_FIELDS = ("truncated",)   # counts over the rows; every list of one item per row is concatenated


def embed_part_frames(frame: bytes, bounds: list[tuple[int, int]]) -> list[bytes]:
    """A request frame cut into one frame per part: ``texts[start:end]``, every other field kept."""
    msg = unpack(frame)
    texts = msg["texts"]
    return [pack({**msg, "texts": texts[start:end]}) for start, end in bounds]


def assemble_embed_parts(rid: Any, parts: list[bytes]) -> bytes:
    """The answers to a request's parts, in order, as one answer: vector blobs and per-row lists are
    concatenated, counts summed. The first error among the parts is the answer. Vectors stay bytes."""
    msgs = [unpack(p) for p in parts]
    for m in msgs:
        if not m.get("ok"):
            return pack({**m, "id": rid})
    first = msgs[0]
    if any(m.get("dtype") != first.get("dtype") or m["shape"][1:] != first["shape"][1:] for m in msgs):
        return error_response(rid, InternalError("the parts of this request were answered with different vector shapes"))
    out = {**first, "id": rid, "shape": [sum(m["shape"][0] for m in msgs), *first["shape"][1:]],
           "data": b"".join(m["data"] for m in msgs)}
    for key in SUMMED_ANSWER_FIELDS:
        if key in first:
            out[key] = sum(int(m.get(key, 0)) for m in msgs)
    for key, value in first.items():
        if key != "shape" and isinstance(value, list) and len(value) == first["shape"][0]:
            out[key] = [x for m in msgs for x in m.get(key, [])]
    return pack(out)
