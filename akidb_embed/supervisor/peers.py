"""Per-peer bookkeeping on the client socket: envelopes, in-flight ids, per-peer quotas and stalls.

A peer is one ZeroMQ connection, named by the routing id the ROUTER socket gives it (its first
frame). The ledger holds, per peer, its embed requests not yet answered (by id, with their frame
bytes) so that

* a second request with the id of one still in flight is refused (BAD_REQUEST),
* one peer holds at most ``share`` of a backend's ``max_queue`` (OVERLOADED past it), so a flood
  from one peer leaves room for the others,
* one peer holds at most ``max_peer_bytes`` of request frames (OVERLOADED past it),
* a peer whose answers are not being read (its send queue is at the high-water mark) gets its new
  requests refused cheaply until it reads again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from akidb_embed.protocol.errors import BadRequest, Overloaded
from akidb_embed.supervisor.requests import Request

MAX_ENVELOPE_FRAMES = 8      # routing frames before the body (REQ through proxies, REQ_CORRELATE)
MAX_ENVELOPE_PART = 256      # bytes of one routing frame
STALL_RETRY_S = 1.0          # a stalled peer's next request after this long is tried normally again


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes | None, int]:
    """ROUTER frames -> (route to answer on, body or None, body frame count).

    [identity, body] from a DEALER; [identity, ..., b"", body] from a REQ (with ZMQ_REQ_CORRELATE
    the envelope carries its request id before the delimiter). Anything else has no single body:
    the route is the envelope up to the first empty frame, so even a REQ peer gets its error.
    """
    if len(frames) == 2:
        return frames[:1], frames[1], 1
    if 3 <= len(frames) <= MAX_ENVELOPE_FRAMES + 1 and frames[-2] == b"" and all(
            len(f) <= MAX_ENVELOPE_PART for f in frames[:-1]):
        return frames[:-1], frames[-1], 1
    head = frames[:MAX_ENVELOPE_FRAMES]
    end = head.index(b"") + 1 if b"" in head[1:] else 1
    route = frames[:end] if all(len(f) <= MAX_ENVELOPE_PART for f in frames[:end]) else frames[:1]
    return route, None, len(frames) - len(route)


@dataclass
class Peer:
    inflight: dict[Any, Request] = field(default_factory=dict)   # request id -> Request
    per_backend: dict[str, int] = field(default_factory=dict)
    frame_bytes: int = 0
    stalled_at: float | None = None


class PeerLedger:
    """Outstanding embed requests per peer; one entry per peer with something in flight."""

    def __init__(self, share: float = 0.5, max_peer_bytes: int = 256 * 2**20) -> None:
        self.share, self.max_peer_bytes = share, max_peer_bytes
        self.peers: dict[bytes, Peer] = {}
        self._stalled: dict[bytes, float] = {}

    def admit(self, identity: bytes, rid: Any, backend: str, max_queue: int, frame_bytes: int,
              workers_hold: int = 0) -> None:
        """Raise when this peer may not add a request now (before anything is recorded).

        A peer may have ``share * max_queue`` requests waiting plus ``workers_hold`` (what the backend's
        workers can hold at once) in a worker: its share of the queue, whatever the workers are doing.
        """
        peer = self.peers.get(identity)
        if peer is None:
            return
        if rid in peer.inflight:
            raise BadRequest(f"id {rid!r} is already in flight on this connection; ids must be unique among "
                             "a connection's unanswered requests")
        cap = max(1, int(max_queue * self.share)) + workers_hold
        if peer.per_backend.get(backend, 0) >= cap:
            raise Overloaded(f"this connection already has {cap} requests unanswered for backend {backend!r} "
                             f"(its share of max_queue = {max_queue}, plus what the workers hold); retry when "
                             "some are answered")
        if peer.frame_bytes + frame_bytes > self.max_peer_bytes:
            raise Overloaded(f"this connection already has {peer.frame_bytes} bytes of requests unanswered "
                             f"(max_peer_bytes = {self.max_peer_bytes}); retry when some are answered")

    def add(self, p: Request) -> None:
        """Called by the request table when it records ``p`` (keyed by ``p.peer``)."""
        peer = self.peers.setdefault(p.peer, Peer())
        peer.inflight[p.rid] = p
        peer.per_backend[p.backend] = peer.per_backend.get(p.backend, 0) + 1
        peer.frame_bytes += len(p.frame)

    def release(self, p: Request) -> None:
        """Called by the request table's one answer point."""
        identity = p.peer
        peer = self.peers.get(identity)
        if peer is None or peer.inflight.get(p.rid) is not p:
            return
        del peer.inflight[p.rid]
        peer.per_backend[p.backend] -= 1
        peer.frame_bytes -= len(p.frame)
        if not peer.inflight:
            del self.peers[identity]

    # ---- peers that do not read their answers ---------------------------------------------
    def stalled(self, identity: bytes, now: float | None = None) -> bool:
        """True when this peer's answer queue was full a moment ago (it is not reading)."""
        at = self._stalled.get(identity)
        if at is None:
            return False
        if (time.monotonic() if now is None else now) - at > STALL_RETRY_S:
            del self._stalled[identity]
            return False
        return True

    def mark_stalled(self, identity: bytes) -> bool:
        """Record that an answer to this peer was dropped (queue full); True the first time."""
        first = identity not in self._stalled
        self._stalled[identity] = time.monotonic()
        if len(self._stalled) > 10_000:   # bounded: forget the oldest
            for key in list(self._stalled)[:1000]:
                del self._stalled[key]
        return first
