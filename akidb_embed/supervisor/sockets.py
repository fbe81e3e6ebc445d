"""Private ipc paths: the per-user run directory (0700), socket files 0600, and checks on configured paths.

* The default endpoint lives in ``$XDG_RUNTIME_DIR/akidb-embed/`` or, without it, in
  ``<tmp>/akidb-embed-<uid>/``: a directory the supervisor creates with mode 0700 and, when it
  exists already, checks (a real directory, owned by this user, no access for group or others);
  never a fixed shared path in /tmp that another user could take first.
* A socket file is created under umask 0177 (0600 whatever the process umask; no chmod race),
  then widened to ``socket_mode`` only when that is configured (to open it to a group).
* A configured path in a directory others may write to is refused (or warned about, for a sticky
  directory such as /tmp), with the fix.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from akidb_embed.protocol.endpoint import (
    SOCKET_NAME, admin_socket_path, default_socket_path, run_dir,
)

__all__ = ["SOCKET_NAME", "UnsafePath", "admin_socket_path", "default_socket_path", "run_dir"]

log = logging.getLogger(__name__)


class UnsafePath(Exception):
    """A path another user could take over; the message says why and what to do."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check an existing one is this user's and private."""
    try:
        os.mkdir(path, 0o700)   # the umask can only narrow 0700
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} exists and is not a directory (a symlink or file put there by someone else?); "
                         "remove it or set XDG_RUNTIME_DIR")
    if st.st_uid != os.getuid():
        raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): another user "
                         "created it first; remove it or set XDG_RUNTIME_DIR")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)   # ours, only too open (an older version, or a umask at mkdir time)
    return path


def check_configured_path(path: Path) -> None:
    """Refuse a socket path another user could replace; warn when a sticky shared directory holds it."""
    parent = path.parent
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        return   # created by the supervisor, with the process umask (narrowed below for the socket)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"the directory of {path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): "
                         "another user could replace the socket; use a private directory, or leave "
                         "server.endpoint unset for the default private one")
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP) or (st.st_uid not in (0, os.getuid())):
        log.warning("socket %s is in a directory other users can write to (%s, mode %o): they cannot take this "
                    "socket over while it exists, but could take the name first; a private directory is safer "
                    "(leave server.endpoint unset)", path, parent, stat.S_IMODE(st.st_mode))
    if path.exists() and os.lstat(path).st_uid != os.getuid():
        raise UnsafePath(f"{path} exists and belongs to another user; choose another path")


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files created inside (an ipc socket by zmq bind) get mode 0600 whatever the process umask."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def prepare_ipc(path: Path, is_default: bool) -> None:
    """Before binding ``ipc://path``: make the private directory, or check a configured one."""
    if is_default or path.parent == run_dir():
        ensure_private_dir(path.parent)
    else:
        check_configured_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
