"""The supervisor: owns the client and worker sockets and runs the event loop (one thread).

Requests live in the request table (requests.py), which alone answers them; each backend's pool
(pool.py) runs its workers and its scheduler (scheduler.py) decides who runs what; what happens is
published on the events seam (events.py), which the log (eventlog.py) and metrics subscribe to.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, cast

import zmq

from akidb_embed.protocol.errors import (
    BadRequest, EmbedError, InternalError, Overloaded, PoisonInput, ShuttingDown, Timeout, UnknownBackend,
)
from akidb_embed.protocol.endpoint import default_endpoint
from akidb_embed.protocol.messages import (
    ControlRequest, EmbedRequest, PayloadTooLarge, QueryRequest, RequestError, WorkerMsg, clip, embed_job,
    error_response, ok_response, parse_header, parse_request, worker_header,
)
from akidb_embed.supervisor import ops
from akidb_embed.supervisor.auth import AuthError, Curve, check_exposure, user_id
from akidb_embed.supervisor.config import Config, ConfigError
from akidb_embed.supervisor.eventlog import log_event
from akidb_embed.supervisor.events import Events, WorkerExited
from akidb_embed.supervisor.fronts import Fronts
from akidb_embed.supervisor.pool import BackendPool
from akidb_embed.supervisor.process import WorkerProcess, WState, describe_exit
from akidb_embed.supervisor.quarantine import Quarantine
from akidb_embed.supervisor.jobs import Job
from akidb_embed.supervisor.logsafe import Throttled
from akidb_embed.supervisor.operators import OperatorGate
from akidb_embed.supervisor.peers import PeerLedger, split_envelope
from akidb_embed.supervisor.requests import RequestTable
from akidb_embed.workers.channel_id import HB_SUFFIX
from akidb_embed.supervisor.sockets import (
    UnsafePath, admin_socket_path, ensure_private_dir, prepare_ipc, private_umask,
)

log = logging.getLogger(__name__)

TICK_S = 0.2             # housekeeping period: liveness, draining, memory (scheduled restarts are exact)
MAX_MESSAGE_BYTES = 64 * 2**20
MAX_RUNNING_SEQS = 65536 # a heartbeat's list of running jobs is ignored past this length
COALESCE_PENDING = 16    # with at least this many requests pending ...
COALESCE_S = 0.002       # ... wait this long before polling, to handle frames in bulk
FAST_STOP_S = 1.0        # after a second signal: SIGTERM to every worker, SIGKILL after this long
METRICS_REFRESH_S = 1.0  # how old the gauges served by the [metrics] listener may be
# plain ints for the per-message calls: pyzmq's enum constants cost a Flag object per operation
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = _make_metrics(config)   # first: it may refuse the config
        self.ctx = zmq.Context()
        self._rundir = Path(tempfile.mkdtemp(prefix="akidb-embed-"))
        self.worker_endpoint = f"ipc://{self._rundir / 'workers.sock'}"
        self.events = Events()
        self.events.subscribe(log_event)
        if self.metrics is not None:
            self.events.subscribe(self.metrics)   # issue 12: counters and histograms from the events
        self.metrics_address: tuple[str, int] | None = None
        self._metrics_refresh_at = 0.0
        # issue 11: per-peer bounds; the table adds each request and releases it at its one answer point
        self.peers = PeerLedger(config.guard.peer_queue_share, config.guard.max_peer_bytes)
        self.table = RequestTable(self._reply, self.events, self.peers)
        self._warn = Throttled(log)  # issue 11: rate-limited warnings about peers
        self.gate = OperatorGate()   # issue 11: operator commands
        self.quarantine = Quarantine()
        self.pools = {name: BackendPool(cfg, self) for name, cfg in config.backends.items()}
        self.fronts = Fronts(config)   # issue 12: [http] / [grpc] front processes (hooks: run, tick, _drain, finally)
        self.fronts_endpoint = config.endpoint   # where they connect (set by _bind)
        self._by_fd: dict[int, WorkerProcess] = {}
        self._by_identity: dict[bytes, WorkerProcess] = {}   # issue 11: secret worker identities
        self._gone_identities: set[bytes] = set()            # recently gone: their late messages are expected
        self.curve: Curve | None = None
        self._exiting: list[tuple[WorkerProcess, float]] = []   # lifeline closed, exit code not collected yet
        self.poller = zmq.Poller()
        self.accepting = True
        self.started = time.monotonic()
        self._stop_requested = False
        self._force_stop = False      # a second signal during the drain: stop now

    # ---- sockets ------------------------------------------------------------------------------
    def _bind(self) -> None:
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.front.setsockopt(zmq.RCVHWM, 100_000)
        self.front.setsockopt(zmq.SNDHWM, self.config.guard.answer_hwm)  # issue 11: then Again, not silence
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        endpoint = self.config.endpoint
        try:
            check_exposure(endpoint, self.config.guard)   # issue 11: tcp beyond loopback needs CURVE
            if self.config.guard.curve_secret_key:        # issue 11: ZAP handler started before bind
                self.curve = Curve(self.ctx, self.config.guard)
                self.curve.secure(self.front)
            if endpoint.startswith("ipc://"):
                path = Path(endpoint[len("ipc://"):])
                prepare_ipc(path, endpoint == default_endpoint())  # issue 11: private directory
                if path.exists():
                    # libzmq unlinks an existing ipc path on bind: check first, or we steal a live server's socket
                    if _ipc_in_use(path):
                        raise ConfigError(f"{self.config.source}: server.endpoint = {endpoint!r} is in use by "
                                          "another running server")
                    path.unlink()  # a stale socket file left by a killed supervisor
            with private_umask():  # issue 11: the socket file is 0600 whatever the umask
                self.front.bind(endpoint)
                self._bind_fronts_endpoint()   # issue 12
            if endpoint.startswith("ipc://") and self.config.guard.socket_mode:
                os.chmod(endpoint[len("ipc://"):], self.config.guard.socket_mode)  # opened to a group on purpose
        except (UnsafePath, AuthError, ConfigError, zmq.ZMQError, OSError) as exc:
            self.front.close(0)
            if self.curve is not None:
                self.curve.stop()
            self.ctx.term()
            shutil.rmtree(self._rundir, ignore_errors=True)
            if isinstance(exc, (UnsafePath, AuthError)):
                raise ConfigError(f"{self.config.source}: server.endpoint = {endpoint!r}: {exc}") from exc
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{self.config.source}: cannot listen on server.endpoint = {endpoint!r}: {exc}") from exc
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.RCVHWM, 100_000)
        self.back.setsockopt(zmq.SNDHWM, 100_000)
        with private_umask():
            self.back.bind(self.worker_endpoint)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller.register(self.front, zmq.POLLIN)
        self._bind_admin()   # issue 11
        self.poller.register(self.admin, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)

    def _bind_fronts_endpoint(self) -> None:
        """issue 12: the fronts we start connect over ipc to a socket only our user can open: server.endpoint
        when it is ipc, else a second ipc endpoint of the same socket in our private run directory. A CURVE
        socket would ask the fronts for a key pair on ipc too: not supported (refused)."""
        self.fronts_endpoint = self.config.endpoint
        if not self.fronts or self.config.endpoint.startswith("ipc://"):
            return
        if self.curve is not None:
            raise ConfigError("[http] / [grpc] fronts need an ipc server.endpoint or a tcp one without CURVE; "
                              "run the front standalone (`akidb-embed http --endpoint ...`) against a CURVE endpoint")
        self.fronts_endpoint = f"ipc://{self._rundir / 'fronts.sock'}"
        self.front.bind(self.fronts_endpoint)

    def _bind_admin(self) -> None:
        """issue 11: the operator socket, in the private run directory (only its owner can open it)."""
        self.admin = self.ctx.socket(zmq.ROUTER)
        self.admin.setsockopt(zmq.LINGER, 0)
        self.admin.setsockopt(zmq.MAXMSGSIZE, 2**20)
        self._admin_path = admin_socket_path(self.config.endpoint)
        ensure_private_dir(self._admin_path.parent)
        if self._admin_path.exists() and not _ipc_in_use(self._admin_path):
            self._admin_path.unlink()
        with private_umask():
            self.admin.bind(f"ipc://{self._admin_path}")

    def watch(self, w: WorkerProcess) -> None:
        fd = w.lifeline_fd()
        self._by_fd[fd] = w
        self._by_identity[w.identity] = w   # issue 11: the only peers whose messages count
        self.poller.register(fd, zmq.POLLIN)

    def unwatch(self, w: WorkerProcess) -> None:
        if w.lifeline is not None:
            fd = w.lifeline_fd()
            self._by_fd.pop(fd, None)
            self.poller.unregister(fd)
            w.close_lifeline()
        self._by_identity.pop(w.identity, None)
        if len(self._gone_identities) > 1000:
            self._gone_identities.clear()
        self._gone_identities.update((w.identity, w.identity + HB_SUFFIX))

    def send_jobs(self, w: WorkerProcess, jobs: list[Job]) -> None:
        """All jobs for one worker as one message: [wid, header1, frame1, header2, frame2, ...].

        One message per pump instead of one per request: each ZeroMQ message costs I/O-thread
        wake-ups and syscalls on both sides, which dominate the supervisor's CPU per request.
        Plain sends: pyzmq's send_multipart costs ~5x more per part.
        """
        back = self.back
        back.send(w.identity, _SNDMORE)  # issue 11: route by the secret identity
        last = len(jobs) - 1
        now = time.monotonic()
        for i, p in enumerate(jobs):
            header, frame = embed_job(p.seq, p.budget_ms(now), p.frame)
            back.send(header, _SNDMORE)
            back.send(frame, _SNDMORE if i < last else 0)

    def send_stop(self, w: WorkerProcess) -> None:
        self.back.send_multipart([w.identity, worker_header(WorkerMsg.STOP)])

    def _reply(self, route: list[bytes], frame: bytes) -> None:
        try:
            for part in route:
                self.front.send(part, _SNDMORE | _NOBLOCK)
            self.front.send(frame, _NOBLOCK)
        except zmq.Again:  # issue 11: its queue is full (answer_hwm): it does not read its answers
            if self.peers.mark_stalled(route[0]):
                self._warn.warning("stalled", "answers dropped: a client does not read them (answer_hwm = %d)",
                                   self.config.guard.answer_hwm)
        except zmq.ZMQError as exc:  # client gone: nothing else to do
            log.debug("reply dropped: %s", exc)

    # ---- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain and stop. Returns the process exit code."""
        self._bind()
        self._serve_metrics()   # issue 12
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        log.info("supervisor listening: endpoint=%s backends=%s config=%s pid=%d", self.config.endpoint,
                 ",".join(self.pools), self.config.source, os.getpid())
        try:
            for pool in self.pools.values():
                pool.start()
            self.fronts.start(self.fronts_endpoint)   # fronts hook: start (they connect over our ipc socket)
            self._loop()
            self._drain()
        finally:
            signal.set_wakeup_fd(-1)
            for s, handler in old.items():
                signal.signal(s, handler)
            self.fronts.shutdown()     # fronts hook: shutdown (before the workers and our sockets go)
            self._shutdown_workers(fast=self._force_stop)
            self._close()
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.accepting:   # already draining: a second signal means "stop now"
            self._force_stop = True
        self._stop_requested = True

    def _loop(self, until: float | None = None) -> None:
        next_tick = time.monotonic()
        while (not self._stop_requested if until is None
               else (time.monotonic() < until and self._busy() and not self._force_stop)):
            now = time.monotonic()
            next_tick = min([next_tick] + [t for pool in self.pools.values() for t in pool.respawn_at])
            timeout = max(0.0, next_tick - now)
            nd = self.table.next_deadline()
            if nd is not None:
                timeout = min(timeout, max(0.0, nd - now))
            if self._exiting:
                timeout = min(timeout, 0.005)
            if len(self.table) >= COALESCE_PENDING and timeout > 0:
                # Busy: let client frames gather for a moment so one wake-up handles many (each costs
                # ~100 us of CPU); negligible next to the queueing delay such a backlog already implies.
                # A worker's message ends the wait at once: a worker that finished its pass waits for the next.
                self.back.poll(math.ceil(min(timeout, COALESCE_S) * 1000))
            # whole milliseconds, rounded up: zmq truncates a float timeout, and poll(0.7) would spin
            # (no sleep at all) through the last millisecond before every tick and deadline
            events = dict(self.poller.poll(math.ceil(timeout * 1000)))
            self._handle_events(events)
            if self._exiting:
                self._guarded("reaping exited workers", self._reap_exiting)
            self._guarded("expiring deadlines", self.table.expire, time.monotonic())
            if time.monotonic() >= next_tick:
                now = time.monotonic()
                for pool in self.pools.values():
                    self._guarded(f"housekeeping of backend {pool.cfg.name}", pool.tick, now)
                if self.metrics_address is not None and now >= self._metrics_refresh_at:
                    self._metrics_refresh_at = now + METRICS_REFRESH_S
                    self._guarded("refreshing the metrics gauges", self._refresh_metrics)
                self._guarded("supervising the fronts", self.fronts.tick, now)  # fronts hook: tick
                next_tick = now + TICK_S

    @staticmethod
    def _guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one housekeeping step; a bug in it costs that step, never the loop (and its requests)."""
        try:
            fn(*args)
        except Exception:
            log.exception("internal error while %s; the supervisor keeps serving", what)

    def _handle_events(self, events: dict[Any, int]) -> None:
        if self.back in events:
            self._read_all(self.back, self._on_worker_frames)
        if self.front in events:
            if self.curve is None:
                self._read_all(self.front, self._on_client_frames)
            else:  # issue 11: frames carry the ZAP User-Id
                self._read_all(self.front, self._on_curve_frames, copy=False)
        if self.admin in events:  # issue 11
            self._read_all(self.admin, self._on_admin_frames, limit=100)
        for fd in [fd for fd in events if isinstance(fd, int)]:
            if fd == self._wake_r.fileno():
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif fd in self._by_fd:
                self._guarded("handling a worker exit", self._on_worker_exit, self._by_fd[fd])

    @staticmethod
    def _read_all(sock: zmq.Socket[Any], handler: Callable[[list[Any]], None], limit: int = 1000,
                  copy: bool = True) -> None:
        # ZMQ_EVENTS is a cheap getsockopt; ending the drain on zmq.Again would build an exception each time
        for _ in range(limit):
            if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                return
            handler(sock.recv_multipart(_NOBLOCK, copy=copy))

    # ---- client side -----------------------------------------------------------------------------
    def _on_curve_frames(self, parts: list[Any]) -> None:
        """issue 11: a CURVE peer is an operator when its key (the ZAP User-Id) is in curve_admins."""
        assert self.curve is not None
        self._on_client_frames([p.bytes for p in parts], self.curve.ring.is_admin(user_id(parts[-1])))

    def _on_admin_frames(self, frames: list[bytes]) -> None:
        """issue 11: the private admin socket (owner only): queries and operator commands, no embed."""
        route, body, _ = split_envelope(frames)
        rid = None
        try:
            if body is None:
                raise BadRequest("expected one msgpack frame per request")
            req = parse_request(body, self.config.guard.limits)
            rid = req.id
            if isinstance(req, EmbedRequest):
                raise RequestError("the admin socket takes info, health, status, restart, stop and start; "
                                   "send embed requests to the server endpoint", req.id)
            answer = (ok_response(req.id, **self._control(req, operator=True)) if isinstance(req, ControlRequest)
                      else ok_response(req.id, **self._query(req.op)))
        except EmbedError as exc:
            answer = error_response(getattr(exc, "request_id", rid), exc)
        except Exception as exc:  # a bug must cost one request, never the supervisor
            log.exception("internal error while handling an admin request")
            answer = error_response(rid, InternalError(f"{type(exc).__name__}: {exc}"))
        try:
            self.admin.send_multipart([*route, answer], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _on_client_frames(self, frames: list[bytes], operator: bool = False) -> None:
        # DEALER clients send [identity, frame]; REQ clients add an empty delimiter (and REQ_CORRELATE an id)
        route, body, got = split_envelope(frames)  # issue 11: envelopes
        if body is None:
            self._warn.warning("frames", "bad request: %d frames from a client (expected one)", got)
            self.table.refuse(route, None, BadRequest(f"expected one msgpack frame per request, got {got}"))
            return
        req = None
        try:
            req = parse_request(body, self.config.guard.limits)  # issue 11: limits
            self._dispatch(route, body, req, operator)
        except (RequestError, PayloadTooLarge) as exc:  # issue 11: clipped, rate-limited warning
            self._warn.warning(exc.code.value, "bad request: %s", clip(exc.message, 300))
            self.table.refuse(route, exc.request_id, exc)
        except EmbedError as exc:
            self._refuse(route, req, exc)
        except Exception as exc:  # a bug must cost one request, never the supervisor
            log.exception("internal error while handling a request")
            self._refuse(route, req, InternalError(f"{type(exc).__name__}: {exc}"))

    def _refuse(self, route: list[bytes], req: Any, err: EmbedError) -> None:
        if isinstance(req, EmbedRequest):   # events.py: backend "" when the request named no backend of ours
            backend = "" if isinstance(err, UnknownBackend) else req.backend or self.config.default_backend
            self.table.refuse(route, req.id, err, backend, len(req.texts))
        else:
            self._reply(route, error_response(getattr(req, "id", None), err))

    def _dispatch(self, route: list[bytes], body: bytes, req: Any, operator: bool = False) -> None:
        if isinstance(req, EmbedRequest):
            self._submit(route, body, req)
        elif isinstance(req, QueryRequest):
            self._reply(route, ok_response(req.id, **self._query(req.op)))
        elif isinstance(req, ControlRequest):
            self._reply(route, ok_response(req.id, **self._control(req, operator)))

    def _control(self, req: ControlRequest, operator: bool) -> dict[str, Any]:
        """issue 11: UNAUTHORIZED unless an operator; coalesced; at most replicas + 1 processes."""
        pool = self.pools.get(req.backend)
        if pool is None or self.gate.check(req.op, req.backend, pool, operator):
            return ops.control(self.pools, req)   # an unknown backend: ops answers UNKNOWN_BACKEND
        return {"backend": req.backend, "state": pool.state.value}

    def _query(self, op: str) -> dict[str, Any]:
        if op == "info":
            return ops.info(self.pools, self.config.default_backend)
        if op == "health":
            return ops.health(self.pools)
        if op == "metrics":   # read-only, like status: any client may ask (issue 12)
            return self._op_metrics()
        return self._status()

    def _status(self) -> dict[str, Any]:
        answer = ops.status(self.pools, started=self.started, pending=len(self.table),
                            quarantined=len(self.quarantine), endpoint=self.config.endpoint)
        answer["supervisor"]["metrics_listen"] = (
            "%s:%d" % self.metrics_address if self.metrics_address else None)  # noqa: UP031
        answer["fronts"] = self.fronts.status()
        return answer

    # ---- metrics (issue 12) ----------------------------------------------------------------------
    def _refresh_metrics(self) -> None:
        assert self.metrics is not None
        self.metrics.refresh(self._status())   # the listener thread reads this snapshot

    def _op_metrics(self) -> dict[str, Any]:
        if self.metrics is None:
            raise BadRequest("metrics are off: prometheus_client is not installed (pip install 'akidb-embed[metrics]')")
        self._refresh_metrics()
        return {"text": self.metrics.exposition()}

    def _serve_metrics(self) -> None:
        """Start the Prometheus listener of [metrics] listen, if set (a daemon thread)."""
        if self.config.metrics_listen is None or self.metrics is None:
            return
        self._refresh_metrics()
        try:
            self.metrics_address = self.metrics.serve(self.config.metrics_listen)
        except OSError as exc:
            self._close()
            raise ConfigError(f"{self.config.source}: cannot listen on metrics.listen = "
                              f"{self.config.metrics_listen!r}: {exc}") from exc
        self._metrics_refresh_at = time.monotonic() + METRICS_REFRESH_S

    def _submit(self, route: list[bytes], body: bytes, req: EmbedRequest) -> None:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down; retry on another instance or after restart")
        name = req.backend or self.config.default_backend
        pool = self.pools.get(name)
        if pool is None:
            raise UnknownBackend(f"no backend named {clip(name)}; configured: {', '.join(self.pools)}")
        if self.peers.stalled(route[0]):  # issue 11: a peer that does not read gets no new work
            raise Overloaded("answers to this connection are not being read (answer_hwm reached); read them")
        # issue 11: duplicate in-flight id, per-peer share of max_queue and bytes (released by table.answer)
        self.peers.admit(route[0], req.id, name, pool.cfg.max_queue, len(body),
                         pool.cfg.max_inflight * pool.cfg.replicas)
        reason = self.quarantine.check(req.texts)
        if reason:
            raise PoisonInput(reason)
        timeout = (req.timeout_ms / 1000.0 if req.timeout_ms else
                   pool.cfg.timeout_s or pool.cfg.policy.request_timeout_s)
        if req.deadline_unix_ms is not None:
            # the caller's own deadline: it stops waiting then, however long the frame sat in queues on
            # the way (while no server was there, or behind a stalled loop); nothing is computed for nobody
            left = req.deadline_unix_ms / 1000.0 - time.time()
            if left <= 0:
                raise Timeout("the request's deadline_unix_ms had passed when the server received it")
            timeout = min(timeout, left)
        p = self.table.create(route, req.id, body, req.texts, name, timeout, time.monotonic())
        pool.admit(p, req.priority)   # raises OVERLOADED / BACKEND_UNAVAILABLE before anything is recorded
        self.table.add(p)
        pool.pump()

    # ---- worker side -----------------------------------------------------------------------------
    def _on_worker_frames(self, frames: list[bytes]) -> None:
        # issue 11: a worker is known by its secret identity only; anything else is dropped, logged once
        sender = frames[0]
        w = self._by_identity.get(sender[:-len(HB_SUFFIX)] if sender.endswith(HB_SUFFIX) else sender)
        if w is None or len(frames) < 2:
            if sender not in self._gone_identities:
                self._warn.warning("worker channel", "message from an unknown peer on the worker channel dropped "
                                   "(identity %s)", clip(sender[:64]))
            return
        ident = w.wid
        try:
            header = parse_header(frames[1])
        except Exception:
            log.error("malformed frame from worker %s dropped", ident)
            return
        kind = header.get("t")
        pool = self.pools[w.cfg.name]
        if pool.workers.get(w.wid) is not w:
            return  # a message from a worker already gone
        w.last_heartbeat = time.monotonic()
        try:
            if kind == WorkerMsg.HEARTBEAT:
                running = header.get("running")
                if isinstance(running, list) and len(running) <= MAX_RUNNING_SEQS:
                    w.running = [s for s in running if type(s) is int]
            elif kind == WorkerMsg.DONE and len(frames) >= 3 and len(frames) % 2 == 1:
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
        """[wid, header1, answer1, header2, answer2, ...]: the worker's next pass first (it waits for it),
        then each answer forwarded as is (a part's answer waits for its siblings)."""
        done = []
        for i in range(1, len(frames), 2):
            try:
                header = first if i == 1 else parse_header(frames[i])
            except Exception:
                log.error("malformed done header from worker %s dropped", w.wid)
                continue
            seq = header.get("seq")
            job = pool.job_done(w, seq) if type(seq) is int else None
            if job is not None and not job.probe:
                done.append((job, frames[i + 1], header.get("code"), header.get("tokens")))
        pool.pump()
        answered = self.table.job_answered
        for job, frame, code, tokens in done:
            answered(job.req, job.index, frame, code if isinstance(code, str) else None,
                     tokens if type(tokens) is int else None)
        if "passes" in first:
            pool.batches_run(w, first["passes"])

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

    def _reap_exiting(self) -> None:
        now = time.monotonic()
        for item in list(self._exiting):
            w, since = item
            code = w.exit_code()
            if code is None:
                if now - since > 2.0:  # lifeline closed but the process lives on: end it
                    w.signal(signal.SIGKILL)
                continue
            self._exiting.remove(item)
            self.pools[w.cfg.name].on_exit(w, code)

    # ---- shutdown ----------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self.table)

    def _drain(self) -> None:
        """Stop accepting; let in-flight requests finish for up to drain_timeout_s; answer the rest.
        A second SIGTERM/SIGINT ends the wait at once."""
        self.accepting = False
        self.fronts.begin_stop()       # fronts hook: drain (they stop accepting, finish in-flight calls)
        log.info("supervisor draining: pending=%d timeout=%.1fs", len(self.table), self.config.drain_timeout_s)
        self._stop_requested = False
        if not self._force_stop:
            self._loop(until=time.monotonic() + self.config.drain_timeout_s)
        if self._force_stop:
            log.warning("second stop signal: stopping now, pending=%d", len(self.table))
        self.table.fail_all(ShuttingDown("the server shut down before this request finished"))

    def _shutdown_workers(self, fast: bool = False) -> None:
        """STOP each worker, then SIGTERM, then SIGKILL whatever is left; nothing outlives us.
        ``fast``: SIGTERM at once, SIGKILL after FAST_STOP_S."""
        workers = [w for pool in self.pools.values() for w in pool.workers.values() if w.proc is not None]
        for w in workers:
            if w.state == WState.READY and not fast:
                self.send_stop(w)
            else:
                w.signal(signal.SIGTERM)
                w.signal(signal.SIGCONT)
        grace = 0.0 if fast else max(p.cfg.policy.stop_timeout_s for p in self.pools.values())
        stages = ((None, FAST_STOP_S), (signal.SIGKILL, 5.0)) if fast else (
            (None, grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0))
        for sig, wait in stages:
            alive = [w for w in workers if w.exit_code() is None]
            for w in alive:
                if sig is not None:
                    w.signal(sig)
            end = time.monotonic() + wait
            for w in alive:
                w.wait_exit(max(0.01, end - time.monotonic()))
        for w in workers:
            reason = f"shutdown ({describe_exit(w.exit_code())})"
            log.info("worker exit: backend=%s wid=%s pid=%s reason=%s", w.cfg.name, w.wid, w.pid, reason)
            self.events.emit(WorkerExited(w.cfg.name, w.wid, w.pid, reason, "planned", w.uptime()))
            w.close_lifeline()

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.front.close(0)
        self.back.close(0)
        self.admin.close(0)  # issue 11
        self._admin_path.unlink(missing_ok=True)
        if self.curve is not None:
            self.curve.stop()
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
