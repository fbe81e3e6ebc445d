"""The worker process: handshake, then receive jobs, batch them, embed, reply; exit on stop."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

from akidb_embed.protocol.errors import BackendUnavailable, EmbedError, InternalError, Timeout
from akidb_embed.protocol.messages import (
    WORKER_LIMITS, EmbedRequest, WorkerMsg, done_msg, embed_response, error_response, parse_header, parse_request,
    worker_header,
)
from akidb_embed.workers.backends import Backend, ModelInfo, create_backend
from akidb_embed.workers.batching import Slot, plan_groups
from akidb_embed.workers.lifeline import Heartbeat
from akidb_embed.workers.request_options import ModelLimits

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    backend: str                      # the configured backend name (what clients ask for)
    kind: str                         # backend kind: mock, onnx, ...
    model: str
    wid: str                          # worker id (its ZeroMQ identity unless the lifeline gave one)
    endpoint: str                     # the supervisor's worker socket
    options: dict[str, Any] = field(default_factory=dict)
    heartbeat_s: float = 0.5
    max_batch_size: int = 8
    max_batch_tokens: int = 4096
    identity: bytes | None = None     # issue 11: ZeroMQ identity from the lifeline (else the wid)


@dataclass
class Job:
    seq: int
    deadline: float                   # monotonic: receipt + the budget the supervisor gave
    request: EmbedRequest
    vectors: np.ndarray | None = None
    remaining: int = 0
    failed: bool = False
    texts: list[str] = field(default_factory=list)   # the request's texts with its prompt in front
    dimensions: int | None = None                    # keep this many leading dims (None: all)
    tokens: list[int] = field(default_factory=list)  # per text: untruncated token count


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.s = settings
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        identity = settings.identity or settings.wid.encode()  # issue 11 hook
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(settings.endpoint)
        self.heartbeat = Heartbeat(self.ctx, settings.endpoint, settings.wid, settings.heartbeat_s, identity)
        self.backend: Backend | None = None
        self.info: ModelInfo | None = None
        self.limits: ModelLimits | None = None
        self.stopping = False
        self._outbox: list[tuple[int, str | None, bytes, int | None]] = []   # (seq, code, answer, tokens)
        self._passes: list[list[float]] = []   # [texts, tokens, seconds] per forward pass, sent with answers
        self._slot_tokens: dict[Slot, int] = {}   # tokens of each text of the jobs being processed

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
            self.limits = ModelLimits.from_info(self.info, self.s.options)
            self.info = replace(self.info, default_prompt_name=self.limits.default_prompt_name,
                                matryoshka_dims=self.limits.matryoshka_dims)   # what requests get, for info
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
            request = parse_request(frames[1], WORKER_LIMITS)  # issue 11: the supervisor applied the limits
            if not isinstance(request, EmbedRequest):
                raise ValueError("job is not an embed request")
            budget_s = float(header["budget_ms"]) / 1000.0   # relative: no clock shared with the supervisor
            return Job(seq=int(header["seq"]), deadline=time.monotonic() + budget_s, request=request)
        except Exception as exc:  # a bad frame is logged and dropped; the supervisor's deadline answers it
            log.error("worker %s dropped a malformed job: %s", self.s.wid, exc)
            return None

    def _process(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.deadline <= now:
                self._reply_error(job, Timeout("deadline passed before the worker started the request"))
            elif self._prepare(job):
                live.append(job)
        slots = [(Slot(j, r), text) for j, job in enumerate(live) for r, text in enumerate(job.texts)]
        if not slots:
            return
        counts = self._token_counts([text for _, text in slots])
        limit = self.info.max_tokens
        self._slot_tokens = {}
        for (slot, _), count in zip(slots, counts):
            live[slot.job].tokens.append(count)
            self._slot_tokens[slot] = min(count, limit)
        for job in live:
            try:
                self.limits.refuse_too_long(job.request, job.tokens)
            except EmbedError as err:
                job.failed = True
                self._reply_error(job, err)
            job.remaining = len(job.texts)
        for side in ("end", "start"):  # a forward pass cuts all its texts at the same end
            todo = [(slot, min(n, limit)) for (slot, _), n in zip(slots, counts)
                    if not live[slot.job].failed and (live[slot.job].request.truncate == "start") == (side == "start")]
            for group in plan_groups(todo, self.s.max_batch_size, self.s.max_batch_tokens):
                self._run_group(live, group, side)
                self._flush()   # the requests this pass finished are answered now, together

    def _prepare(self, job: Job) -> bool:
        """Apply the request's prompt and check its dimensions; False (answered) when the model can't."""
        try:
            prompt = self.limits.prompt(job.request)
            job.dimensions = self.limits.dimensions(job.request)
        except EmbedError as err:
            self._reply_error(job, err)
            return False
        job.texts = [prompt + t for t in job.request.texts] if prompt else list(job.request.texts)
        return True

    def _token_counts(self, texts: list[str]) -> list[int]:
        try:
            return self.backend.token_counts(texts)
        except Exception:  # fall back to the generic estimate, let embed report errors
            log.exception("worker %s: token_counts failed; using estimates", self.s.wid)
            return Backend.token_counts(self.backend, texts)

    def _run_group(self, jobs: list[Job], group: list[Slot], side: str) -> None:
        now = time.monotonic()
        todo = [slot for slot in group if not jobs[slot.job].failed]
        for slot in todo:
            job = jobs[slot.job]
            if job.deadline <= now and not job.failed:
                job.failed = True
                self._reply_error(job, Timeout("deadline passed while the request waited in the worker"))
        todo = [slot for slot in todo if not jobs[slot.job].failed]
        if not todo:
            return
        self.heartbeat.running = sorted({jobs[s.job].seq for s in todo})   # what a hang would be blamed on
        started = time.perf_counter()
        try:
            out = self.backend.embed([jobs[s.job].texts[s.row] for s in todo], truncate=side)
        except Exception as exc:
            self._group_failed(jobs, todo, side, exc)
            return
        finally:
            self.heartbeat.running = []
        self._passes.append([len(todo), sum(self._slot_tokens.get(s, 0) for s in todo),
                             round(time.perf_counter() - started, 6)])
        self._store(jobs, todo, out.vectors)

    def _group_failed(self, jobs: list[Job], todo: list[Slot], side: str, exc: Exception) -> None:
        owners = sorted({s.job for s in todo})
        if len(owners) > 1:  # isolate: run each request's texts apart so one bad input fails alone
            for j in owners:
                self._run_group(jobs, [s for s in todo if s.job == j], side)
            return
        job = jobs[owners[0]]
        job.failed = True
        if isinstance(exc, EmbedError):
            err = exc
        else:
            log.exception("worker %s: embed failed", self.s.wid)
            err = InternalError(f"{self.s.kind} backend failed: {type(exc).__name__}: {exc}")
        self._reply_error(job, err)

    def _store(self, jobs: list[Job], todo: list[Slot], out: np.ndarray) -> None:
        for i, slot in enumerate(todo):
            job = jobs[slot.job]
            if job.vectors is None:
                width = job.dimensions or out.shape[1]
                job.vectors = np.empty((len(job.request.texts), width), dtype=np.float32)
            job.vectors[slot.row] = out[i, :job.vectors.shape[1]]
            job.remaining -= 1
            if job.remaining == 0:
                self._reply_ok(job)

    # ---- replies ------------------------------------------------------------------------
    def _reply_ok(self, job: Job) -> None:
        vectors = job.vectors
        if job.request.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        limit = self.info.max_tokens
        cut = [n > limit for n in job.tokens]
        response = embed_response(job.request.id, vectors, dtype=job.request.dtype, backend=self.s.backend,
                                  model=self.info.model, truncated=sum(cut),
                                  tokens=[min(n, limit) for n in job.tokens], truncated_rows=cut)
        self._outbox.append((job.seq, None, response, self._job_tokens(job)))

    def _reply_error(self, job: Job, err: EmbedError) -> None:
        self._outbox.append((job.seq, err.code.value, error_response(job.request.id, err),
                             self._job_tokens(job) or None))

    def _job_tokens(self, job: Job) -> int:
        """The tokens the model reads for this request (each text cut at max_tokens), for the done header."""
        limit = self.info.max_tokens if self.info is not None else 0
        return sum(min(n, limit) for n in job.tokens) if limit else sum(job.tokens)

    def _flush(self) -> None:
        """Send every finished answer as one message [header1, answer1, header2, answer2, ...]; the first
        header also carries the forward passes run since the last message."""
        out = self._outbox
        if not out:
            return
        self._outbox = []
        passes, self._passes = self._passes, []
        last = len(out) - 1
        for i, (seq, code, answer, tokens) in enumerate(out):
            header, answer = done_msg(seq, code, answer, tokens, passes if i == 0 else None)
            # plain sends: pyzmq's send_multipart costs ~5x more per part
            self.sock.send(header, zmq.SNDMORE)
            self.sock.send(answer, zmq.SNDMORE if i < last else 0)
