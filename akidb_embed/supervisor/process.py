"""Spawn, watch and stop one worker process."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from akidb_embed.supervisor.config import BackendConfig
from akidb_embed.workers.channel_id import new_identity, send_identity

if TYPE_CHECKING:
    from akidb_embed.supervisor.jobs import Job

log = logging.getLogger(__name__)

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # so another interpreter can import akidb_embed


class WState(str, Enum):
    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"    # no new work; sent STOP once it holds nothing
    STOPPING = "STOPPING"    # asked to stop (STOP, then SIGTERM, then SIGKILL)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerProcess:
    """One worker: its process, its lifeline socket (EOF = it died) and its bookkeeping."""

    def __init__(self, cfg: BackendConfig, wid: str, endpoint: str) -> None:
        self.cfg, self.wid, self.endpoint = cfg, wid, endpoint
        self.state = WState.STARTING
        self.proc: subprocess.Popen[bytes] | None = None
        self.lifeline: socket.socket | None = None
        self.inflight: dict[int, Job] = {}     # job seq -> job handed to it and not returned yet
        self.running: list[int] = []           # seqs of its current forward pass (from its last heartbeat)
        self.isolating = False                 # holds one suspect request alone
        self.started_at = time.monotonic()
        self.last_heartbeat = time.monotonic()
        self.served = 0
        self.rss = 0
        self.info: dict[str, Any] | None = None
        self.load_error: dict[str, Any] | None = None
        self.kill_reason: str | None = None     # why the supervisor ended it, when it did
        self.hung = False                       # killed for holding a request past its deadline (heartbeats alive)
        self.recycle_reason: str | None = None  # why it is being replaced gracefully, when it is
        self.stop_stage_at: float | None = None
        self.stop_signalled = False             # we sent SIGTERM/SIGKILL to end a stop that took too long
        self._ps: psutil.Process | None = None
        self.identity = new_identity()          # issue 11: its ZeroMQ identity, a secret sent through the lifeline

    def command(self) -> list[str]:
        c, p = self.cfg, self.cfg.policy
        return [c.python, "-m", "akidb_embed.workers", "--backend", c.name, "--kind", c.kind, "--model", c.model,
                "--wid", self.wid, "--endpoint", self.endpoint, "--options", json.dumps(dict(c.options)),
                "--heartbeat", str(p.heartbeat_interval_s), "--max-batch-size", str(c.max_batch_size),
                "--max-batch-tokens", str(c.max_batch_tokens)]

    def spawn(self) -> None:
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        cmd = self.command() + ["--lifeline-fd", str(child_end.fileno())]
        try:
            # its own session: a signal to the supervisor's process group (systemd's control-group kill,
            # docker stop, Ctrl-C) reaches only the supervisor, which then stops its workers in order
            self.proc = subprocess.Popen(cmd, pass_fds=(child_end.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self.lifeline = parent_end
        try:   # issue 11: the channel secret, before anything else on the lifeline
            send_identity(parent_end, self.identity)
        except OSError as exc:   # it died already: its closed lifeline reports the exit as usual
            log.warning("worker %s: could not send its channel identity: %s", self.wid, exc)
        self.started_at = self.last_heartbeat = time.monotonic()
        try:
            self._ps = psutil.Process(self.proc.pid)
        except psutil.Error:
            self._ps = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def lifeline_fd(self) -> int:
        assert self.lifeline is not None
        return self.lifeline.fileno()

    def reap(self, timeout: float = 1.0) -> int | None:
        """After the lifeline closed: collect the exit code (the fd closes just before the process ends)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def exit_code(self) -> int | None:
        """Its exit status once it has ended (None while it runs or if it never started)."""
        return self.proc.poll() if self.proc is not None else None

    def wait_exit(self, timeout: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass

    def close_lifeline(self) -> None:
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def measure_rss(self) -> int:
        try:
            self.rss = self._ps.memory_info().rss if self._ps else 0
        except psutil.Error:
            self.rss = 0
        return self.rss

    def uptime(self) -> float:
        return time.monotonic() - self.started_at
