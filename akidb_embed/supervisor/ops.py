"""The query and operator requests: info, health, status, restart / stop / start of a backend."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import psutil

from akidb_embed import __version__
from akidb_embed.protocol.errors import UnknownBackend
from akidb_embed.protocol.messages import ControlRequest, clip
from akidb_embed.supervisor.pool import BackendPool, BState

log = logging.getLogger(__name__)


def info(pools: Mapping[str, BackendPool], default_backend: str) -> dict[str, Any]:
    backends = {}
    for name, pool in pools.items():
        model = pool.model_info or {}
        backends[name] = {"kind": pool.cfg.kind, "model": model.get("model", pool.cfg.model),
                          "dim": model.get("dim"), "max_tokens": model.get("max_tokens"),
                          "state": pool.state.value, "replicas": pool.cfg.replicas,
                          "extra": model.get("extra", {})}
    return {"version": __version__, "protocol": 1, "default_backend": default_backend, "backends": backends}


def health(pools: Mapping[str, BackendPool]) -> dict[str, Any]:
    states = {name: pool.state.value for name, pool in pools.items()}
    serving = [s for s in states.values() if s in (BState.READY.value, BState.DEGRADED.value)]
    status = "ok" if all(s == BState.READY.value for s in states.values()) else (
        "degraded" if serving else "unavailable")
    return {"status": status, "backends": states}


def status(pools: Mapping[str, BackendPool], *, started: float, pending: int, quarantined: int,
           endpoint: str) -> dict[str, Any]:
    me = psutil.Process()
    cpu = me.cpu_times()
    return {"supervisor": {"pid": os.getpid(), "uptime_s": round(time.monotonic() - started, 3),
                           "rss_mb": round(me.memory_info().rss / 2**20, 1),
                           "cpu_s": round(cpu.user + cpu.system, 3), "pending": pending,
                           "quarantined": quarantined, "endpoint": endpoint},
            "backends": {name: pool.status() for name, pool in pools.items()}}


def control(pools: Mapping[str, BackendPool], req: ControlRequest) -> dict[str, Any]:
    pool = pools.get(req.backend)
    if pool is None:
        raise UnknownBackend(f"no backend named {clip(req.backend)}; configured: {', '.join(pools)}")
    log.info("operator %s: backend=%s", req.op, req.backend)
    {"restart": pool.restart, "stop": pool.stop, "start": pool.start_op}[req.op]()
    pool.note_state()
    return {"backend": req.backend, "state": pool.state.value}
