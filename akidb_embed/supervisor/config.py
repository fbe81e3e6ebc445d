"""config.toml (+ environment) -> a frozen, validated configuration, checked once at start-up."""
from __future__ import annotations

import os
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef, unused-ignore]
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from akidb_embed.kinds import KIND_NAMES, kind_of
from akidb_embed.protocol.endpoint import default_endpoint
from akidb_embed.supervisor.guard import GUARD_KEYS, Guard, parse_guard

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
KINDS = KIND_NAMES


class ConfigError(Exception):
    """A configuration problem, naming the file, the key and what is allowed."""


@dataclass(frozen=True)
class Policy:
    """Supervision settings; set in [supervisor] and overridable per backend."""
    request_timeout_s: float = 30.0      # deadline of a request that names none
    startup_timeout_s: float = 180.0     # a worker must report ready within this
    heartbeat_interval_s: float = 0.5    # how often a worker says it is alive
    heartbeat_timeout_s: float = 5.0     # silence longer than this = hung (e.g. SIGSTOP)
    hang_grace_s: float = 5.0            # a worker still holding a request this long past its deadline is hung
    stop_timeout_s: float = 5.0          # graceful stop, then SIGTERM, then SIGKILL, each this long
    restart_backoff_min_s: float = 0.1   # first restart delay; doubles per consecutive crash
    restart_backoff_max_s: float = 10.0  # ceiling of the restart delay
    restart_max: int = 5                 # at most this many crashes ...
    restart_window_s: float = 60.0       # ... within this many seconds, else the backend is FAILED
    failed_cooldown_s: float = 30.0      # a FAILED backend is retried after this long
    quarantine_s: float = 300.0          # an input that crashed a worker is refused this long


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    model: str = DEFAULT_MODEL
    python: str = sys.executable
    replicas: int = 1
    timeout_s: float | None = None       # per-backend request deadline (else policy.request_timeout_s)
    max_queue: int = 1024                # requests waiting in the supervisor; past it: OVERLOADED
    max_inflight: int = 64               # requests handed to one worker at a time
    max_batch_size: int = 8              # texts in one forward pass (8 measured best on a 2-core CPU)
    max_batch_tokens: int = 4096         # padded tokens (longest x count) in one forward pass
    default_priority: str = "normal"     # priority of requests that name none: high | normal | low
    latency_pass_ms: float = 35.0        # while queries are around, a bulk pass holds about this much work
    high_latency_pass_ms: float = 22.0   # ... while high-priority queries are around
    interactive_window_s: float = 2.0    # ... and "around" means seen within this many seconds
    interactive_tokens: int = 256        # a request is a query when its client has at most this many tokens queued
    part_tokens: int = 128               # larger requests are cut into parts of about this many tokens
    fair_quantum_tokens: int = 512       # fair share: tokens a client may use per turn before the next client
    memory_limit_mb: float | None = None # worker RSS past this -> recycled gracefully
    max_requests_per_worker: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # kind-specific (mock: dim, delay_ms, ...)
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True)
class FrontConfig:
    """[http] or [grpc]: a front process the supervisor starts and keeps running."""
    kind: str                            # "http" | "grpc"
    listen: str                          # HOST:PORT
    api_keys_file: str | None = None     # one key per line; none: no key needed


@dataclass(frozen=True)
class Config:
    endpoint: str
    default_backend: str
    backends: Mapping[str, BackendConfig]
    policy: Policy
    drain_timeout_s: float = 10.0
    source: str = "<embedded default>"
    guard: Guard = field(default_factory=Guard)   # issue 11: limits, quotas, CURVE, operators ([server])
    metrics_listen: str | None = None    # [metrics] listen: HOST:PORT of the Prometheus listener (off when None)
    http: FrontConfig | None = None
    grpc: FrontConfig | None = None


_POLICY_KEYS = {f.name: f.type for f in fields(Policy)}
_BACKEND_KEYS = {f.name for f in fields(BackendConfig)} - {"name", "options", "policy"}
_SERVER_KEYS = {"endpoint", "default_backend"} | GUARD_KEYS   # issue 11: guard keys
_METRICS_KEYS = {"listen"}
_SUPERVISOR_KEYS = set(_POLICY_KEYS) | {"drain_timeout_s"}
_INT_KEYS = {"replicas", "max_queue", "max_inflight", "max_batch_size", "max_batch_tokens",
             "max_requests_per_worker", "restart_max", "interactive_tokens", "part_tokens", "fair_quantum_tokens"}
_POSITIVE_KEYS = {"replicas", "max_queue", "max_inflight", "max_batch_size", "max_batch_tokens",
                  "max_requests_per_worker", "part_tokens", "fair_quantum_tokens", "latency_pass_ms",
                  "high_latency_pass_ms"}
_STR_KEYS = {"kind", "model", "python", "endpoint", "default_backend", "default_priority"}
PRIORITY_NAMES = ("high", "normal", "low")


def _check_value(src: str, where: str, key: str, value: Any) -> Any:
    if key in _STR_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{src}: {where}.{key} must be a non-empty string, got {value!r}")
        if key == "default_priority" and value not in PRIORITY_NAMES:
            raise ConfigError(f"{src}: {where}.{key} = {value!r}; allowed: {', '.join(PRIORITY_NAMES)}")
        return value
    ok = isinstance(value, int) if key in _INT_KEYS else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < 0 or (key in _POSITIVE_KEYS and value < 1):
        kind = ("a positive integer" if key in _POSITIVE_KEYS else "a non-negative integer") if key in _INT_KEYS \
            else "a non-negative number"
        raise ConfigError(f"{src}: {where}.{key} must be {kind}, got {value!r}")
    return value


def _check_keys(src: str, where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{src}: unknown key {where}.{key}; allowed: {', '.join(sorted(allowed))}")


def _policy(src: str, where: str, table: Mapping[str, Any], base: Policy) -> Policy:
    values: dict[str, Any] = {k: float(_check_value(src, where, k, v)) if k != "restart_max" else _check_value(src, where, k, v)
              for k, v in table.items() if k in _POLICY_KEYS}
    return replace(base, **values)


def _backend(src: str, name: str, table: Any, policy: Policy) -> BackendConfig:
    where = f"backends.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{src}: [{where}] must be a table")
    if "kind" not in table:
        raise ConfigError(f"{src}: {where}.kind is missing; allowed: {', '.join(KINDS)}")
    kind = table["kind"]
    if kind not in KINDS:
        raise ConfigError(f"{src}: {where}.kind = {kind!r} is not a backend kind; allowed: {', '.join(KINDS)}")
    plain = {k: _check_value(src, where, k, v) for k, v in table.items() if k in _BACKEND_KEYS}
    options = {k: v for k, v in table.items() if k not in _BACKEND_KEYS and k not in _POLICY_KEYS}
    _check_keys(src, where, table, set(kind_of(kind).options) | _BACKEND_KEYS | set(_POLICY_KEYS))
    if kind == "mock":
        plain.setdefault("model", "mock")
    plain["kind"] = kind_of(kind).name
    python = plain.get("python")
    if python and not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise ConfigError(f"{src}: {where}.python = {python!r} is not an executable file")
    return BackendConfig(name=name, options=options, policy=_policy(src, where, table, policy), **plain)


def _single_provider(src: str, table: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The seed design's ``[embedding]`` form + AKIDB_EMBEDDING_* variables -> one backends table."""
    _check_keys(src, "embedding", table, {"provider", "model", "python_path"})
    provider = env.get("AKIDB_EMBEDDING_PROVIDER") or table.get("provider") or "python-bridge"
    if provider not in ("mlx", "python-bridge", "mock", "onnx", "sentence-transformers"):
        raise ConfigError(f"{src}: embedding.provider (or AKIDB_EMBEDDING_PROVIDER) = {provider!r}; "
                          "allowed: mlx, python-bridge, mock, onnx, sentence-transformers")
    backend: dict[str, Any] = {"kind": provider}
    model = env.get("AKIDB_EMBEDDING_MODEL") or table.get("model")
    if model:
        backend["model"] = model
    python = env.get("AKIDB_EMBEDDING_PYTHON_PATH") or table.get("python_path")
    if python:
        backend["python"] = python
    return {provider: backend}


def front_config(src: str, kind: str, table: Any) -> FrontConfig | None:
    """[http] / [grpc] -> FrontConfig (None without ``listen``)."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{src}: [{kind}] must be a table")
    _check_keys(src, kind, table, {"listen", "api_keys_file"})
    listen = table.get("listen")
    if listen is None:
        return None
    host, sep, port = listen.rpartition(":") if isinstance(listen, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{src}: {kind}.listen = {listen!r}; expected HOST:PORT, e.g. \"127.0.0.1:8080\"")
    keys = table.get("api_keys_file")
    if keys is not None and not (isinstance(keys, str) and Path(keys).expanduser().is_file()):
        raise ConfigError(f"{src}: {kind}.api_keys_file = {keys!r} is not a readable file")
    return FrontConfig(kind, listen, str(Path(keys).expanduser()) if keys else None)


def build_config(doc: Mapping[str, Any], src: str, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    _check_keys(src, "", doc, {"server", "supervisor", "backends", "embedding", "models", "metrics", "http", "grpc"})
    server = doc.get("server", {})
    supervisor = doc.get("supervisor", {})
    _check_keys(src, "server", server, _SERVER_KEYS)
    _check_keys(src, "supervisor", supervisor, _SUPERVISOR_KEYS)
    policy = _policy(src, "supervisor", supervisor, Policy())
    tables = doc.get("backends")
    single = "embedding" in doc or any(k.startswith("AKIDB_EMBEDDING_") for k in env)
    if tables is None or (single and "embedding" in doc):
        if tables is not None:
            raise ConfigError(f"{src}: use either [embedding] or [backends.NAME] tables, not both")
        tables = _single_provider(src, doc.get("embedding", {}), env) if single else {
            "onnx": {"kind": "onnx", "model": DEFAULT_MODEL}}
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{src}: [backends] must hold at least one [backends.NAME] table")
    backends = {name: _backend(src, name, table, policy) for name, table in tables.items()}
    backends = _with_model_settings(src, doc.get("models", {}), backends)
    default = server.get("default_backend", next(iter(backends)))
    if default not in backends:
        raise ConfigError(f"{src}: server.default_backend = {default!r} names no backend; "
                          f"configured: {', '.join(backends)}")
    endpoint = _check_value(src, "server", "endpoint", server.get("endpoint", default_endpoint()))
    if not endpoint.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"{src}: server.endpoint = {endpoint!r}; allowed: ipc://PATH or tcp://HOST:PORT")
    drain = float(_check_value(src, "supervisor", "drain_timeout_s", supervisor.get("drain_timeout_s", 10.0)))
    try:  # issue 11
        guard = parse_guard(src, server, Path(src).parent if src != "<embedded default>" else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return Config(endpoint=endpoint, default_backend=default, backends=backends, policy=policy,
                  drain_timeout_s=drain, source=src, guard=guard,
                  metrics_listen=_metrics_listen(src, doc.get("metrics", {})),
                  http=front_config(src, "http", doc.get("http")), grpc=front_config(src, "grpc", doc.get("grpc")))


def _with_model_settings(src: str, table: Any, backends: dict[str, BackendConfig]) -> dict[str, BackendConfig]:
    """``[models]`` (``aliases``, ``cache_max_gb``) travels to every model-loading worker in its options."""
    if not isinstance(table, dict):
        raise ConfigError(f"{src}: [models] must be a table")
    _check_keys(src, "models", table, {"aliases", "cache_max_gb"})
    aliases = table.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                for k, v in aliases.items()):
        raise ConfigError(f"{src}: models.aliases must be a table of short name = \"hub id or path\"")
    extra: dict[str, Any] = {"aliases": aliases} if aliases else {}
    if "cache_max_gb" in table:
        extra["cache_max_gb"] = float(_check_value(src, "models", "cache_max_gb", table["cache_max_gb"]))
    if not extra:
        return backends
    return {name: b if b.kind == "mock" else replace(b, options={**b.options, **extra})
            for name, b in backends.items()}


def _metrics_listen(src: str, table: Any) -> str | None:
    if not isinstance(table, dict):
        raise ConfigError(f"{src}: [metrics] must be a table")
    _check_keys(src, "metrics", table, _METRICS_KEYS)
    listen = table.get("listen")
    if listen is None:
        return None
    try:
        split_listen(listen if isinstance(listen, str) else "")
    except ValueError:
        raise ConfigError(f"{src}: metrics.listen = {listen!r}; expected \"HOST:PORT\", "
                          "e.g. \"127.0.0.1:9464\"") from None
    return str(listen)


def split_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9464' or '[::1]:9464' -> (host, port); raises ValueError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or the embedded default when None) and validate it; raises ConfigError."""
    if path is None:
        return build_config({}, "<embedded default>", env)
    src = str(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{src}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: not valid TOML: {exc}") from exc
    return build_config(doc, src, env)
