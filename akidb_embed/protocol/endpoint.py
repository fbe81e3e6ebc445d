"""Where the server listens by default, and where its private admin socket is (shared by the server's
config and the clients; the supervisor creates and checks these paths in supervisor/sockets.py).

The default endpoint lives in ``$XDG_RUNTIME_DIR/akidb-embed/`` or, without it, in
``<tmp>/akidb-embed-<uid>/``: a per-user private (0700) directory, never a fixed shared path in /tmp.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SOCKET_NAME = "akidb-embed.sock"


def run_dir() -> Path:
    """This user's private run directory (not created here)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "akidb-embed"
    return Path(tempfile.gettempdir()) / f"akidb-embed-{os.getuid()}"


def default_socket_path() -> Path:
    return run_dir() / SOCKET_NAME


def default_endpoint() -> str:
    """ipc in this user's private run directory."""
    return f"ipc://{default_socket_path()}"


def admin_socket_path(endpoint: str) -> Path:
    """The operator socket of the server at ``endpoint``: in the private run directory, so only its owner
    can open it; named after the endpoint so several servers of one user do not collide."""
    if endpoint.startswith("tcp://"):   # any host spelling of one port is the same server
        key = "tcp:" + endpoint.rsplit(":", 1)[-1]
    else:
        key = os.path.abspath(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else endpoint
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    return run_dir() / f"admin-{digest}.sock"
