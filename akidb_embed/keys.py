"""CURVE key pairs in ZeroMQ's certificate format: generate, load, and apply to a client socket.

``akidb-embed keys generate NAME`` writes ``NAME.key`` (public, give it to the other side) and
``NAME.key_secret`` (mode 0600, keep it). Imported by the clients and the supervisor; imports only
pyzmq.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import zmq
import zmq.auth

ENV_SERVER_KEY = "AKIDB_EMBED_SERVER_KEY"   # the server's public key: a .key file or its 40-char Z85 text
ENV_CLIENT_KEY = "AKIDB_EMBED_CLIENT_KEY"   # this client's key pair: a .key_secret file


@dataclass(frozen=True)
class KeyPair:
    public: bytes          # Z85, 40 bytes
    secret: bytes | None   # Z85, 40 bytes; None for a public key only


KeySource: TypeAlias = "str | os.PathLike[str] | bytes | KeyPair"


def generate(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (0600 from the start) in ``directory``; refuse to overwrite."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it first or choose another name")
    old = os.umask(0o177)
    try:
        zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


def load(source: KeySource, *, need_secret: bool) -> KeyPair:
    """A KeyPair from a KeyPair, a certificate file, or the 40-character Z85 text of a public key."""
    if isinstance(source, KeyPair):
        pair = source
    elif isinstance(source, (bytes, str)) and len(source) == 40 and not Path(os.fsdecode(source)).exists():
        pair = KeyPair(source.encode() if isinstance(source, str) else source, None)
    else:
        path = Path(os.fsdecode(source)).expanduser()
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read CURVE key {path}: {exc}") from exc
        pair = KeyPair(public, secret)
    if need_secret and not pair.secret:
        raise ValueError(f"{source!r} holds no secret key: pass the .key_secret file of a key pair "
                         "(`akidb-embed keys generate NAME`)")
    return pair


def apply_client_keys(sock: zmq.Socket, server_key: KeySource | None, client_key: KeySource | None) -> bool:
    """Make ``sock`` a CURVE client when keys are given (arguments, else the environment); True if so."""
    server_key = server_key if server_key is not None else os.environ.get(ENV_SERVER_KEY) or None
    client_key = client_key if client_key is not None else os.environ.get(ENV_CLIENT_KEY) or None
    if server_key is None and client_key is None:
        return False
    if server_key is None or client_key is None:
        raise ValueError("CURVE needs both the server's public key (server_key, --server-key, "
                         f"${ENV_SERVER_KEY}) and this client's key pair (client_key, --client-key, "
                         f"${ENV_CLIENT_KEY})")
    mine = load(client_key, need_secret=True)
    sock.curve_serverkey = load(server_key, need_secret=False).public
    sock.curve_publickey = mine.public
    sock.curve_secretkey = mine.secret
    return True
