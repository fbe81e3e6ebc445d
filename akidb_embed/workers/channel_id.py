"""A worker's ZeroMQ identity on the supervisor's worker channel: a one-time secret, not a guessable name.

The supervisor makes a random identity per spawned worker and writes it into the worker's inherited
lifeline socket pair (never the command line or the environment, which other processes can read).
The supervisor routes jobs to that identity and accepts ready/heartbeat/done/fail only from it (and
from ``identity + "/hb"``, the heartbeat socket); a peer that connects to the worker socket under
any other identity is ignored, and cannot guess this one.
"""
from __future__ import annotations

import os
import secrets

TOKEN_BYTES = 16
HB_SUFFIX = b"/hb"


def new_identity() -> bytes:
    return secrets.token_hex(TOKEN_BYTES).encode()   # 32 ASCII bytes: printable in a debugger, 128 bits


def send_identity(sock, identity: bytes) -> None:  # type: ignore[no-untyped-def]
    """Supervisor side: hand the identity to the worker through its lifeline (a socket.socket)."""
    sock.sendall(identity + b"\n")


def read_identity(lifeline_fd: int) -> bytes:
    """Worker side, before anything else reads the lifeline: the identity line, or exit if the supervisor is gone."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(lifeline_fd, 2 * TOKEN_BYTES + 1 - len(line))
        if not chunk:
            raise SystemExit("supervisor closed the lifeline before sending this worker's identity")
        line += chunk
    return line[:-1]
