"""The gRPC front: ``akidb_embed.v1.Embedder`` (Embed, Info, Health) and the standard ``grpc.health.v1``.

grpc.aio in its own process, relaying to the supervisor through one ``AsyncClient``. The call's
deadline becomes the request's deadline; error codes map to gRPC status codes (fronts.common).
Vectors travel as the supervisor's float32 blob plus a shape, never re-encoded.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from akidb_embed.client import DEFAULT_WAIT_S, GRACE_S, AsyncClient
from akidb_embed.fronts import embed_pb2, embed_pb2_grpc
from akidb_embed.fronts.common import (
    QUERY_WAIT_S, READY_STATES, ApiKeys, Directory, FrontError, bearer, check_dimensions, error_status,
    raise_for_answer, truncated_count,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 2**20
WATCH_INTERVAL_S = 1.0
SERVICE_NAME = "akidb_embed.v1.Embedder"


class Front:
    """State both services share: the AsyncClient, the model directory, the optional API keys."""

    def __init__(self, endpoint: str, api_keys: ApiKeys | None) -> None:
        self.client = AsyncClient(endpoint)
        self.directory = Directory(self.client)
        self.api_keys = api_keys

    async def abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, FrontError):
            code, message = exc.code, exc.message
        else:  # the AsyncClient's own Timeout, or a bug
            code = getattr(getattr(exc, "code", None), "value", None) or "INTERNAL"
            message = str(getattr(exc, "message", exc))
            if code == "INTERNAL":
                log.error("internal error in the gRPC front", exc_info=exc)
        await context.abort(getattr(grpc.StatusCode, error_status(code)[2]), f"{code}: {message[:2000]}")

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.api_keys is None:
            return
        meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        key = bearer(meta.get("authorization")) or meta.get("x-api-key")
        if not self.api_keys.check(key):
            raise FrontError("UNAUTHORIZED", "a valid API key is required (metadata authorization: Bearer KEY)")


class Embedder(embed_pb2_grpc.EmbedderServicer):
    def __init__(self, front: Front) -> None:
        self.front = front

    async def Embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.front.authorize(context)
            return await self._embed(request, context)
        except Exception as exc:
            await self.front.abort(context, exc)
            raise  # not reached: abort raises

    async def _embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.texts:
            raise FrontError("BAD_REQUEST", "'texts' must hold at least one string")
        route = await self.front.directory.route(request.model or None)
        dims = check_dimensions(route, request.dimensions if request.HasField("dimensions") else None)
        left = context.time_remaining()
        fields: dict[str, Any] = {
            "texts": list(request.texts), "backend": route.backend, "dtype": "float32", "dimensions": dims,
            "normalize": request.normalize if request.HasField("normalize") else True,
            "timeout_ms": max(1, int(left * 1000)) if left is not None else None,
            "prompt_name": request.prompt_name or None, "prompt": request.prompt or None,
            "truncate": request.truncate or None}
        msg = raise_for_answer(await self.front.client.request(
            "embed", (left + GRACE_S) if left is not None else DEFAULT_WAIT_S, **fields))
        tokens = msg.get("tokens")
        return embed_pb2.EmbedResponse(
            shape=msg.get("shape", []), data=msg.get("data", b""), model=str(msg.get("model", "")),
            backend=str(msg.get("backend", "")), truncated=truncated_count(msg),
            tokens=tokens if isinstance(tokens, list) else [])

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.front.authorize(context)
            info = await self.front.directory.refresh(force=True)
        except Exception as exc:
            await self.front.abort(context, exc)
            raise
        backends = [embed_pb2.BackendInfo(name=name, kind=str(b.get("kind") or ""), model=str(b.get("model") or ""),
                                          dimension=b.get("dim") or 0, max_tokens=b.get("max_tokens") or 0,
                                          state=str(b.get("state") or ""), replicas=b.get("replicas") or 0)
                    for name, b in (info.get("backends") or {}).items()]
        return embed_pb2.InfoResponse(version=str(info.get("version", "")),
                                      default_backend=str(info.get("default_backend", "")), backends=backends)

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.front.authorize(context)
            health = raise_for_answer(await self.front.client.request("health", QUERY_WAIT_S))
        except Exception as exc:
            await self.front.abort(context, exc)
            raise
        return embed_pb2.HealthResponse(status=str(health.get("status", "")),
                                        backends={k: str(v) for k, v in (health.get("backends") or {}).items()})


class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1, answered live from the supervisor's states.

    Service ``""`` and ``akidb_embed.v1.Embedder``: SERVING when the default backend is READY or
    DEGRADED. A backend name as service: that backend's state. Anything else: NOT_FOUND.
    """

    def __init__(self, front: Front) -> None:
        self.front = front

    async def _status(self, service: str) -> int | None:
        S = health_pb2.HealthCheckResponse
        try:
            info = await self.front.directory.refresh(force=True)
        except Exception:
            return S.NOT_SERVING if service in ("", SERVICE_NAME) else S.UNKNOWN
        backends = info.get("backends") or {}
        name = info.get("default_backend") if service in ("", SERVICE_NAME) else service
        if name not in backends:
            return None
        return S.SERVING if backends[name].get("state") in READY_STATES else S.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = await self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:200]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = await self._status(request.service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)


async def _serve(endpoint: str, address: str, api_keys: ApiKeys | None) -> int:
    front = Front(endpoint, api_keys)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    embed_pb2_grpc.add_EmbedderServicer_to_server(Embedder(front), server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(front), server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("grpc front cannot listen on %s: %s", address, exc)
        await front.client.close()
        return 1
    await server.start()
    log.info("grpc front listening: %s endpoint=%s api_keys=%s", address, endpoint, "on" if api_keys else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("grpc front stopping")
    await server.stop(grace=30)     # in-flight calls finish (the supervisor drains them meanwhile)
    await front.client.close()
    return 0


def serve(endpoint: str, host: str, port: int, api_keys: ApiKeys | None = None,
          lifeline_fd: int | None = None) -> int:
    """Run the gRPC front in this process until SIGTERM/SIGINT (or the supervisor's lifeline closes)."""
    if lifeline_fd is not None:
        from akidb_embed.workers.lifeline import die_with_parent
        die_with_parent(lifeline_fd)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return asyncio.run(_serve(endpoint, address, api_keys))
