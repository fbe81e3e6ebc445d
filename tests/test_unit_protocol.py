"""protocol/ as pure logic: error codes and retryability, request validation limits, frame helpers."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from akidb_embed.protocol import codec, errors, messages
from akidb_embed.protocol.errors import ErrorCode, error_from_wire
from akidb_embed.protocol.messages import (
    MAX_TEXTS_PER_REQUEST,
    ControlRequest,
    EmbedRequest,
    QueryRequest,
    RequestError,
    parse_request,
)

# ---- errors -----------------------------------------------------------------------------------------

# docs/protocol.md: which codes a client may retry
RETRYABLE = {"BAD_REQUEST": False, "UNKNOWN_BACKEND": False, "BACKEND_UNAVAILABLE": True, "TIMEOUT": True,
             "WORKER_DIED": True, "OVERLOADED": True, "POISON_INPUT": False, "SHUTTING_DOWN": True,
             "SERVER_UNAVAILABLE": True, "INTERNAL": False}
CLASSES = {"BAD_REQUEST": errors.BadRequest, "UNKNOWN_BACKEND": errors.UnknownBackend,
           "BACKEND_UNAVAILABLE": errors.BackendUnavailable, "TIMEOUT": errors.Timeout,
           "WORKER_DIED": errors.WorkerDied, "OVERLOADED": errors.Overloaded, "POISON_INPUT": errors.PoisonInput,
           "SHUTTING_DOWN": errors.ShuttingDown, "SERVER_UNAVAILABLE": errors.ServerUnavailable,
           "INTERNAL": errors.InternalError}


@pytest.mark.parametrize("code", sorted(RETRYABLE))
def test_each_error_class_has_its_code_and_documented_retryability(code):
    err = CLASSES[code]("m")
    assert err.code == ErrorCode(code) and err.code.value == code
    assert err.retryable is RETRYABLE[code]
    assert err.to_wire() == {"code": code, "message": "m", "retryable": RETRYABLE[code]}
    assert str(err) == f"{code}: m" and err.args == ("m",)


@pytest.mark.parametrize("code", sorted(RETRYABLE))
def test_error_from_wire_rebuilds_the_class_and_its_default_retryability(code):
    back = error_from_wire({"code": code, "message": "why"})
    assert type(back) is CLASSES[code]
    assert back.message == "why" and back.retryable is RETRYABLE[code]
    again = error_from_wire(CLASSES[code]("m").to_wire())
    assert type(again) is CLASSES[code] and again.retryable is RETRYABLE[code]


def test_base_error_is_internal_and_not_retryable():
    err = errors.EmbedError("m")
    assert err.code == ErrorCode.INTERNAL and err.retryable is False
    assert err.to_wire() == {"code": "INTERNAL", "message": "m", "retryable": False}


def test_wire_retryable_flag_overrides_the_default():
    assert error_from_wire({"code": "TIMEOUT", "message": "", "retryable": False}).retryable is False
    assert error_from_wire({"code": "INTERNAL", "message": "", "retryable": True}).retryable is True
    assert errors.Timeout("x", retryable=False).retryable is False


def test_unknown_error_code_becomes_internal_keeping_the_code_in_the_message():
    err = error_from_wire({"code": "NEW_CODE", "message": "later version", "retryable": False})
    assert type(err) is errors.InternalError and err.code == ErrorCode.INTERNAL
    assert err.message == "NEW_CODE: later version"
    plain = error_from_wire({"code": "INTERNAL", "message": "boom"})
    assert plain.message == "boom"
    assert type(error_from_wire({"message": "no code"})) is errors.InternalError


@pytest.mark.parametrize("obj", [None, "TIMEOUT", ["TIMEOUT"], 3])
def test_malformed_error_object_is_internal(obj):
    err = error_from_wire(obj)
    assert type(err) is errors.InternalError and "malformed" in err.message


# ---- request validation ---------------------------------------------------------------------------------

def frame(**over) -> bytes:
    body = {"v": 1, "id": 7, "op": "embed", "texts": ["a"]}
    body.update(over)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...}, use_bin_type=True)


def bad(**over) -> RequestError:
    with pytest.raises(RequestError) as exc:
        parse_request(frame(**over))
    assert exc.value.code == ErrorCode.BAD_REQUEST
    return exc.value


def test_exactly_max_texts_are_accepted_and_one_more_refused():
    assert MAX_TEXTS_PER_REQUEST == 4096
    req = parse_request(frame(texts=["x"] * 4096))
    assert isinstance(req, EmbedRequest) and len(req.texts) == 4096
    err = bad(texts=["x"] * 4097)
    assert "4097" in err.message and err.request_id == 7


def test_embed_request_fields_and_defaults():
    req = parse_request(frame())
    assert req == EmbedRequest(id=7, texts=["a"], backend=None, normalize=True, timeout_ms=None, dtype="float32")
    assert req == EmbedRequest(id=7, texts=["a"])      # the parsed defaults are the message's defaults
    req = parse_request(frame(id="s", backend="b", normalize=False, timeout_ms=1, dtype="float16"))
    assert req == EmbedRequest(id="s", texts=["a"], backend="b", normalize=False, timeout_ms=1, dtype="float16")


@pytest.mark.parametrize("over, words", [
    ({"texts": []}, "at least one"),
    ({"texts": ...}, "missing field 'texts'"),
    ({"texts": "a"}, "must be list"),
    ({"texts": ["a", 3]}, "texts[1]"),
    ({"timeout_ms": 0}, "positive"),
    ({"timeout_ms": -5}, "positive"),
    ({"timeout_ms": True}, "timeout_ms"),
    ({"timeout_ms": 1.5}, "timeout_ms"),
    ({"normalize": 1}, "normalize"),
    ({"dtype": "float64"}, "dtype"),
    ({"backend": 3}, "backend"),
    ({"v": 2}, "version"),
    ({"v": ...}, "version"),
    ({"op": "nope"}, "unknown op"),
])
def test_invalid_embed_requests_are_bad_request_with_the_id(over, words):
    err = bad(**over)
    assert words in err.message, err.message
    assert err.request_id == 7


@pytest.mark.parametrize("rid", [None, [1], ...])
def test_invalid_id_is_bad_request_without_an_id(rid):
    err = bad(id=rid)
    assert err.request_id is None and "'id'" in err.message


@pytest.mark.parametrize("rid", [True, 1.5])
def test_a_scalar_id_of_the_wrong_type_is_echoed_in_the_bad_request(rid):
    err = bad(id=rid)       # issue 11: the id is echoed when it can be, so the client can match the answer
    assert err.request_id == rid and type(err.request_id) is type(rid) and "'id'" in err.message


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("x")])
def test_garbage_frames_are_bad_request(raw):
    with pytest.raises(RequestError):
        parse_request(raw)


def test_parsed_requests_are_immutable():
    import dataclasses
    reqs = [parse_request(frame()), parse_request(frame(op="info", texts=...)),
            parse_request(frame(op="stop", texts=..., backend="m"))]
    for req in reqs:
        with pytest.raises(dataclasses.FrozenInstanceError):
            req.id = 8


def test_query_and_control_requests():
    for op in ("info", "health", "status"):
        assert parse_request(frame(op=op, texts=...)) == QueryRequest(7, op)
    for op in ("restart", "stop", "start"):
        assert parse_request(frame(op=op, texts=..., backend="m")) == ControlRequest(7, op, "m")
        assert "backend" in bad(op=op, texts=...).message


# ---- frame helpers --------------------------------------------------------------------------------------

def test_request_frame_drops_none_fields():
    body = codec.unpack(messages.request_frame(3, "embed", texts=["a"], backend=None, timeout_ms=5))
    assert body == {"v": 1, "id": 3, "op": "embed", "texts": ["a"], "timeout_ms": 5}


def test_responses_round_trip():
    ok = messages.parse_response(messages.ok_response(4, state="READY"))
    assert ok == {"v": 1, "id": 4, "ok": True, "state": "READY"}
    err = messages.parse_response(messages.error_response(5, errors.Overloaded("full")))
    assert err == {"v": 1, "id": 5, "ok": False, "error": {"code": "OVERLOADED", "message": "full", "retryable": True}}
    vec = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = messages.parse_response(messages.embed_response(6, vec, dtype="float16", backend="b", model="m",
                                                          truncated=1))
    assert msg["shape"] == [2, 3] and msg["dtype"] == "float16" and msg["truncated"] == 1 and msg["ok"] is True
    assert np.array_equal(codec.blob_to_vectors(msg["data"], msg["shape"], "float16"), vec)
    for raw in (codec.pack([1]), codec.pack({"id": 1})):
        with pytest.raises(ValueError):
            messages.parse_response(raw)


def test_worker_message_kinds_are_the_documented_ones():
    # docs/protocol.md, supervisor <-> worker: the `t` field of each header
    kinds = {k: v for k, v in vars(messages.WorkerMsg).items() if not k.startswith("_")}
    assert kinds == {"EMBED": "embed", "STOP": "stop", "READY": "ready", "FAIL": "fail", "HEARTBEAT": "hb",
                     "DONE": "done"}


def test_worker_headers():
    header, body = messages.embed_job(9, 1250, b"req")   # a budget relative to receipt, not a deadline
    assert codec.unpack(header) == {"t": "embed", "seq": 9, "budget_ms": 1250} and body == b"req"
    header, body = messages.done_msg(9, "TIMEOUT", b"resp")
    assert messages.parse_header(header) == {"t": "done", "seq": 9, "code": "TIMEOUT", "tokens": None}
    assert body == b"resp"
    header, _ = messages.done_msg(9, None, b"resp", 7, [[2, 7, 0.5]])
    assert messages.parse_header(header) == {"t": "done", "seq": 9, "code": None, "tokens": 7,
                                             "passes": [[2, 7, 0.5]]}
    assert messages.parse_header(messages.worker_header("ready", wid="w")) == {"t": "ready", "wid": "w"}
    for raw in (codec.pack([1]), codec.pack({"seq": 1})):
        with pytest.raises(ValueError):
            messages.parse_header(raw)


def test_vector_blob_is_little_endian_row_major():
    vec = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    blob = codec.vectors_to_blob(vec)
    assert blob == np.array([1, 2, 3, 4], dtype="<f4").tobytes()
    assert len(codec.vectors_to_blob(vec, "float16")) == 8
    out = codec.blob_to_vectors(blob, [2, 2])
    assert out.dtype == np.float32 and np.array_equal(out, vec)


def test_priority_is_one_of_the_three_classes_or_absent():
    for prio in ("high", "normal", "low"):
        assert parse_request(messages.request_frame(1, "embed", texts=["a"], priority=prio)).priority == prio
    assert parse_request(messages.request_frame(1, "embed", texts=["a"])).priority is None
    with pytest.raises(RequestError) as exc:
        parse_request(messages.request_frame(1, "embed", texts=["a"], priority="urgent"))
    assert "priority" in str(exc.value) and "high, normal, low" in str(exc.value)
