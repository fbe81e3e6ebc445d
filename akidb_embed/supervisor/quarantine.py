"""The quarantine of poison inputs: fingerprints of inputs that crashed or hung a worker."""
from __future__ import annotations

import hashlib
import time


def fingerprint(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class Quarantine:
    """Fingerprints of inputs that crashed a worker, refused until they expire.

    A one-text request that crashed a worker quarantines that text wherever it appears again; a
    multi-text request quarantines the exact list.
    """

    def __init__(self) -> None:
        self._until: dict[str, tuple[float, str]] = {}   # fingerprint -> (expiry, reason)

    def add(self, texts: list[str], seconds: float, reason: str) -> None:
        self._until[fingerprint(texts)] = (time.monotonic() + seconds, reason)

    def check(self, texts: list[str]) -> str | None:
        """The reason the input is quarantined, or None. Costs nothing while the quarantine is empty."""
        if not self._until:
            return None
        now = time.monotonic()
        for key in [k for k, (until, _) in self._until.items() if until <= now]:
            del self._until[key]
        for key in [fingerprint(texts)] + ([fingerprint([t]) for t in texts] if len(texts) > 1 else []):
            hit = self._until.get(key)
            if hit:
                return f"{hit[1]}; refused for another {hit[0] - now:.0f} s"
        return None

    def __len__(self) -> int:
        return len(self._until)
