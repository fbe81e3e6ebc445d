"""The supervisor's front processes ([http], [grpc]): started with it, restarted if they die, stopped on drain.

A front is ``akidb-embed http|grpc --endpoint <ours> --listen HOST:PORT`` in its own process, a
client of our endpoint like any other. It gets a lifeline socket (as workers do): when the
supervisor dies, the front exits too. The supervisor calls four hooks: ``start`` once its socket is
bound, ``tick`` from its housekeeping, ``begin_stop`` when it starts draining (the fronts stop
accepting and finish their in-flight calls while the supervisor answers them), ``shutdown`` last.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from akidb_embed.supervisor.config import Config, FrontConfig
from akidb_embed.supervisor.process import PACKAGE_ROOT, describe_exit

log = logging.getLogger(__name__)

STABLE_S = 30.0    # a front that ran this long starts its restart backoff afresh


class FrontProcess:
    """One front: its process, its lifeline, its restart backoff."""

    def __init__(self, cfg: FrontConfig, endpoint: str, backoff_min_s: float, backoff_max_s: float) -> None:
        self.cfg, self.endpoint = cfg, endpoint
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.backoff_s = backoff_min_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.lifeline: socket.socket | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "akidb_embed.cli", self.cfg.kind, "--endpoint", self.endpoint,
               "--listen", self.cfg.listen]
        if self.cfg.api_keys_file:
            cmd += ["--api-keys-file", self.cfg.api_keys_file]
        return cmd

    def spawn(self, now: float) -> None:
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen(self.command() + ["--lifeline-fd", str(child_end.fileno())],
                                         pass_fds=(child_end.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent_end.close()
            log.error("front start failed: kind=%s listen=%s: %s", self.cfg.kind, self.cfg.listen, exc)
            self._schedule(now)
            return
        finally:
            child_end.close()
        self.lifeline = parent_end
        self.started_at, self.restart_at = now, None
        log.info("front start: kind=%s listen=%s pid=%d", self.cfg.kind, self.cfg.listen, self.proc.pid)

    def _schedule(self, now: float) -> None:
        self.restart_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_max_s, self.backoff_s * 2)

    def tick(self, now: float) -> None:
        """Notice an exit and schedule the restart; restart when its time has come."""
        if self.proc is not None and self.proc.poll() is not None:
            log.warning("front exit: kind=%s pid=%d (%s); restarting", self.cfg.kind, self.proc.pid,
                        describe_exit(self.proc.returncode))
            if now - self.started_at >= STABLE_S:
                self.backoff_s = self.backoff_min_s
            self._close_lifeline()
            self.proc = None
            self.restarts += 1
            self._schedule(now)
        if self.proc is None and self.restart_at is not None and now >= self.restart_at:
            self.spawn(now)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _close_lifeline(self) -> None:
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None

    def finish(self, end: float) -> None:
        """Wait until ``end`` (monotonic) for the exit, then SIGKILL; nothing outlives the supervisor."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(0.01, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=5)
            log.info("front exit: kind=%s pid=%d reason=shutdown (%s)", self.cfg.kind, self.proc.pid,
                     describe_exit(self.proc.returncode))
        self._close_lifeline()


class Fronts:
    """Every configured front of one supervisor."""

    def __init__(self, config: Config) -> None:
        p = config.policy
        self.items = [FrontProcess(c, config.endpoint, p.restart_backoff_min_s, p.restart_backoff_max_s)
                      for c in (config.http, config.grpc) if c is not None]
        self.stopping = False
        self.grace_s = config.drain_timeout_s + 2.0

    def __bool__(self) -> bool:
        return bool(self.items)

    def start(self, endpoint: str | None = None) -> None:
        """``endpoint``: where the fronts connect (the supervisor's own ipc socket; default server.endpoint)."""
        now = time.monotonic()
        for f in self.items:
            if endpoint is not None:
                f.endpoint = endpoint
            f.spawn(now)

    def tick(self, now: float) -> None:
        if not self.stopping:
            for f in self.items:
                f.tick(now)

    def begin_stop(self) -> None:
        """SIGTERM: each front stops accepting and finishes its in-flight calls (answered by the drain)."""
        self.stopping = True
        for f in self.items:
            f.signal(signal.SIGTERM)

    def shutdown(self) -> None:
        if not self.stopping:
            self.begin_stop()
        end = time.monotonic() + self.grace_s
        for f in self.items:
            f.finish(end)

    def status(self) -> list[dict[str, object]]:
        return [{"kind": f.cfg.kind, "listen": f.cfg.listen, "pid": f.proc.pid if f.proc else None,
                 "restarts": f.restarts} for f in self.items]
