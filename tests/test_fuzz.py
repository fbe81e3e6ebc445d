"""Fuzzing the request decoder and a live supervisor with random and mutated frames (issue 11).

Bounded in CI. A longer run (documented in README "Security"):

    AKIDB_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import os

import msgpack
import pytest
from conftest import poll_until, raw_dealer, recv_answer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from akidb_embed.protocol.errors import BadRequest, PayloadTooLarge
from akidb_embed.protocol.messages import (
    ControlRequest,
    EmbedRequest,
    Limits,
    QueryRequest,
    parse_request,
    request_frame,
)

EXAMPLES = int(os.environ.get("AKIDB_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=20)
fields = st.sampled_from(["v", "id", "op", "texts", "backend", "normalize", "timeout_ms", "dtype"])
requests = st.dictionaries(fields, st.one_of(values, st.sampled_from(
    [1, "embed", "health", "m", ["a", "b"], True, 100, "float16"])), max_size=8)


def valid_frame(rid) -> bytes:
    return request_frame(rid, "embed", texts=["hello", "world"], backend="m")


@st.composite
def mutated(draw) -> bytes:
    frame = bytearray(valid_frame(draw(st.integers(0, 2**32))))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(frame) - 1))
        frame[i] = draw(st.integers(0, 255))
    return bytes(frame[:draw(st.integers(0, len(frame)))]) if draw(st.booleans()) else bytes(frame)


frames = st.one_of(st.binary(max_size=300), requests.map(lambda m: msgpack.packb(m, use_bin_type=True)),
                   mutated())

SMALL = Limits(max_frame_bytes=4096, max_texts_per_request=8, max_text_bytes=64)


@FUZZ
@given(frames)
def test_decoder_answers_by_rule(frame):
    """Every frame is a typed request or BAD_REQUEST / PAYLOAD_TOO_LARGE, never anything else."""
    for limits in (Limits(), SMALL):
        try:
            req = parse_request(frame, limits)
        except (BadRequest, PayloadTooLarge) as exc:
            rid = getattr(exc, "request_id", None)
            assert rid is None or isinstance(rid, (int, str, bytes, float, bool))
            assert len(exc.message) < 1000
            continue
        assert isinstance(req, (EmbedRequest, QueryRequest, ControlRequest))
        assert type(req.id) in (int, str)
        if isinstance(req, EmbedRequest):
            assert 1 <= len(req.texts) <= limits.max_texts_per_request
            assert all(isinstance(t, str) and len(t.encode()) <= limits.max_text_bytes for t in req.texts)


CONFIG = """
    [backends.m]
    kind = "mock"
    dim = 8
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import running_server

    with running_server(tmp_path_factory.mktemp("fuzz"), CONFIG) as srv:
        yield srv


def test_live_supervisor_survives_fuzzing(server):
    sock = raw_dealer(server.endpoint)
    rss = []

    @FUZZ
    @given(frames)
    def one(frame):
        sock.send(frame)
        msg = recv_answer(sock)            # exactly one answer, a msgpack map
        assert msg["v"] == 1 and isinstance(msg["ok"], bool)
        if not msg["ok"]:
            assert msg["error"]["code"] in ("BAD_REQUEST", "PAYLOAD_TOO_LARGE", "UNKNOWN_BACKEND", "UNAUTHORIZED",
                                            "OVERLOADED")
        if len(rss) < 2:
            rss.append(server.ps.memory_info().rss)

    try:
        one()
        sock.send(valid_frame("after"))
        last = recv_answer(sock)
    finally:
        sock.close(0)
    assert last["ok"] is True and last["id"] == "after"
    assert server.proc.poll() is None
    # bounded RSS: within a few MB of where the fuzzing started
    poll_until(lambda: server.ps.memory_info().rss < rss[0] + 16 * 2**20, 10)
