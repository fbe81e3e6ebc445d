"""Deterministic mock backend with fault injection, for tests of the bridge and of host applications.

Options (all optional): ``dim`` (384), ``delay_ms`` (per batch), ``startup_delay_ms``,
``startup_crash`` (exit during load), ``startup_crash_file`` (a path: exit during load while that
file exists, so a test can end a crash loop by deleting it), ``load_fail_file`` (a path: load reports a
failure, as a missing model would, while that file exists), ``crash_on`` (a text that kills the process abruptly),
``hang_on`` (a text that blocks embed forever), ``fail_on`` (a text answered with an error),
``leak_mb_per_request`` (memory kept per embed call), ``max_tokens`` (512), ``ignore_sigterm``
(the worker ignores SIGTERM, so only SIGKILL ends it).
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any, Mapping, Sequence

import numpy as np

from akidb_embed.protocol.errors import BackendUnavailable, InternalError
from akidb_embed.workers.backends.base import Backend, EmbedOutput, ModelInfo


def mock_vector(text: str, dim: int) -> np.ndarray:
    """The mock's vector for ``text``: a pure function of (text, dim), unnormalized float32."""
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class MockBackend(Backend):
    kind = "mock"

    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        super().__init__(model, options)
        self.dim = int(self.options.get("dim", 384))
        self.delay_s = float(self.options.get("delay_ms", 0)) / 1000.0
        self.max_tokens = int(self.options.get("max_tokens", 512))
        self._leak: list[bytearray] = []

    def load(self) -> ModelInfo:
        if self.options.get("ignore_sigterm"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        startup_delay = float(self.options.get("startup_delay_ms", 0)) / 1000.0
        if startup_delay:
            time.sleep(startup_delay)
        if self.options.get("startup_crash"):
            os._exit(3)
        crash_file = self.options.get("startup_crash_file")
        if crash_file and os.path.exists(crash_file):
            os._exit(3)
        fail_file = self.options.get("load_fail_file")
        if fail_file and os.path.exists(fail_file):
            raise BackendUnavailable(f"mock load_fail_file: {fail_file} exists")
        return ModelInfo(model=self.model or "mock", dim=self.dim, max_tokens=self.max_tokens,
                         extra={"deterministic": True})

    def embed(self, texts: Sequence[str], truncate: str = "end") -> EmbedOutput:
        self._inject_faults(texts)
        if self.delay_s:
            time.sleep(self.delay_s)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        cut = [False] * len(texts)
        for i, text in enumerate(texts):
            words = text.split()
            if len(words) > self.max_tokens:
                cut[i] = True
                text = " ".join(words[-self.max_tokens:] if truncate == "start" else words[: self.max_tokens])
            out[i] = mock_vector(text, self.dim)
        return EmbedOutput(out, sum(cut), cut)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]   # a mock token is a word

    def _inject_faults(self, texts: Sequence[str]) -> None:
        opts = self.options
        if "crash_on" in opts and opts["crash_on"] in texts:
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang_on" in opts and opts["hang_on"] in texts:
            while True:  # a hang, as a deadlocked model would: never returns
                time.sleep(3600)
        if "fail_on" in opts and opts["fail_on"] in texts:
            raise InternalError(f"mock fail_on: refused text {opts['fail_on']!r}")
        leak = float(opts.get("leak_mb_per_request", 0))
        if leak:
            block = bytearray(int(leak * 1024 * 1024))
            block[::4096] = b"x" * len(block[::4096])  # touch every page so RSS grows
            self._leak.append(block)
