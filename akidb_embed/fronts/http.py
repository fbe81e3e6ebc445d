"""The HTTP front: REST ``/api/v1/embed``, OpenAI ``/v1/embeddings``, health, readiness, models, metrics.

A Starlette app served by uvicorn, in its own process, relaying to the supervisor through one
``AsyncClient``. Bodies are validated here by hand (OpenAI-shaped errors, no per-request model
objects); vectors go out straight from the answer's float32 blob (orjson serializes the numpy rows,
base64 slices the blob). Routes and fields are documented in README.md ("HTTP and gRPC").
"""
from __future__ import annotations

import base64
import contextlib
import logging
import math
from typing import Any, AsyncIterator

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from akidb_embed.client import DEFAULT_WAIT_S, GRACE_S, AsyncClient
from akidb_embed.fronts.common import (
    QUERY_WAIT_S, RETRY_AFTER_S, ApiKeys, Directory, FrontError, Route, bearer, check_dimensions, error_status,
    raise_for_answer, readiness, truncated_count,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20       # a request body past this is answered 413 before it is parsed
MAX_TIMEOUT_S = 3600.0
PASS_THROUGH = ("prompt_name", "prompt", "truncate")   # request fields relayed as is (the supervisor checks them)
OPEN_PATHS = ("/health", "/ready")                     # probes answer without an API key
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


def error_response(code: str, message: str) -> Response:
    status, kind, _ = error_status(code)
    headers = {"Retry-After": str(RETRY_AFTER_S[code])} if code in RETRY_AFTER_S else None
    return json_response({"error": {"message": message, "type": kind, "code": code}}, status, headers)


class HttpFront:
    """The app's state: one AsyncClient, the model directory, the optional API keys."""

    def __init__(self, endpoint: str, api_keys: ApiKeys | None = None) -> None:
        self.endpoint = endpoint
        self.api_keys = api_keys
        self.client: AsyncClient | None = None
        self.directory: Directory | None = None

    def app(self) -> Starlette:
        routes = [
            HttpRoute("/api/v1/embed", self.rest_embed, methods=["POST"]),
            HttpRoute("/v1/embeddings", self.openai_embed, methods=["POST"]),
            HttpRoute("/v1/models", self.models, methods=["GET"]),
            HttpRoute("/health", self.health, methods=["GET"]),
            HttpRoute("/ready", self.ready, methods=["GET"]),
            HttpRoute("/metrics", self.metrics, methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        app.add_exception_handler(404, self._not_found)
        app.add_exception_handler(405, self._not_allowed)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.client = AsyncClient(self.endpoint)
        self.directory = Directory(self.client)
        try:
            yield
        finally:
            await self.client.close()

    async def _not_found(self, request: Request, _exc: Exception) -> Response:
        return json_response({"error": {"message": f"no route {request.url.path}", "type": "invalid_request_error",
                                        "code": "NOT_FOUND"}}, 404)

    async def _not_allowed(self, request: Request, _exc: Exception) -> Response:
        return json_response({"error": {"message": f"{request.method} not allowed on {request.url.path}",
                                        "type": "invalid_request_error", "code": "METHOD_NOT_ALLOWED"}}, 405)

    # ---- shared request steps ----------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_keys is None:
            return
        key = bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
        if not self.api_keys.check(key):
            raise FrontError("UNAUTHORIZED", "a valid API key is required (Authorization: Bearer KEY)")

    async def _body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise FrontError("PAYLOAD_TOO_LARGE", f"request body of {length} bytes; at most {MAX_BODY_BYTES}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise FrontError("PAYLOAD_TOO_LARGE", f"request body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise FrontError("BAD_REQUEST", f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise FrontError("BAD_REQUEST", "the body must be a JSON object")
        return body

    @staticmethod
    def _timeout(request: Request) -> float | None:
        raw = request.headers.get("x-request-timeout") or request.query_params.get("timeout")
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0 < value <= MAX_TIMEOUT_S:
            raise FrontError("BAD_REQUEST",
                             f"request timeout must be seconds in (0, {MAX_TIMEOUT_S:g}], got {raw[:40]!r}")
        return value

    async def _embed(self, request: Request, texts: list[str], route: Route, normalize: bool,
                     dimensions: int | None, body: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        assert self.client is not None
        timeout = self._timeout(request)
        fields: dict[str, Any] = {"texts": texts, "backend": route.backend, "normalize": normalize,
                                  "dtype": "float32", "dimensions": dimensions,
                                  "timeout_ms": max(1, int(timeout * 1000)) if timeout else None}
        fields.update({k: body[k] for k in PASS_THROUGH if body.get(k) is not None})
        msg = raise_for_answer(await self.client.request(
            "embed", (timeout + GRACE_S) if timeout else DEFAULT_WAIT_S, **fields))
        shape = msg.get("shape")
        if not isinstance(shape, list) or len(shape) != 2 or msg.get("dtype", "float32") != "float32":
            raise FrontError("INTERNAL", "malformed embed answer from the supervisor")
        return np.frombuffer(msg["data"], dtype="<f4").reshape(shape), msg

    async def _guarded(self, request: Request, handler: Any) -> Response:
        try:
            if request.url.path not in OPEN_PATHS:
                self._authorize(request)
            return await handler(request)
        except FrontError as exc:
            return error_response(exc.code, exc.message)
        except Exception as exc:  # the AsyncClient's own Timeout and anything unexpected
            code = getattr(getattr(exc, "code", None), "value", None) or "INTERNAL"
            if code == "INTERNAL":
                log.exception("internal error on %s", request.url.path)
            return error_response(code, str(getattr(exc, "message", exc))[:2000])

    # ---- routes -------------------------------------------------------------------------------
    async def rest_embed(self, request: Request) -> Response:
        return await self._guarded(request, self._rest_embed)

    async def _rest_embed(self, request: Request) -> Response:
        """Seed design: {"model", "inputs": [str], "normalize"} -> {"embeddings", "model", "dimension", ...}."""
        assert self.directory is not None
        body = await self._body(request)
        inputs = body.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        inputs = _check_texts(inputs, "inputs")
        normalize = body.get("normalize", True)
        if not isinstance(normalize, bool):
            raise FrontError("BAD_REQUEST", "'normalize' must be true or false")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise FrontError("BAD_REQUEST", "'model' must be a string")
        route = await self.directory.route(model)
        dims = check_dimensions(route, body.get("dimensions"))
        vectors, msg = await self._embed(request, inputs, route, normalize, dims, body)
        out = {"embeddings": vectors, "model": msg.get("model") or route.model, "dimension": int(vectors.shape[1]),
               "backend": msg.get("backend") or route.backend, "truncated": truncated_count(msg)}
        tokens = _tokens(msg)
        if tokens is not None:
            out["tokens"] = tokens
        return json_response(out)

    async def openai_embed(self, request: Request) -> Response:
        return await self._guarded(request, self._openai_embed)

    async def _openai_embed(self, request: Request) -> Response:
        assert self.directory is not None
        body = await self._body(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, list) and texts and all(isinstance(t, (int, list)) for t in texts):
            raise FrontError("BAD_REQUEST", "token-id inputs are not supported: send 'input' as a string or "
                             "a list of strings")
        texts = _check_texts(texts, "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise FrontError("BAD_REQUEST", f"'encoding_format' must be 'float' or 'base64', got {str(fmt)[:40]!r}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise FrontError("BAD_REQUEST", "'model' is required: a backend name or a model id (GET /v1/models)")
        route = await self.directory.route(model)
        dims = check_dimensions(route, body.get("dimensions"))
        vectors, msg = await self._embed(request, texts, route, True, dims, body)
        if fmt == "base64":
            data = msg["data"]
            row = vectors.shape[1] * 4
            items: list[Any] = [{"object": "embedding", "index": i,
                                 "embedding": base64.b64encode(data[i * row:(i + 1) * row]).decode()}
                                for i in range(vectors.shape[0])]
        else:
            items = [{"object": "embedding", "index": i, "embedding": vectors[i]} for i in range(vectors.shape[0])]
        tokens = _tokens(msg)
        used = sum(tokens) if tokens is not None else 0
        return json_response({"object": "list", "data": items, "model": model,
                              "usage": {"prompt_tokens": used, "total_tokens": used}})

    async def models(self, request: Request) -> Response:
        return await self._guarded(request, self._models)

    async def _models(self, _request: Request) -> Response:
        assert self.directory is not None
        await self.directory.refresh(force=True)
        data = [{"object": "model", "created": 0, "owned_by": "akidb-embed", **m} for m in self.directory.models()]
        return json_response({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        if request.query_params.get("ready") not in (None, "", "0", "false"):
            return await self.ready(request)
        return json_response({"status": "ok"})

    async def ready(self, _request: Request) -> Response:
        assert self.client is not None
        ok, body = await readiness(self.client)
        return json_response(body, 200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return await self._guarded(request, self._metrics)

    async def _metrics(self, _request: Request) -> Response:
        """Pass-through of the supervisor's ``metrics`` op (Prometheus text exposition)."""
        assert self.client is not None
        msg = await self.client.request("metrics", QUERY_WAIT_S)
        if not msg.get("ok") and "unknown op" in str((msg.get("error") or {}).get("message", "")):
            raise FrontError("NOT_FOUND", "this supervisor has no metrics")
        text = raise_for_answer(msg).get("text")
        if not isinstance(text, str):
            raise FrontError("INTERNAL", "malformed metrics answer from the supervisor")
        return Response(text, 200, media_type=METRICS_CONTENT_TYPE)


def _check_texts(texts: Any, name: str) -> list[str]:
    if not isinstance(texts, list) or not texts:
        raise FrontError("BAD_REQUEST", f"'{name}' must be a string or a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise FrontError("BAD_REQUEST", f"'{name}'[{i}] must be a string, got {type(text).__name__}")
    return texts


def _tokens(msg: dict[str, Any]) -> list[int] | None:
    """Per-input token counts when the worker reports them."""
    tokens = msg.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        return tokens
    return None


def serve(endpoint: str, host: str, port: int, api_keys: ApiKeys | None = None,
          lifeline_fd: int | None = None) -> int:
    """Run the HTTP front in this process until SIGTERM/SIGINT (or the supervisor's lifeline closes)."""
    import uvicorn

    if lifeline_fd is not None:
        from akidb_embed.workers.lifeline import die_with_parent
        die_with_parent(lifeline_fd)
    config = uvicorn.Config(HttpFront(endpoint, api_keys).app(), host=host, port=port, log_config=None,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=30,
                            server_header=False)
    server = uvicorn.Server(config)
    log.info("http front listening: http://%s:%d endpoint=%s api_keys=%s", host, port, endpoint,
             "on" if api_keys else "off")
    server.run()
    return 0 if server.started else 1
