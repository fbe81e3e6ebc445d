"""The ``[server]`` keys that protect the supervisor from its peers: limits, quotas, CURVE, operators.

Parsed here (and documented in config.toml) so config.py only forwards the table.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akidb_embed.protocol.messages import Limits

MAX_FRAME_CEILING = 32 * 2**20   # max_frame_bytes stays below ZMQ_MAXMSGSIZE (the supervisor sets 64 MiB)


@dataclass(frozen=True)
class Guard:
    limits: Limits = field(default_factory=Limits)
    peer_queue_share: float = 0.5          # one connection holds at most this share of a backend's max_queue
    max_peer_bytes: int = 256 * 2**20      # request bytes one connection may have unanswered
    answer_hwm: int = 1000                 # answers queued to one connection before it counts as not reading
    curve_secret_key: str | None = None    # the server's key pair (secret file of `akidb-embed keys generate`)
    curve_clients: str | None = None       # directory of allowed client public keys
    curve_admins: str | None = None        # directory of operator public keys (tcp)
    socket_mode: int | None = None         # e.g. 0o660 to open the client socket to a group (ipc)


INT_KEYS = {"max_frame_bytes", "max_texts_per_request", "max_text_bytes", "max_peer_bytes", "answer_hwm"}
PATH_KEYS = {"curve_secret_key", "curve_clients", "curve_admins"}
GUARD_KEYS = INT_KEYS | PATH_KEYS | {"peer_queue_share", "socket_mode"}


def _positive_int(src: str, key: str, value: Any, ceiling: int | None = None) -> int:
    if type(value) is not int or value < 1 or (ceiling is not None and value > ceiling):
        top = f" and at most {ceiling}" if ceiling else ""
        raise ValueError(f"{src}: server.{key} must be a positive integer{top}, got {value!r}")
    return value


def parse_guard(src: str, server: Mapping[str, Any], base: Path | None = None) -> Guard:
    """Validate the guard keys of a ``[server]`` table; raises ValueError naming the key."""
    ints = {k: _positive_int(src, k, server[k], MAX_FRAME_CEILING if k == "max_frame_bytes" else
                             4096 if k == "max_texts_per_request" else None)
            for k in INT_KEYS if k in server}
    limits = Limits(**{k: v for k, v in ints.items() if k in Limits.__dataclass_fields__})
    share = server.get("peer_queue_share", 0.5)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"{src}: server.peer_queue_share must be a number in (0, 1], got {share!r}")
    paths = {}
    for key in PATH_KEYS & set(server):
        value = server[key]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{src}: server.{key} must be a path, got {value!r}")
        path = Path(value).expanduser()
        paths[key] = str(path if path.is_absolute() or base is None else base / path)
    mode = server.get("socket_mode")
    if mode is not None:
        mode = int(mode, 8) if isinstance(mode, str) and mode.isdigit() else mode
        if type(mode) is not int or mode & ~0o770 or not mode & 0o600 == 0o600:
            raise ValueError(f"{src}: server.socket_mode must be an octal string like \"660\" (owner rw, group "
                             f"at most rw, nothing for others), got {server['socket_mode']!r}")
    extra: dict[str, Any] = {k: v for k, v in ints.items() if k in ("max_peer_bytes", "answer_hwm")}
    extra.update(paths)
    return Guard(limits=limits, peer_queue_share=float(share), socket_mode=mode, **extra)
