"""Warnings about untrusted peers, rate-limited: a flood of garbage costs a few log lines, not one each."""
from __future__ import annotations

import logging
import time
from typing import Any


class Throttled:
    """At most ``burst`` lines per ``window_s`` per key; then one line saying how many were suppressed.

    Callers pass already-clipped values (``protocol.messages.clip``): no line carries unbounded input.
    """

    def __init__(self, logger: logging.Logger, burst: int = 5, window_s: float = 10.0) -> None:
        self.log, self.burst, self.window_s = logger, burst, window_s
        self._windows: dict[str, list[float]] = {}   # key -> [window start, lines in it, suppressed]

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None or now - w[0] > self.window_s:
            if w is not None and w[2]:
                self.log.warning("%d more %r warnings suppressed in %.0f s", int(w[2]), key, self.window_s)
            if len(self._windows) > 1000:
                self._windows.clear()
            w = self._windows[key] = [now, 0, 0]
        if w[1] < self.burst:
            w[1] += 1
            self.log.warning(msg, *args)
        else:
            w[2] += 1
