"""Who may connect and who is an operator: CURVE with a ZAP handler that fails closed.

* tcp on an address other than loopback needs ``[server] curve_secret_key``; else a ConfigError.
* With CURVE, the client socket gets a ZAP domain and ``ZMQ_ZAP_ENFORCE_DOMAIN``, and pyzmq's
  ThreadAuthenticator (started before bind, on the same context) is configured for that same domain
  (in pyzmq "*" is no wildcard for a named domain): a client whose public key is in neither
  ``curve_clients`` nor ``curve_admins`` is refused in the handshake, and without a running handler
  libzmq refuses every client (enforced domain). Checked against libzmq 4.3.5: ZAP_ENFORCE_DOMAIN
  alone, with no domain set, skips ZAP and accepts any key.
* An operator is a peer whose message carries the ZAP User-Id of a key in ``curve_admins`` (tcp), or
  any peer of the private admin ipc socket (only the owner can open its directory).
"""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from akidb_embed.keys import load
from akidb_embed.supervisor.guard import Guard

log = logging.getLogger(__name__)

ZAP_DOMAIN = "akidb-embed"


class AuthError(Exception):
    """A CURVE setting that cannot work (message names the key)."""


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # "*", an interface name, a host name: not provably loopback


def check_exposure(endpoint: str, guard: Guard) -> None:
    """tcp beyond loopback without CURVE is refused, naming the key to set."""
    if not endpoint.startswith("tcp://") or guard.curve_secret_key:
        return
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    if not _loopback(host):
        raise AuthError(f"server.endpoint = {endpoint!r} listens beyond loopback without authentication: set "
                        "server.curve_secret_key (a key pair from `akidb-embed keys generate server`) and "
                        "server.curve_clients (a directory of allowed client public keys), or bind 127.0.0.1")


def _public_keys(directory: str | None, key: str) -> set[bytes]:
    if directory is None:
        return set()
    if not Path(directory).is_dir():
        raise AuthError(f"server.{key} = {directory!r} is not a directory of public keys (*.key)")
    return set(zmq.auth.load_certificates(directory))


class KeyRing:
    """The ZAP credentials provider: allowed client keys and operator keys (Z85)."""

    def __init__(self, clients: set[bytes], admins: set[bytes]) -> None:
        self.clients, self.admins = clients, admins
        self._refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = domain == ZAP_DOMAIN and (key in self.clients or key in self.admins)
        if not ok:
            self._refused += 1
            if self._refused <= 5 or self._refused % 1000 == 0:   # rate-limited: a scan costs few lines
                log.warning("CURVE client refused: unknown key %s (%d refused so far)", key[:40].decode(
                    "ascii", "replace"), self._refused)
        return ok

    def is_admin(self, user_id: str | None) -> bool:
        return user_id is not None and user_id.encode() in self.admins


class Curve:
    """The authenticator thread and key ring of one supervisor; ``stop()`` before the context ends."""

    def __init__(self, ctx: zmq.Context[Any], guard: Guard) -> None:
        assert guard.curve_secret_key
        try:
            pair = load(guard.curve_secret_key, need_secret=True)
        except ValueError as exc:
            raise AuthError(f"server.curve_secret_key: {exc}") from exc
        self.public, self._secret = pair.public, pair.secret
        self.ring = KeyRing(_public_keys(guard.curve_clients, "curve_clients"),
                            _public_keys(guard.curve_admins, "curve_admins"))
        if not self.ring.clients and not self.ring.admins:
            raise AuthError("server.curve_secret_key is set but no client key is allowed: set server.curve_clients "
                            "(and/or server.curve_admins) to a directory holding their *.key files")
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("akidb_embed.supervisor.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, self.ring)

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server whose every peer goes through the ZAP handler (before bind)."""
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def stop(self) -> None:
        self.auth.stop()


def user_id(frame: Any) -> str | None:
    """The ZAP User-Id (Z85 client key) of a received zmq.Frame, or None."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, AttributeError):
        return None
