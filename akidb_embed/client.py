"""Client libraries: ``Client`` (blocking) and ``AsyncClient`` (asyncio, many requests in flight on one socket)."""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zmq
import zmq.asyncio

from akidb_embed.protocol.codec import blob_to_vectors
from akidb_embed.protocol.errors import EmbedError, InternalError, Timeout, error_from_wire
from akidb_embed.protocol.messages import parse_response, request_frame
from akidb_embed.supervisor.config import default_endpoint

DEFAULT_WAIT_S = 120.0      # how long a call waits when it names no timeout (the server's deadline answers first)
QUERY_WAIT_S = 10.0         # info / health / status / control
GRACE_S = 2.0               # extra wait past a request's own timeout for the server's TIMEOUT answer
MAX_POLL_S = 3600.0         # one poll at most this long (a longer one overflows zmq_poll's int timeout)


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray     # float32, (len(texts), dim)
    backend: str
    model: str
    truncated: int          # inputs cut at the model's max tokens


def resolve_endpoint(endpoint: str | None) -> str:
    return endpoint or os.environ.get("AKIDB_EMBED_ENDPOINT") or default_endpoint()


def _embed_fields(texts: Sequence[str], backend: str | None, normalize: bool, timeout: float | None,
                  dtype: str) -> dict[str, Any]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string")
    return {"texts": list(texts), "backend": backend, "normalize": normalize, "dtype": dtype,
            "timeout_ms": max(1, int(timeout * 1000)) if timeout else None}


def _result(msg: dict[str, Any]) -> Any:
    if not msg.get("ok"):
        raise error_from_wire(msg.get("error"))
    return msg


def _to_embed_result(msg: dict[str, Any]) -> EmbedResult:
    return EmbedResult(blob_to_vectors(msg["data"], msg["shape"], msg.get("dtype", "float32")),
                       msg.get("backend", ""), msg.get("model", ""), int(msg.get("truncated", 0)))


class Client:
    """Blocking client. One request at a time per instance; not thread-safe (use one per thread)."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)

    def _call(self, op: str, wait_s: float, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        self._sock.send(request_frame(rid, op, **fields))
        end = time.monotonic() + wait_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Timeout(f"no answer from the supervisor at {self.endpoint} within {wait_s:g} s "
                              "(is `akidb-embed serve` running there?)")
            if not self._sock.poll(min(left, MAX_POLL_S) * 1000):  # zmq_poll takes an int of milliseconds
                continue
            msg = parse_response(self._sock.recv())
            if msg.get("id") == rid:
                return _result(msg)
            # an answer to an earlier call that we stopped waiting for: drop it

    def embed_result(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
                     timeout: float | None = None, dtype: str = "float32") -> EmbedResult:
        timeout = timeout if timeout is not None else self.timeout
        wait = (timeout + GRACE_S) if timeout else DEFAULT_WAIT_S
        return _to_embed_result(self._call("embed", wait, **_embed_fields(texts, backend, normalize, timeout, dtype)))

    def embed(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
              timeout: float | None = None, dtype: str = "float32") -> np.ndarray:
        """Embed ``texts``; returns a float32 array of shape (len(texts), dim). Raises EmbedError."""
        return self.embed_result(texts, backend, normalize, timeout, dtype).vectors

    def info(self) -> dict[str, Any]:
        return self._call("info", QUERY_WAIT_S)

    def health(self) -> dict[str, Any]:
        return self._call("health", QUERY_WAIT_S)

    def status(self) -> dict[str, Any]:
        return self._call("status", QUERY_WAIT_S)

    def metrics(self) -> str:
        """Prometheus text exposition of the supervisor's metrics."""
        return str(self._call("metrics", QUERY_WAIT_S)["text"])

    def restart(self, backend: str) -> dict[str, Any]:
        return self._call("restart", QUERY_WAIT_S, backend=backend)

    def stop(self, backend: str) -> dict[str, Any]:
        return self._call("stop", QUERY_WAIT_S, backend=backend)

    def start(self, backend: str) -> dict[str, Any]:
        return self._call("start", QUERY_WAIT_S, backend=backend)


class AsyncClient:
    """asyncio client: any number of concurrent calls share one socket; answers are matched by id."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        for fut in list(self._waiting.values()):  # nothing can answer them now: fail them, don't leave them hanging
            if not fut.done():
                fut.set_exception(InternalError("the AsyncClient was closed before the answer arrived"))
        self._waiting.clear()
        if not self._sock.closed:
            self._sock.close(0)

    async def _read(self) -> None:
        while True:
            try:
                msg = parse_response(await self._sock.recv())
            except ValueError:  # not an answer of this protocol: nobody can be waiting for it
                continue
            fut = self._waiting.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _call(self, op: str, wait_s: float, **fields: Any) -> dict[str, Any]:
        return _result(await self.request(op, wait_s, **fields))

    async def request(self, op: str, wait_s: float, **fields: Any) -> dict[str, Any]:
        """Send one request of any op; return the answer map as it came (``ok`` true or false).

        For programs that relay answers (the HTTP and gRPC fronts): error codes stay wire strings,
        and an embed answer's blob is not decoded. Raises Timeout when nothing answers in wait_s.
        """
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self._sock.send(request_frame(rid, op, **fields))
            msg = await asyncio.wait_for(fut, wait_s)
        except asyncio.TimeoutError as exc:
            raise Timeout(f"no answer from the supervisor at {self.endpoint} within {wait_s:g} s "
                          "(is `akidb-embed serve` running there?)") from exc
        finally:
            self._waiting.pop(rid, None)
        return msg

    async def embed_result(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
                           timeout: float | None = None, dtype: str = "float32") -> EmbedResult:
        timeout = timeout if timeout is not None else self.timeout
        wait = (timeout + GRACE_S) if timeout else DEFAULT_WAIT_S
        msg = await self._call("embed", wait, **_embed_fields(texts, backend, normalize, timeout, dtype))
        return _to_embed_result(msg)

    async def embed(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
                    timeout: float | None = None, dtype: str = "float32") -> np.ndarray:
        return (await self.embed_result(texts, backend, normalize, timeout, dtype)).vectors

    async def info(self) -> dict[str, Any]:
        return await self._call("info", QUERY_WAIT_S)

    async def health(self) -> dict[str, Any]:
        return await self._call("health", QUERY_WAIT_S)

    async def status(self) -> dict[str, Any]:
        return await self._call("status", QUERY_WAIT_S)

    async def metrics(self) -> str:
        """Prometheus text exposition of the supervisor's metrics."""
        return str((await self._call("metrics", QUERY_WAIT_S))["text"])

    async def restart(self, backend: str) -> dict[str, Any]:
        return await self._call("restart", QUERY_WAIT_S, backend=backend)

    async def stop(self, backend: str) -> dict[str, Any]:
        return await self._call("stop", QUERY_WAIT_S, backend=backend)

    async def start(self, backend: str) -> dict[str, Any]:
        return await self._call("start", QUERY_WAIT_S, backend=backend)


__all__ = ["AsyncClient", "Client", "EmbedError", "EmbedResult"]
