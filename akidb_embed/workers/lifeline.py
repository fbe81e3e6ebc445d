"""Tie a worker's life to its supervisor: exit when the supervisor is gone, and heartbeat meanwhile."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

import zmq

from akidb_embed.protocol.messages import WorkerMsg, worker_header

log = logging.getLogger(__name__)


def die_with_parent(lifeline_fd: int) -> None:
    """Exit at once when the supervisor's end of the lifeline socket closes (it died or exited)."""
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGKILL on parent death even if we are stopped
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        try:
            while os.read(lifeline_fd, 4096):
                pass
        except OSError:
            pass
        log.warning("supervisor is gone; worker %d exiting", os.getpid())
        os._exit(0)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


class Heartbeat:
    """Sends ``hb`` from its own socket and thread, so a long forward pass is not taken for a hang."""

    def __init__(self, ctx: zmq.Context, endpoint: str, wid: str, interval_s: float,
                 identity: bytes | None = None) -> None:
        self.busy = False
        self.running: list[int] = []   # seqs of the forward pass under way (set by the main thread)
        self._stop = threading.Event()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, (identity or wid.encode()) + b"/hb")  # issue 11: secret identity
        self._sock.connect(endpoint)
        self._wid, self._interval = wid, interval_s
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            try:
                self._sock.send(worker_header(WorkerMsg.HEARTBEAT, wid=self._wid, pid=pid, busy=self.busy,
                                              running=self.running),
                                zmq.NOBLOCK)
            except zmq.Again:
                pass
            self._stop.wait(self._interval)
        self._sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
