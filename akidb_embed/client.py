"""Client libraries: ``Client`` (blocking) and ``AsyncClient`` (asyncio, many requests in flight on one socket).

Both notice a server that is gone: the socket sends ZeroMQ heartbeats (a silent peer is dropped
after HEARTBEAT_TIMEOUT_MS) and a socket monitor reports the disconnect, so a call waiting on a dead
supervisor raises ``ServerUnavailable`` (retryable) within about two seconds. ``ZMQ_IMMEDIATE``
keeps requests from queueing while no server is connected: a send waits for a connection at most
until the call's own deadline. The same object reconnects by itself when a server is back.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence, cast

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from akidb_embed.keys import KeyPair, KeySource, apply_client_keys
from akidb_embed.protocol.codec import blob_to_vectors
from akidb_embed.protocol.endpoint import admin_socket_path, default_endpoint
from akidb_embed.protocol.errors import EmbedError, InternalError, ServerUnavailable, Timeout, error_from_wire
from akidb_embed.protocol.messages import parse_response, request_frame

DEFAULT_WAIT_S = 120.0      # how long a call waits when it names no timeout (the server's deadline answers first)
QUERY_WAIT_S = 10.0         # info / health / status / control
GRACE_S = 2.0               # extra wait past a request's own timeout for the server's TIMEOUT answer
MAX_POLL_S = 3600.0         # one poll at most this long (a longer one overflows zmq_poll's int timeout)
HEARTBEAT_IVL_MS = 500      # ZMTP ping this often ...
HEARTBEAT_TIMEOUT_MS = 1500 # ... and drop the connection when nothing came back for this long
MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
MONITOR_SLICE_S = 0.25      # a blocking call checks for a lost connection this often while it waits


def _configure(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)   # no queue towards a server that is not there: sends wait instead
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


def _lost(events: list[int]) -> bool:
    """Whether a batch of monitor events leaves the socket disconnected."""
    state = None
    for event in events:
        if event == zmq.EVENT_DISCONNECTED:
            state = True
        elif event == zmq.EVENT_CONNECTED:
            state = False
    return bool(state)


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray     # float32, (len(texts), dim)
    backend: str
    model: str
    truncated: int          # inputs cut at the model's max tokens
    tokens: list[int] | None = None            # per input: tokens the model read (None from older servers)
    truncated_rows: list[bool] | None = None   # per input: was it cut?


def resolve_endpoint(endpoint: str | None) -> str:
    return endpoint or os.environ.get("AKIDB_EMBED_ENDPOINT") or default_endpoint()


def _embed_fields(texts: Sequence[str], backend: str | None, normalize: bool, timeout: float | None,
                  dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string")
    wait = timeout if timeout else DEFAULT_WAIT_S
    # deadline_unix_ms: the server drops the request if it arrives after we stopped waiting for it
    return {"texts": list(texts), "backend": backend, "normalize": normalize, "dtype": dtype,
            "timeout_ms": max(1, int(timeout * 1000)) if timeout else None,
            "deadline_unix_ms": int((time.time() + wait) * 1000), **options}


def _options(priority: str | None, prompt_name: str | None, prompt: str | None, dimensions: int | None,
             truncate: str | None) -> dict[str, Any]:
    """The optional embed fields (docs/protocol.md); None ones are not sent."""
    return {"priority": priority, "prompt_name": prompt_name, "prompt": prompt, "dimensions": dimensions,
            "truncate": truncate}


def admin_endpoint(endpoint: str) -> str | None:
    """The private admin socket of the server at ``endpoint``, if this user can see it (its owner)."""
    path = admin_socket_path(endpoint)
    return f"ipc://{path}" if path.exists() else None


def _no_answer_hint(curve: bool) -> str:
    return ("(is `akidb-embed serve` running there, with this client's public key in its curve_clients, "
            "and is server_key its public key?)" if curve else "(is `akidb-embed serve` running there?)")


def _result(msg: dict[str, Any]) -> dict[str, Any]:
    if not msg.get("ok"):
        raise error_from_wire(msg.get("error"))
    return msg


def _to_embed_result(msg: dict[str, Any]) -> EmbedResult:
    tokens, rows = msg.get("tokens"), msg.get("truncated_rows")
    return EmbedResult(blob_to_vectors(msg["data"], msg["shape"], msg.get("dtype", "float32")),
                       msg.get("backend", ""), msg.get("model", ""), int(msg.get("truncated", 0)),
                       [int(n) for n in tokens] if isinstance(tokens, list) else None,
                       [bool(r) for r in rows] if isinstance(rows, list) else None)


class Client:
    """Blocking client. One request at a time per instance; not thread-safe (use one per thread)."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = None,
                 server_key: KeySource | None = None, client_key: KeySource | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        _configure(self._sock)
        self._curve = apply_client_keys(self._sock, server_key, client_key)  # issue 11: CURVE on tcp
        self._monitor: zmq.Socket[bytes] = self._sock.get_monitor_socket(MONITORED)
        self._poller = zmq.Poller()        # only the data socket: the fast path polls one socket
        self._poller.register(self._sock, zmq.POLLIN)
        self._sock.connect(self.endpoint)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)

    def _monitor_events(self) -> list[int]:
        events = []
        while cast(int, self._monitor.get(zmq.EVENTS)) & zmq.POLLIN:
            events.append(parse_monitor_message(self._monitor.recv_multipart())["event"])
        return events

    def _send(self, frame: bytes, end: float, wait_s: float) -> None:
        """Send within the call's deadline: with no server connected (ZMQ_IMMEDIATE) nothing is queued."""
        while True:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                left = end - time.monotonic()
                if left <= 0:
                    raise ServerUnavailable(f"no answer from the supervisor at {self.endpoint} within {wait_s:g} s: no "
                                            "server took the request (is `akidb-embed serve` running there?)") from None
                self._sock.poll(max(1, int(min(left, MAX_POLL_S) * 1000)), zmq.POLLOUT)

    def _call(self, op: str, wait_s: float, send_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """``send_s``: how long the request may wait for a server to take it (default ``wait_s``)."""
        rid = next(self._ids)
        now = time.monotonic()
        end = now + wait_s
        send_s = wait_s if send_s is None else send_s
        self._send(request_frame(rid, op, **fields), now + send_s, send_s)
        sock = self._sock
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Timeout(f"no answer from the supervisor at {self.endpoint} within {wait_s:g} s "
                              f"{_no_answer_hint(self._curve)}")
            if not self._poller.poll(int(min(left, MONITOR_SLICE_S) * 1000)):   # zmq_poll: int milliseconds
                # events queued before our send end with the CONNECTED that let it through (ZMQ_IMMEDIATE)
                if _lost(self._monitor_events()):
                    raise ServerUnavailable(f"lost the connection to the server at {self.endpoint} while "
                                            "waiting for the answer; the request may or may not have been computed")
                continue
            msg = parse_response(sock.recv())
            if msg.get("id") == rid:
                return _result(msg)
            # an answer to an earlier call that we stopped waiting for: drop it

    def embed_result(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
                     timeout: float | None = None, dtype: str = "float32",
                     priority: str | None = None, *, prompt_name: str | None = None,
                     prompt: str | None = None, dimensions: int | None = None,
                     truncate: str | None = None) -> EmbedResult:
        timeout = timeout if timeout is not None else self.timeout
        wait = (timeout + GRACE_S) if timeout else DEFAULT_WAIT_S
        fields = _embed_fields(texts, backend, normalize, timeout, dtype,
                               _options(priority, prompt_name, prompt, dimensions, truncate))
        return _to_embed_result(self._call("embed", wait, timeout or wait, **fields))

    def embed(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
              timeout: float | None = None, dtype: str = "float32",
              priority: str | None = None, *, prompt_name: str | None = None,
              prompt: str | None = None, dimensions: int | None = None, truncate: str | None = None) -> np.ndarray:
        """Embed ``texts``; returns a float32 array of shape (len(texts), dim). Raises EmbedError.

        ``priority``: "high" | "normal" | "low" (None: the backend's default);
        ``prompt_name`` (a prompt the model defines, e.g. "query") or ``prompt`` (a literal prefix);
        ``dimensions``: keep the first N dims (Matryoshka models); ``truncate``: "end" (default),
        "start", or "none" (a too-long text is refused with INPUT_TOO_LONG).
        """
        return self.embed_result(texts, backend, normalize, timeout, dtype, priority, prompt_name=prompt_name,
                                 prompt=prompt, dimensions=dimensions, truncate=truncate).vectors

    def info(self) -> dict[str, Any]:
        return self._call("info", QUERY_WAIT_S)

    def health(self) -> dict[str, Any]:
        return self._call("health", QUERY_WAIT_S)

    def status(self) -> dict[str, Any]:
        return self._call("status", QUERY_WAIT_S)

    def _operator(self, op: str, backend: str) -> dict[str, Any]:
        admin = admin_endpoint(self.endpoint)   # issue 11: the owner's private admin socket, when it exists
        if admin is None:
            return self._call(op, QUERY_WAIT_S, backend=backend)
        with Client(admin) as c:
            return c._call(op, QUERY_WAIT_S, backend=backend)

    def metrics(self) -> str:
        """Prometheus text exposition of the supervisor's metrics."""
        return str(self._call("metrics", QUERY_WAIT_S)["text"])

    def restart(self, backend: str) -> dict[str, Any]:
        return self._operator("restart", backend)

    def stop(self, backend: str) -> dict[str, Any]:
        return self._operator("stop", backend)

    def start(self, backend: str) -> dict[str, Any]:
        return self._operator("start", backend)


class AsyncClient:
    """asyncio client: any number of concurrent calls share one socket; answers are matched by id."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = None,
                 server_key: KeySource | None = None, client_key: KeySource | None = None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket = self._ctx.socket(zmq.DEALER)
        _configure(self._sock)
        self._curve = apply_client_keys(self._sock, server_key, client_key)  # issue 11: CURVE on tcp
        self._monitor = self._sock.get_monitor_socket(MONITORED)
        self._sock.connect(self.endpoint)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._sent: set[int] = set()          # ids whose request left the socket (lost on a disconnect)
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._reader = self._watcher = None
        for fut in list(self._waiting.values()):  # nothing can answer them now: fail them, don't leave them hanging
            if not fut.done():
                fut.set_exception(InternalError("the AsyncClient was closed before the answer arrived"))
        self._waiting.clear()
        if not self._sock.closed:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)

    async def _read(self) -> None:
        while True:
            try:
                msg = parse_response(await self._sock.recv())
            except ValueError:  # not an answer of this protocol: nobody can be waiting for it
                continue
            rid = msg.get("id")
            fut = self._waiting.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _watch(self) -> None:
        """Fail every call whose request was sent when the connection to the server drops."""
        while True:
            events = [parse_monitor_message(await self._monitor.recv_multipart())["event"]]
            while await self._monitor.poll(0):
                events.append(parse_monitor_message(await self._monitor.recv_multipart())["event"])
            if not _lost(events):
                continue
            for rid in list(self._sent):
                fut = self._waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ServerUnavailable(
                        f"lost the connection to the server at {self.endpoint} while waiting for the answer; "
                        "the request may or may not have been computed"))
            self._sent.clear()

    async def _call(self, op: str, wait_s: float, send_s: float | None = None, **fields: Any) -> dict[str, Any]:
        return _result(await self.request(op, wait_s, send_s, **fields))

    async def request(self, op: str, wait_s: float, send_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request of any op; return the answer map as it came (``ok`` true or false).

        For programs that relay answers (the HTTP and gRPC fronts): error codes stay wire strings,
        and an embed answer's blob is not decoded. Raises Timeout when nothing answers in wait_s,
        ServerUnavailable when no server takes the request or the connection drops while waiting.
        """
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch())
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[rid] = fut
        end = loop.time() + wait_s
        try:
            send_s = wait_s if send_s is None else send_s
            frame = request_frame(rid, op, **fields)
            try:   # with no server connected (ZMQ_IMMEDIATE) the send waits, at most until our deadline
                sending = cast("asyncio.Future[Any]", self._sock.send(frame))
                if sending.done():     # the usual case (pyzmq sends at once): no timer, no extra loop turn
                    sending.result()
                else:
                    await asyncio.wait_for(sending, send_s)
            except asyncio.TimeoutError as exc:
                raise ServerUnavailable(f"no answer from the supervisor at {self.endpoint} within {send_s:g} s: no "
                                        "server took the request (is `akidb-embed serve` running there?)") from exc
            self._sent.add(rid)
            try:
                msg = await asyncio.wait_for(fut, max(0.0, end - loop.time()))
            except asyncio.TimeoutError as exc:
                raise Timeout(f"no answer from the supervisor at {self.endpoint} within {wait_s:g} s "
                              f"{_no_answer_hint(self._curve)}") from exc
        finally:
            self._waiting.pop(rid, None)
            self._sent.discard(rid)
        return msg

    async def embed_result(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
                           timeout: float | None = None, dtype: str = "float32",
                           priority: str | None = None, *, prompt_name: str | None = None,
                           prompt: str | None = None, dimensions: int | None = None,
                           truncate: str | None = None) -> EmbedResult:
        timeout = timeout if timeout is not None else self.timeout
        wait = (timeout + GRACE_S) if timeout else DEFAULT_WAIT_S
        fields = _embed_fields(texts, backend, normalize, timeout, dtype,
                               _options(priority, prompt_name, prompt, dimensions, truncate))
        return _to_embed_result(await self._call("embed", wait, timeout or wait, **fields))

    async def embed(self, texts: Sequence[str], backend: str | None = None, normalize: bool = True,
                    timeout: float | None = None, dtype: str = "float32",
                    priority: str | None = None, *, prompt_name: str | None = None,
                    prompt: str | None = None, dimensions: int | None = None,
                    truncate: str | None = None) -> np.ndarray:
        """As :meth:`Client.embed`."""
        return (await self.embed_result(texts, backend, normalize, timeout, dtype, priority, prompt_name=prompt_name,
                                        prompt=prompt, dimensions=dimensions, truncate=truncate)).vectors

    async def info(self) -> dict[str, Any]:
        return await self._call("info", QUERY_WAIT_S)

    async def health(self) -> dict[str, Any]:
        return await self._call("health", QUERY_WAIT_S)

    async def status(self) -> dict[str, Any]:
        return await self._call("status", QUERY_WAIT_S)

    async def _operator(self, op: str, backend: str) -> dict[str, Any]:
        admin = admin_endpoint(self.endpoint)   # issue 11: the owner's private admin socket, when it exists
        if admin is None:
            return await self._call(op, QUERY_WAIT_S, backend=backend)
        async with AsyncClient(admin) as c:
            return await c._call(op, QUERY_WAIT_S, backend=backend)

    async def metrics(self) -> str:
        """Prometheus text exposition of the supervisor's metrics."""
        return str((await self._call("metrics", QUERY_WAIT_S))["text"])

    async def restart(self, backend: str) -> dict[str, Any]:
        return await self._operator("restart", backend)

    async def stop(self, backend: str) -> dict[str, Any]:
        return await self._operator("stop", backend)

    async def start(self, backend: str) -> dict[str, Any]:
        return await self._operator("start", backend)


__all__ = ["AsyncClient", "Client", "EmbedError", "EmbedResult", "KeyPair"]
