"""Restart policy of one backend: capped exponential backoff and two limits: N crashes in T seconds, and
N consecutive crashes with no worker becoming ready in between (a slow crash loop, a start-up hang)."""
from __future__ import annotations

from collections import deque

from akidb_embed.supervisor.config import Policy


class RestartPolicy:
    def __init__(self, policy: Policy) -> None:
        self.p = policy
        self.crashes: deque[float] = deque()
        self.consecutive = 0

    def record_crash(self, now: float) -> float | None:
        """Note a crash; return the delay before the next start, or None when the limit is exceeded."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.p.restart_window_s:
            self.crashes.popleft()
        self.consecutive += 1
        if len(self.crashes) > self.p.restart_max or self.consecutive > self.p.restart_max:
            return None
        doublings = min(self.consecutive - 1, 32)   # 2 ** 1024 overflows a float; the cap is reached long before
        return float(min(self.p.restart_backoff_max_s, self.p.restart_backoff_min_s * 2 ** doublings))

    def record_ready(self) -> None:
        """A worker came up: the next crash starts again from the shortest backoff."""
        self.consecutive = 0

    def reset(self) -> None:
        """After a FAILED cool-down or an operator start: a clean slate."""
        self.crashes.clear()
        self.consecutive = 0
