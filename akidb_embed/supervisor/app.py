"""The supervisor: owns the client and worker sockets, runs the event loop, answers every request."""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

from akidb_embed import __version__
from akidb_embed.protocol.errors import (
    BadRequest, EmbedError, ErrorCode, InternalError, PoisonInput, ShuttingDown, Timeout, UnknownBackend,
)
from akidb_embed.protocol.messages import (
    ControlRequest, EmbedRequest, QueryRequest, RequestError, WorkerMsg, done_stats, embed_job, error_response,
    ok_response, parse_header, parse_request, worker_header,
)
from akidb_embed.supervisor.config import Config, ConfigError
from akidb_embed.supervisor.events import BatchRun, Events, RequestAnswered
from akidb_embed.supervisor.fronts import Fronts
from akidb_embed.supervisor.pending import DeadlineHeap, Pending, Quarantine
from akidb_embed.supervisor.pool import BackendPool, BState
from akidb_embed.supervisor.process import WorkerProcess, WState, describe_exit

log = logging.getLogger(__name__)

TICK_S = 0.2             # housekeeping period: liveness, draining, memory (scheduled restarts are exact)
MAX_MESSAGE_BYTES = 64 * 2**20
COALESCE_PENDING = 16    # with at least this many requests pending ...
COALESCE_S = 0.002       # ... wait this long before polling, to handle frames in bulk
METRICS_REFRESH_S = 1.0  # how old the gauges served by the [metrics] listener may be


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = _make_metrics(config)   # first: it may refuse the config
        self.ctx = zmq.Context()
        self._rundir = Path(tempfile.mkdtemp(prefix="akidb-embed-"))
        self.worker_endpoint = f"ipc://{self._rundir / 'workers.sock'}"
        self.quarantine = Quarantine()
        self.events = Events()
        if self.metrics is not None:
            self.events.subscribe(self.metrics)
        self.metrics_address: tuple[str, int] | None = None
        self._metrics_refresh_at = 0.0
        self.pools = {name: BackendPool(cfg, self) for name, cfg in config.backends.items()}
        self.fronts = Fronts(config)   # [http] / [grpc] front processes (hooks: run, _loop tick, _drain, finally)
        self.deadlines = DeadlineHeap()
        self.pending: dict[int, Pending] = {}
        self._seq = 0
        self._by_fd: dict[int, WorkerProcess] = {}
        self._wid_pool: dict[str, BackendPool] = {}
        self._exiting: list[tuple[WorkerProcess, float]] = []   # lifeline closed, exit code not collected yet
        self.poller = zmq.Poller()
        self.accepting = True
        self.started = time.monotonic()
        self._stop_requested = False

    # ---- sockets ------------------------------------------------------------------------------
    def _bind(self) -> None:
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.front.setsockopt(zmq.RCVHWM, 100_000)
        self.front.setsockopt(zmq.SNDHWM, 100_000)
        endpoint = self.config.endpoint
        try:
            if endpoint.startswith("ipc://"):
                path = Path(endpoint[len("ipc://"):])
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.exists():
                    # libzmq unlinks an existing ipc path on bind: check first, or we steal a live server's socket
                    if _ipc_in_use(path):
                        raise ConfigError(f"{self.config.source}: server.endpoint = {endpoint!r} is in use by "
                                          "another running server")
                    path.unlink()  # a stale socket file left by a killed supervisor
            self.front.bind(endpoint)
        except (ConfigError, zmq.ZMQError, OSError) as exc:
            self.front.close(0)
            self.ctx.term()
            shutil.rmtree(self._rundir, ignore_errors=True)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{self.config.source}: cannot listen on server.endpoint = {endpoint!r}: {exc}") from exc
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.RCVHWM, 100_000)
        self.back.setsockopt(zmq.SNDHWM, 100_000)
        self.back.bind(self.worker_endpoint)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)

    def watch(self, w: WorkerProcess) -> None:
        fd = w.lifeline_fd()
        self._by_fd[fd] = w
        self._wid_pool[w.wid] = self.pools[w.cfg.name]
        self.poller.register(fd, zmq.POLLIN)

    def unwatch(self, w: WorkerProcess) -> None:
        if w.lifeline is not None:
            fd = w.lifeline_fd()
            self._by_fd.pop(fd, None)
            self.poller.unregister(fd)
            w.close_lifeline()
        self._wid_pool.pop(w.wid, None)

    def send_jobs(self, w: WorkerProcess, jobs: list[Pending]) -> None:
        """All jobs for one worker as one message: [wid, header1, frame1, header2, frame2, ...].

        One message per pump instead of one per request: each ZeroMQ message costs I/O-thread
        wake-ups and syscalls on both sides, which dominate the supervisor's CPU per request.
        Plain sends: pyzmq's send_multipart costs ~5x more per part.
        """
        back = self.back
        back.send(w.wid.encode(), zmq.SNDMORE)
        last = len(jobs) - 1
        for i, p in enumerate(jobs):
            header, frame = embed_job(p.seq, p.deadline, p.frame)
            back.send(header, zmq.SNDMORE)
            back.send(frame, zmq.SNDMORE if i < last else 0)

    def send_stop(self, w: WorkerProcess) -> None:
        self.back.send_multipart([w.wid.encode(), worker_header(WorkerMsg.STOP)])

    def _reply(self, route: list[bytes], frame: bytes) -> None:
        try:
            for part in route:
                self.front.send(part, zmq.SNDMORE | zmq.NOBLOCK)
            self.front.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # client gone or its queue full: nothing else to do
            log.debug("reply dropped: %s", exc)

    def answer_error(self, p: Pending, err: EmbedError) -> None:
        if p.answered:
            return
        p.answered = True
        self.pending.pop(p.seq, None)
        self._reply(p.route, error_response(p.rid, err))
        self._answered(p, err.code.value, None)

    def _answered(self, p: Pending, code: str | None, tokens: int | None) -> None:
        """Events hook at every answer of an accepted request (errors here, results in _on_done)."""
        now = time.monotonic()
        first = p.handed_first or now
        run = now - p.handed_last if p.handed_last else 0.0
        self.events.emit(RequestAnswered(p.backend, code, len(p.texts), tokens, first - p.arrived, run,
                                         now - p.arrived))

    def _refused(self, req: Any, err: EmbedError) -> None:
        """Events hook for an embed request answered at once, before it was accepted (or unparseable)."""
        if req is None or isinstance(req, EmbedRequest):
            backend = "" if req is None or err.code is ErrorCode.UNKNOWN_BACKEND else (
                req.backend or self.config.default_backend)
            texts = len(req.texts) if req is not None else 0
            self.events.emit(RequestAnswered(backend, err.code.value, texts, None, 0.0, 0.0, 0.0))

    # ---- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain and stop. Returns the process exit code."""
        self._bind()
        self._serve_metrics()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        log.info("supervisor listening: endpoint=%s backends=%s config=%s pid=%d", self.config.endpoint,
                 ",".join(self.pools), self.config.source, os.getpid())
        try:
            for pool in self.pools.values():
                pool.start()
            self.fronts.start()        # fronts hook: start
            self._loop()
            self._drain()
        finally:
            signal.set_wakeup_fd(-1)
            for s, handler in old.items():
                signal.signal(s, handler)
            self.fronts.shutdown()     # fronts hook: shutdown (before the workers and our socket go)
            self._shutdown_workers()
            self._close()
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_requested = True

    def _loop(self, until: float | None = None) -> None:
        next_tick = time.monotonic()
        while not self._stop_requested if until is None else (time.monotonic() < until and self._busy()):
            now = time.monotonic()
            next_tick = min([next_tick] + [t for pool in self.pools.values() for t in pool.respawn_at])
            timeout = max(0.0, next_tick - now)
            nd = self.deadlines.next_deadline()
            if nd is not None:
                timeout = min(timeout, max(0.0, nd - time.time()))
            if self._exiting:
                timeout = min(timeout, 0.005)
            if len(self.pending) >= COALESCE_PENDING and timeout > 0:
                # Busy: let frames gather for a moment so one wake-up handles many (each costs ~100 us
                # of CPU); negligible next to the queueing delay such a backlog already implies.
                time.sleep(min(timeout, COALESCE_S))
            # whole milliseconds, rounded up: zmq truncates a float timeout, and poll(0.7) would spin
            # (no sleep at all) through the last millisecond before every tick and deadline
            events = dict(self.poller.poll(math.ceil(timeout * 1000)))
            self._handle_events(events)
            if self._exiting:
                self._reap_exiting(time.monotonic())
            self._expire(time.time())
            if time.monotonic() >= next_tick:
                wall, now = time.time(), time.monotonic()
                for pool in self.pools.values():
                    pool.tick(now, wall)
                if self.metrics_address is not None and now >= self._metrics_refresh_at:
                    self._metrics_refresh_at = now + METRICS_REFRESH_S
                    self.metrics.refresh(self._op_status())   # the listener thread reads this snapshot
                self.fronts.tick(now)  # fronts hook: tick (restart a dead front)
                next_tick = now + TICK_S

    def _handle_events(self, events: dict[Any, int]) -> None:
        if self.back in events:
            self._drain_socket(self.back, self._on_worker_frames)
        if self.front in events:
            self._drain_socket(self.front, self._on_client_frames)
        for fd in [fd for fd in events if isinstance(fd, int)]:
            if fd == self._wake_r.fileno():
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif fd in self._by_fd:
                w = self._by_fd[fd]
                self._on_worker_exit(w)

    @staticmethod
    def _drain_socket(sock: zmq.Socket, handler: Any, limit: int = 1000) -> None:
        # ZMQ_EVENTS is a cheap getsockopt; ending the drain on zmq.Again would build an exception each time
        for _ in range(limit):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            handler(sock.recv_multipart(zmq.NOBLOCK))

    # ---- client side -----------------------------------------------------------------------------
    def _on_client_frames(self, frames: list[bytes]) -> None:
        # DEALER clients send [identity, frame]; REQ clients add an empty delimiter.
        if len(frames) == 3 and frames[1] == b"":
            route, body = frames[:2], frames[2]
        elif len(frames) == 2:
            route, body = frames[:1], frames[1]
        else:
            # keep a REQ client's empty delimiter in the reply envelope, or its socket drops the answer
            route = frames[:2] if len(frames) > 3 and frames[1] == b"" else frames[:1]
            got = len(frames) - len(route)
            log.warning("bad request: %d frames from a client (expected one)", got)
            self._reply(route, error_response(None, BadRequest(
                f"expected one msgpack frame per request, got {got}")))
            return
        req = None
        try:
            req = parse_request(body)
            self._dispatch(route, body, req)
        except RequestError as exc:
            log.warning("bad request: %s", exc.message)
            self._reply(route, error_response(exc.request_id, exc))
            self._refused(None, exc)
        except EmbedError as exc:
            self._reply(route, error_response(getattr(req, "id", None), exc))
            self._refused(req, exc)
        except Exception as exc:  # a bug must cost one request, never the supervisor
            log.exception("internal error while handling a request")
            self._reply(route, error_response(None, InternalError(f"{type(exc).__name__}: {exc}")))

    def _dispatch(self, route: list[bytes], body: bytes, req: Any) -> None:
        if isinstance(req, EmbedRequest):
            self._submit(route, body, req)
        elif isinstance(req, QueryRequest):
            self._reply(route, ok_response(req.id, **getattr(self, f"_op_{req.op}")()))
        elif isinstance(req, ControlRequest):
            self._reply(route, ok_response(req.id, **self._control(req)))

    def _submit(self, route: list[bytes], body: bytes, req: EmbedRequest) -> None:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down; retry on another instance or after restart")
        name = req.backend or self.config.default_backend
        pool = self.pools.get(name)
        if pool is None:
            raise UnknownBackend(f"no backend named {name!r}; configured: {', '.join(self.pools)}")
        reason = self.quarantine.check(req.texts)
        if reason:
            raise PoisonInput(reason)
        timeout = (req.timeout_ms / 1000.0 if req.timeout_ms else
                   pool.cfg.timeout_s or pool.cfg.policy.request_timeout_s)
        self._seq += 1
        p = Pending(seq=self._seq, route=route, rid=req.id, frame=body, texts=req.texts, backend=name,
                    deadline=time.time() + timeout, arrived=time.monotonic())
        pool.submit(p)   # raises OVERLOADED / BACKEND_UNAVAILABLE before anything is recorded
        self.pending[p.seq] = p
        self.deadlines.push(p)
        if len(self.deadlines) > 2 * len(self.pending) + 64:
            # answered entries leave the heap only from its top: behind one long-lived earlier deadline
            # they (and their request frames) would pile up; drop them all now and then (amortized O(1))
            self.deadlines.compact()

    def _expire(self, wall: float) -> None:
        for p in self.deadlines.pop_expired(wall):
            where = f"in worker {p.worker}" if p.worker and p.seq in self._worker_inflight(p) else "waiting in queue"
            log.warning("request timeout: backend=%s id=%r texts=%d %s", p.backend, p.rid, len(p.texts), where)
            self.answer_error(p, Timeout(f"no answer from backend {p.backend!r} within the deadline ({where})"))

    def _worker_inflight(self, p: Pending) -> dict[int, Pending]:
        pool = self.pools[p.backend]
        w = pool.workers.get(p.worker or "")
        return w.inflight if w else {}

    # ---- worker side -----------------------------------------------------------------------------
    def _on_worker_frames(self, frames: list[bytes]) -> None:
        ident = frames[0].decode(errors="replace")
        try:
            header = parse_header(frames[1])
        except Exception:
            log.error("malformed frame from worker %s dropped", ident)
            return
        kind = header.get("t")
        wid = ident[:-3] if ident.endswith("/hb") else ident
        pool = self._wid_pool.get(wid)
        w = pool.workers.get(wid) if pool else None
        if w is None:
            return  # a message from a worker already gone
        w.last_heartbeat = time.monotonic()
        try:
            if kind == WorkerMsg.DONE and len(frames) >= 3 and len(frames) % 2 == 1:
                self._on_done(pool, w, header, frames)
            elif kind == WorkerMsg.READY:
                info = header.get("info")
                pool.on_ready(w, info if isinstance(info, dict) else {})
            elif kind == WorkerMsg.FAIL:
                error = header.get("error")
                pool.on_load_failed(w, error if isinstance(error, dict) else {})
        except Exception:  # a bad frame must cost that frame, never the supervisor
            log.exception("frame %r from worker %s dropped: internal error while handling it", kind, ident)

    def _on_done(self, pool: BackendPool, w: WorkerProcess, first: dict[str, Any], frames: list[bytes]) -> None:
        """[wid, header1, answer1, header2, answer2, ...]: forward each answer as is, then dispatch once."""
        for i in range(1, len(frames), 2):
            try:
                header = first if i == 1 else parse_header(frames[i])
            except Exception:
                log.error("malformed done header from worker %s dropped", w.wid)
                continue
            seq = header.get("seq")
            p = pool.on_done(w, seq, pump=False) if type(seq) is int else None
            tokens, runs = done_stats(header)
            for texts, run_tokens, seconds in runs:   # events hook: forward passes the worker reported
                self.events.emit(BatchRun(pool.cfg.name, w.wid, texts, run_tokens, seconds))
            if p is not None and not p.answered:
                p.answered = True
                self.pending.pop(p.seq, None)
                self._reply(p.route, frames[i + 1])
                code = header.get("code")
                self._answered(p, code if isinstance(code, str) else None, tokens)   # events hook
        pool.pump()

    def _on_worker_exit(self, w: WorkerProcess) -> None:
        """Its lifeline closed: collect the exit code, without blocking the loop (it serves every backend)."""
        code = w.reap(timeout=0.005)
        if code is None:  # not reaped yet (the fd closes a moment before), or it closed the fd and lives on
            fd = w.lifeline_fd()
            self._by_fd.pop(fd, None)
            self.poller.unregister(fd)
            w.close_lifeline()
            self._exiting.append((w, time.monotonic()))
            return
        self.pools[w.cfg.name].on_exit(w, code)

    def _reap_exiting(self, now: float) -> None:
        for item in list(self._exiting):
            w, since = item
            code = w.proc.poll()
            if code is None:
                if now - since > 2.0:  # lifeline closed but the process lives on: end it
                    w.signal(signal.SIGKILL)
                continue
            self._exiting.remove(item)
            self.pools[w.cfg.name].on_exit(w, code)

    # ---- operations -------------------------------------------------------------------------------
    def _op_info(self) -> dict[str, Any]:
        backends = {}
        for name, pool in self.pools.items():
            info = pool.model_info or {}
            backends[name] = {"kind": pool.cfg.kind, "model": info.get("model", pool.cfg.model),
                              "dim": info.get("dim"), "max_tokens": info.get("max_tokens"),
                              "state": pool.state.value, "replicas": pool.cfg.replicas,
                              "extra": info.get("extra", {})}
        return {"version": __version__, "protocol": 1, "default_backend": self.config.default_backend,
                "backends": backends}

    def _op_health(self) -> dict[str, Any]:
        states = {name: pool.state.value for name, pool in self.pools.items()}
        serving = [s for s in states.values() if s in (BState.READY.value, BState.DEGRADED.value)]
        status = "ok" if all(s == BState.READY.value for s in states.values()) else (
            "degraded" if serving else "unavailable")
        return {"status": status, "backends": states}

    def _op_status(self) -> dict[str, Any]:
        metrics = "%s:%d" % self.metrics_address if self.metrics_address else None  # noqa: UP031
        me = psutil.Process()
        cpu = me.cpu_times()
        return {"supervisor": {"pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3),
                               "rss_mb": round(me.memory_info().rss / 2**20, 1),
                               "cpu_s": round(cpu.user + cpu.system, 3), "pending": len(self.pending),
                               "quarantined": len(self.quarantine), "endpoint": self.config.endpoint,
                               "metrics_listen": metrics},
                "backends": {name: pool.status() for name, pool in self.pools.items()},
                "fronts": self.fronts.status()}

    def _op_metrics(self) -> dict[str, Any]:
        if self.metrics is None:
            raise BadRequest("metrics are off: prometheus_client is not installed (pip install 'akidb-embed[metrics]')")
        self.metrics.refresh(self._op_status())
        return {"text": self.metrics.exposition()}

    def _serve_metrics(self) -> None:
        """Start the Prometheus listener of [metrics] listen, if set (a daemon thread)."""
        if self.config.metrics_listen is None or self.metrics is None:
            return
        self.metrics.refresh(self._op_status())
        try:
            self.metrics_address = self.metrics.serve(self.config.metrics_listen)
        except OSError as exc:
            self._close()
            raise ConfigError(f"{self.config.source}: cannot listen on metrics.listen = "
                              f"{self.config.metrics_listen!r}: {exc}") from exc
        self._metrics_refresh_at = time.monotonic() + METRICS_REFRESH_S

    def _control(self, req: ControlRequest) -> dict[str, Any]:
        pool = self.pools.get(req.backend)
        if pool is None:
            raise UnknownBackend(f"no backend named {req.backend!r}; configured: {', '.join(self.pools)}")
        log.info("operator %s: backend=%s", req.op, req.backend)
        {"restart": pool.restart, "stop": pool.stop, "start": pool.start_op}[req.op]()
        return {"backend": req.backend, "state": pool.state.value}

    # ---- shutdown ----------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self.pending)

    def _drain(self) -> None:
        """Stop accepting; let in-flight requests finish for up to drain_timeout_s; answer the rest."""
        self.accepting = False
        self.fronts.begin_stop()       # fronts hook: drain (they stop accepting, finish in-flight calls)
        log.info("supervisor draining: pending=%d timeout=%.1fs", len(self.pending), self.config.drain_timeout_s)
        self._stop_requested = False
        self._loop(until=time.monotonic() + self.config.drain_timeout_s)
        for p in list(self.pending.values()):
            self.answer_error(p, ShuttingDown("the server shut down before this request finished"))

    def _shutdown_workers(self) -> None:
        """STOP each worker, then SIGTERM, then SIGKILL whatever is left; nothing outlives us."""
        workers = [w for pool in self.pools.values() for w in pool.workers.values() if w.proc is not None]
        for w in workers:
            if w.state == WState.READY:
                self.send_stop(w)
            else:
                w.signal(signal.SIGTERM)
        grace = max(p.cfg.policy.stop_timeout_s for p in self.pools.values())
        for sig, wait in ((None, grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            alive = [w for w in workers if w.proc.poll() is None]
            for w in alive:
                if sig is not None:
                    w.signal(sig)
            end = time.monotonic() + wait
            for w in alive:
                try:
                    w.proc.wait(timeout=max(0.01, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for w in workers:
            log.info("worker exit: backend=%s wid=%s pid=%s reason=shutdown (%s)", w.cfg.name, w.wid, w.pid,
                     describe_exit(w.proc.poll()))
            w.close_lifeline()

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.front.close(0)
        self.back.close(0)
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        if self.config.endpoint.startswith("ipc://"):
            Path(self.config.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        shutil.rmtree(self._rundir, ignore_errors=True)
        log.info("supervisor stopped")


def _make_metrics(config: Config) -> Any:
    """The Prometheus registry, or None when prometheus_client is missing (an error if [metrics] listen is set)."""
    try:
        from akidb_embed.supervisor.metrics import Metrics
    except ImportError as exc:
        if config.metrics_listen is not None:
            raise ConfigError(f"{config.source}: metrics.listen needs prometheus_client: "
                              f"pip install 'akidb-embed[metrics]' ({exc})") from exc
        return None
    return Metrics()


def _ipc_in_use(path: Path) -> bool:
    """True when another live process listens on this ipc path (so we must not steal it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
