"""The clients match answers to requests by id (a stub ROUTER stands in for the supervisor)."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import zmq

from akidb_embed import AsyncClient, Client
from akidb_embed.protocol.codec import pack, unpack
from akidb_embed.protocol.errors import Timeout


class Stub:
    """A ROUTER socket; script(requests) decides what to send back, in what order."""

    def __init__(self, tmp_path) -> None:
        self.endpoint = f"ipc://{tmp_path / ('stub-' + uuid.uuid4().hex[:8])}"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)

    def recv(self) -> tuple[bytes, dict]:
        assert self.sock.poll(10_000), "the client sent nothing"
        ident, frame = self.sock.recv_multipart()
        return ident, unpack(frame)

    def answer(self, ident: bytes, rid, **fields) -> None:
        self.sock.send_multipart([ident, pack({"v": 1, "id": rid, "ok": True, **fields})])

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def stub(tmp_path):
    s = Stub(tmp_path)
    yield s
    s.close()


def test_blocking_client_ignores_answers_with_another_id(stub):
    with Client(stub.endpoint) as c:
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", c.info()))
        t.start()
        ident, req = stub.recv()
        stub.answer(ident, req["id"] + 1000, which="stranger")
        stub.answer(ident, "x", which="stranger")
        stub.answer(ident, req["id"], which="mine")
        t.join(10)
        assert not t.is_alive()
        assert got["r"]["which"] == "mine"


def test_blocking_client_drops_the_late_answer_of_an_abandoned_call(stub):
    with Client(stub.endpoint) as c:
        c_ids = []
        with pytest.raises(Timeout):
            c._call("info", 0.2)                       # nobody answers in time
        ident, first = stub.recv()
        c_ids.append(first["id"])
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", c.info()))
        t.start()
        ident, second = stub.recv()
        c_ids.append(second["id"])
        assert second["id"] != first["id"]             # each call has its own id
        stub.answer(ident, first["id"], which="late")   # the answer to the abandoned call comes first
        stub.answer(ident, second["id"], which="mine")
        t.join(10)
        assert not t.is_alive()
        assert got["r"]["which"] == "mine"


def test_async_client_routes_out_of_order_answers_by_id(stub):
    async def main():
        async with AsyncClient(stub.endpoint) as c:
            calls = [asyncio.ensure_future(c.info()) for _ in range(3)]
            loop = asyncio.get_running_loop()
            reqs = [await loop.run_in_executor(None, stub.recv) for _ in range(3)]
            ids = [r["id"] for _, r in reqs]
            assert len(set(ids)) == 3
            ident = reqs[0][0]
            stub.answer(ident, 10_000, which="stranger")
            for rid in reversed(ids):
                stub.answer(ident, rid, which=rid)
            out = await asyncio.wait_for(asyncio.gather(*calls), 10)
            assert [o["which"] for o in out] == ids
    asyncio.run(main())


def test_blocking_client_waits_its_whole_wait_then_times_out(stub):
    with Client(stub.endpoint) as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            c._call("info", 1.5)                      # nobody answers
        waited = time.monotonic() - t0
    assert waited >= 1.5, waited                      # not earlier than asked
    with Client(stub.endpoint) as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            c._call("info", 0.2)
        waited = time.monotonic() - t0
    assert waited < 0.9, waited                       # nor a whole second later (order of magnitude)


def test_async_client_skips_frames_that_are_not_answers(stub):
    async def main():
        async with AsyncClient(stub.endpoint) as c:
            call = asyncio.ensure_future(c.info())
            ident, req = await asyncio.get_running_loop().run_in_executor(None, stub.recv)
            stub.sock.send_multipart([ident, b"\xc1"])                 # not msgpack
            stub.sock.send_multipart([ident, pack({"id": req["id"]})])  # no "ok": not an answer
            stub.answer(ident, req["id"], which="mine")
            return await asyncio.wait_for(call, 5)
    assert asyncio.run(main())["which"] == "mine"


def test_async_client_unanswered_call_times_out_and_forgets_its_id(stub):
    async def main():
        async with AsyncClient(stub.endpoint) as c:
            with pytest.raises(Timeout):
                await c._call("info", 0.2)           # nobody answers
            assert c._waiting == {}                  # nothing kept for an answer that may never come
    asyncio.run(main())


def test_blocking_client_keeps_waiting_after_a_stray_answer(stub):
    with Client(stub.endpoint) as c:
        def stray() -> None:
            ident, req = stub.recv()
            time.sleep(1.2)                                     # late in the wait: less than 1 s left
            stub.answer(ident, req["id"] + 1, which="stranger")
        t = threading.Thread(target=stray, daemon=True)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            c._call("info", 2.0)
        waited = time.monotonic() - t0
        t.join(10)
        assert not t.is_alive()
    assert waited >= 2.0, waited
