"""Strict, cheap decoding of untrusted client frames, against a real supervisor (issue 11)."""
from __future__ import annotations

import msgpack
import pytest
import zmq
from conftest import poll_until, raw_dealer, recv_answer

from akidb_embed.protocol.codec import unpack
from akidb_embed.protocol.messages import request_frame

CONFIG = """
    [server]
    max_frame_bytes = 1048576
    max_text_bytes = 65536
    max_texts_per_request = 100

    [backends.m]
    kind = "mock"
    dim = 8

    [backends.slow]
    kind = "mock"
    dim = 8
    delay_ms = 400
"""


def pk(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def body(**over) -> dict:
    b = {"v": 1, "id": 41, "op": "embed", "texts": ["ok"], "backend": "m"}
    b.update(over)
    return b


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import running_server

    with running_server(tmp_path_factory.mktemp("strict"), CONFIG) as srv:
        yield srv


def ask(server, frames: list[bytes], timeout_s: float = 10.0) -> dict:
    sock = raw_dealer(server.endpoint)
    try:
        sock.send_multipart(frames)
        return recv_answer(sock, timeout_s)
    finally:
        sock.close(0)


# (case, request map, echoed id, error code, words in the message)
CASES = [
    ("v is true", body(v=True), 41, "BAD_REQUEST", ["version", "True"]),
    ("v is 1.0", body(v=1.0), 41, "BAD_REQUEST", ["version", "1.0"]),
    ("v is '1'", body(v="1"), 41, "BAD_REQUEST", ["version"]),
    ("id is a float", body(id=1.5), 1.5, "BAD_REQUEST", ["id", "float"]),
    ("id is bin", body(id=b"\x01\x02"), b"\x01\x02", "BAD_REQUEST", ["id", "bytes"]),
    ("id is a 257-byte string", body(id="x" * 257), None, "BAD_REQUEST", ["id", "256 bytes"]),
    ("id is a map", body(id={"a": 1}), None, "BAD_REQUEST", ["id", "dict"]),
    ("too many texts", body(texts=["t"] * 101), 41, "BAD_REQUEST", ["too many texts", "101", "100"]),
    ("a text too big", body(texts=["x" * 65537]), 41, "PAYLOAD_TOO_LARGE", ["65537", "max_text_bytes = 65536"]),
    ("nested arrays", body(texts=[[[[[]]]]] * 40), 41, "BAD_REQUEST", ["msgpack"]),
    ("a map with 100 keys", {**body(), **{f"k{i}": i for i in range(100)}}, 41, "BAD_REQUEST", ["msgpack"]),
]


@pytest.mark.parametrize("name,req,rid,code,words", CASES, ids=[c[0] for c in CASES])
def test_strict_case(server, name, req, rid, code, words):
    msg = ask(server, [pk(req)])
    assert msg["ok"] is False and msg["id"] == rid, msg
    assert msg["error"]["code"] == code, msg
    for word in words:
        assert word in msg["error"]["message"], (word, msg["error"]["message"])


def test_valid_ids_at_the_limits_are_served(server):
    for rid in ("é" * 128, 2**64 - 1, -2**63):
        msg = ask(server, [pk(body(id=rid))])
        assert msg["ok"] is True and msg["id"] == rid


def test_oversize_frame_answered_with_its_id_and_the_request_before_it_too(server):
    sock = raw_dealer(server.endpoint)
    try:
        sock.send(request_frame("before", "embed", texts=["first"], backend="slow"))
        sock.send(pk(body(id="big", texts=["y" * 60_000] * 20)))   # 1.2 MB > max_frame_bytes
        answers = {m["id"]: m for m in (recv_answer(sock), recv_answer(sock))}
    finally:
        sock.close(0)
    assert answers["before"]["ok"] is True and answers["before"]["shape"] == [1, 8]
    err = answers["big"]["error"]
    assert err["code"] == "PAYLOAD_TOO_LARGE" and "max_frame_bytes = 1048576" in err["message"]
    assert err["retryable"] is False


def test_huge_op_is_clipped_in_answer_and_log(server):
    msg = ask(server, [pk(body(op="X" * 60_000))])
    assert msg["error"]["code"] == "BAD_REQUEST" and len(msg["error"]["message"]) < 500
    assert "X" * 1000 not in server.log()


def test_garbage_flood_costs_few_log_lines(server):
    before = server.log().count("bad request")
    sock = raw_dealer(server.endpoint)
    try:
        for i in range(500):
            sock.send(b"\xc1garbage %d" % i)
        for _ in range(500):
            recv_answer(sock)
    finally:
        sock.close(0)
    assert server.log().count("bad request") - before < 20


def test_duplicate_inflight_id_is_refused_then_reusable(server):
    sock = raw_dealer(server.endpoint)
    try:
        sock.send(request_frame(7, "embed", texts=["one"], backend="slow"))
        sock.send(request_frame(7, "embed", texts=["two"], backend="slow"))
        dup = recv_answer(sock)
        first = recv_answer(sock)
        sock.send(request_frame(7, "embed", texts=["three"], backend="m"))
        again = recv_answer(sock)
    finally:
        sock.close(0)
    assert dup["id"] == 7 and dup["error"]["code"] == "BAD_REQUEST" and "in flight" in dup["error"]["message"]
    assert first["ok"] is True and first["id"] == 7
    assert again["ok"] is True and again["id"] == 7


def test_same_id_on_two_connections_is_fine(server):
    a, b = raw_dealer(server.endpoint), raw_dealer(server.endpoint)
    try:
        a.send(request_frame(1, "embed", texts=["a"], backend="slow"))
        b.send(request_frame(1, "embed", texts=["b"], backend="slow"))
        assert recv_answer(a)["ok"] is True and recv_answer(b)["ok"] is True
    finally:
        a.close(0)
        b.close(0)


def test_req_correlate_socket_gets_its_answers(server):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.REQ_CORRELATE, 1)
    sock.setsockopt(zmq.REQ_RELAXED, 1)
    sock.connect(server.endpoint)
    try:
        for i in range(3):
            sock.send(request_frame(f"c{i}", "embed", texts=[f"t{i}"], backend="m"))
            assert sock.poll(10_000), "REQ_CORRELATE request not answered"
            msg = unpack(sock.recv())
            assert msg["ok"] is True and msg["id"] == f"c{i}"
        sock.send(pk(body(id="bad", v=2)))
        assert sock.poll(10_000)
        assert unpack(sock.recv())["error"]["code"] == "BAD_REQUEST"
    finally:
        sock.close(0)


def test_still_serving_and_rss_flat(server):
    rss0 = server.ps.memory_info().rss
    for _ in range(3):
        for _name, req, *_ in CASES:
            ask(server, [pk(req)])
    with server.client() as c:
        assert c.embed(["after all that"], backend="m").shape == (1, 8)
    poll_until(lambda: server.ps.memory_info().rss < rss0 + 8 * 2**20, 10)
