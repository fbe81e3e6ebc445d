"""The worker channel cannot be joined (issue 11): a same-user process that connects to the worker socket
with the identity the next worker would have had (its wid) and forges ready/done/fail is ignored, and
never receives a client's texts."""
from __future__ import annotations

import numpy as np
import psutil
import zmq
from conftest import poll_until

from akidb_embed.protocol.errors import InternalError
from akidb_embed.protocol.messages import (
    WorkerMsg,
    done_msg,
    error_response,
    worker_header,
)
from akidb_embed.workers.backends.mock import mock_vector

CONFIG = """
[backends.m]
kind = "mock"
dim = 8
startup_delay_ms = 500
"""


def worker_cmdline(server) -> list[str]:
    return poll_until(lambda: next((p.cmdline() for p in server.children() if "--wid" in p.cmdline()), None), 30)


def test_spoofed_worker_is_ignored_and_gets_no_texts(serve):
    server = serve(CONFIG)
    cmd = worker_cmdline(server)
    endpoint = cmd[cmd.index("--endpoint") + 1]
    assert "--lifeline-fd" in cmd and not any(len(a) == 32 and all(c in "0123456789abcdef" for c in a)
                                               for a in cmd), "the secret must not be on the command line"
    ctx = zmq.Context.instance()
    spoofs = []
    for ident in (b"m.2", b"m.2/hb"):   # the next generation's wid: what an attacker would guess
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, ident)
        s.connect(endpoint)
        spoofs.append(s)
    main, hb = spoofs
    try:
        with server.client() as c:
            c.restart("m")      # the owner restarts: worker m.2 is spawned now
        pid = psutil.Process(server.proc.pid).pid
        forged_info = {"model": "forged", "dim": 8, "max_tokens": 10, "extra": {}}
        for _ in range(3):
            main.send(worker_header(WorkerMsg.READY, wid="m.2", pid=pid, info=forged_info))
            hb.send(worker_header(WorkerMsg.HEARTBEAT, wid="m.2", pid=pid, busy=False))
        server.wait_ready(30)
        texts = [f"secret text {i}" for i in range(20)]
        with server.client() as c:
            for i in range(1, 30):   # forged answers for any plausible seq
                main.send_multipart(done_msg(i, "INTERNAL", error_response(i, InternalError("forged"))))
            main.send(worker_header(WorkerMsg.FAIL, wid="m.2", pid=pid, error={"message": "forged fail"}))
            out = c.embed(texts, backend="m")
            status = c.status()["backends"]["m"]
        expected = np.stack([mock_vector(t, 8) for t in texts])
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        assert np.allclose(out, expected, atol=1e-6)
        assert status["state"] == "READY" and status["model"] != "forged"
        for s in spoofs:
            assert not s.poll(200), "the spoofed worker received something"
    finally:
        for s in spoofs:
            s.close(0)
    log = server.log()
    assert log.count("message from an unknown peer on the worker channel") <= 6, log
    assert "message from an unknown peer on the worker channel" in log
