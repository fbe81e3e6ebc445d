"""Operator commands (restart, stop, start): who may send them, and how many workers they may start.

* Only an operator: a peer of the private admin ipc socket (the owner), or a tcp peer whose CURVE key
  is in ``curve_admins``. Anyone else gets UNAUTHORIZED.
* Coalesced: a restart while one is under way is the same restart; a start of a backend whose workers
  are already starting does nothing more.
* Bounded: no command may leave more than ``replicas + 1`` processes of one backend alive at once
  (old ones still draining count until they exit): past that, OVERLOADED until they are gone.
* Rate-limited: at most RATE commands per WINDOW_S seconds over all operators.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

from akidb_embed.protocol.errors import Overloaded, Unauthorized

RATE = 20
WINDOW_S = 10.0


class OperatorGate:
    def __init__(self) -> None:
        self._recent: deque[float] = deque()

    def check(self, op: str, backend: str, pool: Any, operator: bool) -> bool:
        """Raise when the command must be refused; False when it is coalesced (nothing to do)."""
        if not operator:
            raise Unauthorized(f"{op} is an operator command: send it on the server's admin socket (the "
                               "akidb-embed CLI and Client do so for the socket's owner) or, on tcp, with a "
                               "CURVE key listed in server.curve_admins")
        now = time.monotonic()
        while self._recent and now - self._recent[0] > WINDOW_S:
            self._recent.popleft()
        if len(self._recent) >= RATE:
            raise Overloaded(f"more than {RATE} operator commands within {WINDOW_S:g} s; retry later")
        self._recent.append(now)
        if op == "stop":
            return True
        if op == "restart" and (pool.replacing or pool.replace_queue):
            return False   # a rolling restart is under way: this one is the same
        alive = len(pool.workers)            # every process not yet exited, whatever its state
        planned = len(pool.live_workers()) + len(pool.respawn_at)
        if op == "start":
            if planned >= pool.cfg.replicas and not pool.stopped and pool.failed_until is None:
                return False   # already running or starting every replica
            new = max(0, pool.cfg.replicas - planned)
        elif not pool.stopped and pool.failed_until is None and any(
                w.state.value == "READY" for w in pool.workers.values()):
            new = 1            # rolling restart: one replacement at a time
        else:
            new = pool.cfg.replicas
        limit = pool.cfg.replicas + 1
        if new and alive + new > limit:
            raise Overloaded(f"backend {backend!r} still has {alive} worker processes alive (at most replicas + 1 = "
                             f"{limit} at once); retry when the old ones have exited")
        return True
