"""The worker process: handshake, then receive jobs, batch them, embed, reply; exit on stop."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from akidb_embed.protocol.errors import BackendUnavailable, EmbedError, InternalError, Timeout
from akidb_embed.protocol.messages import (
    EmbedRequest, WorkerMsg, done_msg, embed_response, error_response, parse_header, parse_request,
    worker_header,
)
from akidb_embed.workers.backends import Backend, ModelInfo, create_backend
from akidb_embed.workers.batching import Slot, plan_groups
from akidb_embed.workers.lifeline import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    backend: str                      # the configured backend name (what clients ask for)
    kind: str                         # backend kind: mock, onnx, ...
    model: str
    wid: str                          # worker id, also its ZeroMQ identity
    endpoint: str                     # the supervisor's worker socket
    options: dict[str, Any] = field(default_factory=dict)
    heartbeat_s: float = 0.5
    max_batch_size: int = 16
    max_batch_tokens: int = 4096


@dataclass
class Job:
    seq: int
    deadline: float
    request: EmbedRequest
    vectors: np.ndarray | None = None
    remaining: int = 0
    failed: bool = False
    lengths: list[int] = field(default_factory=list)   # tokens per text (after truncation), for metrics


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.s = settings
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, settings.wid.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(settings.endpoint)
        self.heartbeat = Heartbeat(self.ctx, settings.endpoint, settings.wid, settings.heartbeat_s)
        self.backend: Backend | None = None
        self.info: ModelInfo | None = None
        self.stopping = False
        self._outbox: list[bytes] = []   # finished (header, answer) pairs waiting for _flush
        self._runs: list[list[float]] = []   # [texts, tokens, seconds] per pass, sent with the next done (metrics)

    # ---- life cycle ---------------------------------------------------------------------
    def run(self) -> int:
        self.heartbeat.start()
        if not self._load():
            return 2
        log.info("worker %s ready: backend=%s kind=%s model=%s dim=%d pid=%d", self.s.wid, self.s.backend,
                 self.s.kind, self.info.model, self.info.dim, os.getpid())
        while not self.stopping:
            self._serve_once()
        self.heartbeat.stop()
        self.backend.close()
        self.sock.close()
        return 0

    def _load(self) -> bool:
        pid = os.getpid()
        try:
            self.backend = create_backend(self.s.kind, self.s.model, self.s.options)
            self.info = self.backend.load()
        except Exception as exc:  # report every load failure as a value, then exit
            err = exc if isinstance(exc, EmbedError) else BackendUnavailable(
                f"{self.s.kind} backend failed to load model {self.s.model!r}: {type(exc).__name__}: {exc}")
            log.error("worker %s could not load: %s", self.s.wid, err)
            self.sock.send(worker_header(WorkerMsg.FAIL, wid=self.s.wid, pid=pid, error=err.to_wire()))
            return False
        self.sock.send(worker_header(WorkerMsg.READY, wid=self.s.wid, pid=pid, info=self.info.to_wire()))
        return True

    # ---- one turn: take everything waiting, embed it, answer ----------------------------
    def _serve_once(self) -> None:
        if not self.sock.poll(1000):
            return
        jobs: list[Job] = []
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:  # everything waiting, without a zmq.Again per turn
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            for i in range(0, len(frames), 2):   # a message holds one or more (header, request) pairs
                job = self._accept(frames[i:i + 2])
                if job is not None:
                    jobs.append(job)
        if jobs:
            self.heartbeat.busy = True
            try:
                self._process(jobs)
            finally:
                self.heartbeat.busy = False
                self._flush()

    def _accept(self, frames: list[bytes]) -> Job | None:
        try:
            header = parse_header(frames[0])
            if header["t"] == WorkerMsg.STOP:
                self.stopping = True
                return None
            if header["t"] != WorkerMsg.EMBED or len(frames) != 2:
                raise ValueError(f"unexpected message {header.get('t')!r}")
            request = parse_request(frames[1])
            if not isinstance(request, EmbedRequest):
                raise ValueError("job is not an embed request")
            return Job(seq=int(header["seq"]), deadline=float(header["deadline"]), request=request)
        except Exception as exc:  # a bad frame is logged and dropped; the supervisor's deadline answers it
            log.error("worker %s dropped a malformed job: %s", self.s.wid, exc)
            return None

    def _process(self, jobs: list[Job]) -> None:
        now = time.time()
        live = []
        for job in jobs:
            if job.deadline <= now:
                self._reply_error(job, Timeout("deadline passed before the worker started the request"))
            else:
                live.append(job)
        slots = [(Slot(j, r), text) for j, job in enumerate(live) for r, text in enumerate(job.request.texts)]
        if not slots:
            return
        try:
            lengths = self.backend.token_lengths([text for _, text in slots])
        except Exception:  # only a grouping hint: fall back to the generic estimate, let embed report errors
            log.exception("worker %s: token_lengths failed; grouping by estimate", self.s.wid)
            lengths = Backend.token_lengths(self.backend, [text for _, text in slots])
        for (slot, _), length in zip(slots, lengths):
            live[slot.job].remaining += 1
            live[slot.job].lengths.append(length)   # slots are in row order
        groups = plan_groups([(slot, n) for (slot, _), n in zip(slots, lengths)],
                             self.s.max_batch_size, self.s.max_batch_tokens)
        truncated = [0] * len(live)
        for group in groups:
            self._run_group(live, group, truncated)
            self._flush()   # the requests this pass finished are answered now, together

    def _run_group(self, jobs: list[Job], group: list[Slot], truncated: list[int]) -> None:
        now = time.time()
        todo = [slot for slot in group if not jobs[slot.job].failed]
        for slot in todo:
            job = jobs[slot.job]
            if job.deadline <= now and not job.failed:
                job.failed = True
                self._reply_error(job, Timeout("deadline passed while the request waited in the worker"))
        todo = [slot for slot in todo if not jobs[slot.job].failed]
        if not todo:
            return
        started = time.perf_counter()
        try:
            out = self.backend.embed([jobs[s.job].request.texts[s.row] for s in todo])
        except Exception as exc:
            self._group_failed(jobs, todo, truncated, exc)
            return
        self._runs.append([len(todo), sum(jobs[s.job].lengths[s.row] for s in todo), time.perf_counter() - started])
        if out.truncated_rows is None and out.truncated and len({s.job for s in todo}) == 1:
            truncated[todo[0].job] += out.truncated   # no per-row flags, but one owner: the count is exact
        else:
            for i, slot in enumerate(todo):
                truncated[slot.job] += out.row_truncated(i)
        self._store(jobs, todo, out.vectors, truncated)

    def _group_failed(self, jobs: list[Job], todo: list[Slot], truncated: list[int], exc: Exception) -> None:
        owners = sorted({s.job for s in todo})
        if len(owners) > 1:  # isolate: run each request's texts apart so one bad input fails alone
            for j in owners:
                self._run_group(jobs, [s for s in todo if s.job == j], truncated)
            return
        job = jobs[owners[0]]
        job.failed = True
        if isinstance(exc, EmbedError):
            err = exc
        else:
            log.exception("worker %s: embed failed", self.s.wid)
            err = InternalError(f"{self.s.kind} backend failed: {type(exc).__name__}: {exc}")
        self._reply_error(job, err)

    def _store(self, jobs: list[Job], todo: list[Slot], out: np.ndarray, truncated: list[int]) -> None:
        for i, slot in enumerate(todo):
            job = jobs[slot.job]
            if job.vectors is None:
                job.vectors = np.empty((len(job.request.texts), out.shape[1]), dtype=np.float32)
            job.vectors[slot.row] = out[i]
            job.remaining -= 1
            if job.remaining == 0:
                self._reply_ok(job, truncated[slot.job])

    # ---- replies ------------------------------------------------------------------------
    def _reply_ok(self, job: Job, truncated: int) -> None:
        vectors = job.vectors
        if job.request.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        response = embed_response(job.request.id, vectors, dtype=job.request.dtype, backend=self.s.backend,
                                  model=self.info.model, truncated=truncated)
        self._send_done(done_msg(job.seq, None, response, tokens=sum(job.lengths), runs=self._take_runs()))

    def _reply_error(self, job: Job, err: EmbedError) -> None:
        self._send_done(done_msg(job.seq, err.code.value, error_response(job.request.id, err), runs=self._take_runs()))

    def _take_runs(self) -> list[list[float]]:
        """The passes run since the last done header (each is reported once)."""
        runs, self._runs = self._runs, []
        return runs

    def _send_done(self, parts: list[bytes]) -> None:
        self._outbox.extend(parts)

    def _flush(self) -> None:
        """Send every finished answer as one message [header1, answer1, header2, answer2, ...]."""
        out = self._outbox
        if not out:
            return
        self._outbox = []
        last = len(out) - 1
        for i, part in enumerate(out):  # plain sends: pyzmq's send_multipart costs ~5x more per part
            self.sock.send(part, zmq.SNDMORE if i < last else 0)
