"""Garbage on the client socket: every case answered BAD_REQUEST, and the supervisor keeps serving."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from akidb_embed.protocol.codec import unpack
from akidb_embed.protocol.messages import request_frame
from akidb_embed.workers.backends.mock import mock_vector
from conftest import raw_dealer, recv_answer

CONFIG = """
    [backends.m]
    kind = "mock"
    dim = 8
"""


def pk(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def embed_body(**over) -> dict:
    body = {"v": 1, "id": 41, "op": "embed", "texts": ["ok"]}
    body.update(over)
    return body


def without(key: str) -> dict:
    body = embed_body()
    del body[key]
    return body


# (case name, frames to send, echoed id (None when unreadable), words the message must contain)
CASES = [
    ("not msgpack", [b"\xc1\xc1 definitely not msgpack"], None, ["msgpack"]),
    ("empty frame", [b""], None, ["msgpack"]),
    ("truncated msgpack", [pk(embed_body())[:-3]], 41, ["msgpack"]),
    ("trailing bytes", [pk(embed_body()) + b"\x00"], 41, ["msgpack"]),
    ("a list", [pk([1, "embed", ["x"]])], None, ["map", "list"]),
    ("an int", [pk(7)], None, ["map", "int"]),
    ("a string", [pk("embed")], None, ["map", "str"]),
    ("missing id", [pk(without("id"))], None, ["id"]),
    ("id of wrong type", [pk(embed_body(id=[1]))], None, ["id"]),
    ("id is a bool", [pk(embed_body(id=True))], True, ["id"]),
    ("missing op", [pk(without("op"))], 41, ["op"]),
    ("unknown op", [pk(embed_body(op="explode"))], 41, ["op", "explode"]),
    ("wrong version", [pk(embed_body(v=2))], 41, ["version", "2"]),
    ("missing version", [pk(without("v"))], 41, ["version"]),
    ("texts missing", [pk(without("texts"))], 41, ["texts"]),
    ("texts null", [pk(embed_body(texts=None))], 41, ["texts"]),
    ("texts empty", [pk(embed_body(texts=[]))], 41, ["texts"]),
    ("texts a string", [pk(embed_body(texts="hello"))], 41, ["texts", "list"]),
    ("texts a map", [pk(embed_body(texts={"a": 1}))], 41, ["texts", "list"]),
    ("text an int", [pk(embed_body(texts=["ok", 5]))], 41, ["texts[1]", "string", "int"]),
    ("text None", [pk(embed_body(texts=[None]))], 41, ["texts[0]", "string", "NoneType"]),
    ("text bytes", [pk(embed_body(texts=[b"raw"]))], 41, ["texts[0]", "string", "bytes"]),
    ("too many texts", [pk(embed_body(texts=["t"] * 5000))], 41, ["too many texts", "5000"]),
    ("normalize a string", [pk(embed_body(normalize="yes"))], 41, ["normalize", "bool"]),
    ("normalize an int", [pk(embed_body(normalize=1))], 41, ["normalize", "bool"]),
    ("timeout_ms a string", [pk(embed_body(timeout_ms="100"))], 41, ["timeout_ms", "int"]),
    ("timeout_ms a float", [pk(embed_body(timeout_ms=1.5))], 41, ["timeout_ms", "int"]),
    ("timeout_ms a bool", [pk(embed_body(timeout_ms=True))], 41, ["timeout_ms", "int"]),
    ("timeout_ms negative", [pk(embed_body(timeout_ms=-5))], 41, ["timeout_ms", "positive"]),
    ("timeout_ms zero", [pk(embed_body(timeout_ms=0))], 41, ["timeout_ms", "positive"]),
    ("backend an int", [pk(embed_body(backend=3))], 41, ["backend", "str"]),
    ("backend a list", [pk(embed_body(backend=["m"]))], 41, ["backend", "str"]),
    ("dtype unknown", [pk(embed_body(dtype="int8"))], 41, ["dtype", "float32"]),
    ("control op without backend", [pk({"v": 1, "id": 41, "op": "restart"})], 41, ["backend"]),
    ("two frames", [pk(embed_body()), pk(embed_body(id=42))], None, ["one msgpack frame", "2"]),
    ("three frames", [pk(embed_body()), b"x", b"y"], None, ["one msgpack frame", "3"]),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for every malformed frame: it must survive all of them."""
    from conftest import running_server

    with running_server(tmp_path_factory.mktemp("malformed"), CONFIG) as srv:
        yield srv


def assert_working(server) -> None:
    assert server.proc.poll() is None, server.log()
    assert server.ps.is_running() and server.ps.status() != "zombie"
    with server.client() as c:
        v = c.embed(["still serving"])
    expected = mock_vector("still serving", 8)
    assert np.allclose(v[0], expected / np.linalg.norm(expected), atol=1e-6)


@pytest.mark.parametrize("name,frames,rid,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_frame_is_bad_request(server, name, frames, rid, words):
    sock = raw_dealer(server.endpoint)
    try:
        sock.send_multipart(frames)
        msg = recv_answer(sock)
        assert not sock.poll(50), "more than one answer to one message"
    finally:
        sock.close(0)
    assert msg["ok"] is False and msg["v"] == 1
    assert msg["id"] == rid
    err = msg["error"]
    assert err["code"] == "BAD_REQUEST", err
    assert err["retryable"] is False
    for word in words:
        assert word in err["message"], (word, err["message"])
    assert_working(server)


def test_all_garbage_back_to_back_then_serving(server):
    """Every malformed case on one socket in a burst: one answer each, in order, then a normal request."""
    sock = raw_dealer(server.endpoint)
    try:
        for _, frames, _, _ in CASES:
            sock.send_multipart(frames)
        sock.send(request_frame("good", "embed", texts=["fine"]))
        answers = [recv_answer(sock) for _ in range(len(CASES) + 1)]
    finally:
        sock.close(0)
    assert [a["error"]["code"] for a in answers[:-1]] == ["BAD_REQUEST"] * len(CASES)
    assert [a["id"] for a in answers[:-1]] == [rid for _, _, rid, _ in CASES]
    assert answers[-1]["ok"] is True and answers[-1]["id"] == "good" and answers[-1]["shape"] == [1, 8]
    assert_working(server)


def test_unknown_backend_on_raw_socket(server):
    sock = raw_dealer(server.endpoint)
    try:
        sock.send(request_frame(9, "embed", texts=["x"], backend="ghost"))
        msg = recv_answer(sock)
        sock.send(request_frame(10, "stop", backend="ghost"))
        ctl = recv_answer(sock)
    finally:
        sock.close(0)
    for m, rid in ((msg, 9), (ctl, 10)):
        assert m["ok"] is False and m["id"] == rid
        assert m["error"]["code"] == "UNKNOWN_BACKEND" and m["error"]["retryable"] is False
        assert "'ghost'" in m["error"]["message"] and "configured: m" in m["error"]["message"]
    assert_working(server)


def test_req_socket_with_envelope_delimiter(server):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send(request_frame("req-1", "embed", texts=["via req"]))
        assert sock.poll(10_000)
        ok = unpack(sock.recv())
        sock.send(pk(embed_body(id="req-2", texts=[])))
        assert sock.poll(10_000)
        bad = unpack(sock.recv())
        sock.send(request_frame("req-3", "health"))
        assert sock.poll(10_000)
        health = unpack(sock.recv())
    finally:
        sock.close(0)
    assert ok["ok"] is True and ok["id"] == "req-1" and ok["shape"] == [1, 8]
    expected = mock_vector("via req", 8)
    got = np.frombuffer(ok["data"], dtype="<f4")
    assert np.allclose(got, expected / np.linalg.norm(expected), atol=1e-6)
    assert bad["ok"] is False and bad["id"] == "req-2" and bad["error"]["code"] == "BAD_REQUEST"
    assert health["ok"] is True and health["status"] == "ok"
    assert_working(server)
