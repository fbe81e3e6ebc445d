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
             "SERVER_UNAVAILABLE": True, "INTERNAL": False, "INPUT_TOO_LONG": False, "PAYLOAD_TOO_LARGE": False,
             "UNAUTHORIZED": False}
CLASSES = {"BAD_REQUEST": errors.BadRequest, "UNKNOWN_BACKEND": errors.UnknownBackend,
           "BACKEND_UNAVAILABLE": errors.BackendUnavailable, "TIMEOUT": errors.Timeout,
           "WORKER_DIED": errors.WorkerDied, "OVERLOADED": errors.Overloaded, "POISON_INPUT": errors.PoisonInput,
           "SHUTTING_DOWN": errors.ShuttingDown, "SERVER_UNAVAILABLE": errors.ServerUnavailable,
           "INTERNAL": errors.InternalError, "INPUT_TOO_LONG": errors.InputTooLong,
           "PAYLOAD_TOO_LARGE": errors.PayloadTooLarge, "UNAUTHORIZED": errors.Unauthorized}


def test_every_error_code_is_documented_here():
    assert set(RETRYABLE) == set(CLASSES) == {c.value for c in ErrorCode}


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


# ---- bounded decoding of untrusted frames (codec; docs/protocol.md "Limits") ------------------------

def bounded(obj, max_str=10, max_array=100, **kw):
    return codec.unpack_bounded(codec.pack(obj), max_str=max_str, max_array=max_array, **kw)


def test_strings_bins_and_arrays_exactly_at_their_limit_decode_and_one_more_is_too_large():
    assert bounded("a" * 10) == "a" * 10 and bounded(b"a" * 10) == b"a" * 10 and bounded([0] * 100) == [0] * 100
    for obj, what, size in (("a" * 11, "a string", 11), ("é" * 6, "a string", 12), (b"a" * 11, "a string", 11),
                            ([0] * 101, "an array", 101)):
        with pytest.raises(codec.TooLarge) as exc:
            bounded(obj)
        assert (exc.value.what, exc.value.size, str(exc.value)) == (what, size, f"{what} of {size}")


def test_at_most_32_arrays_and_maps_per_frame():
    assert codec.MAX_CONTAINERS == 32
    for empty in ([], {}):
        assert bounded([empty] * 31) == [empty] * 31          # 31 + the outer array: 32
        with pytest.raises(ValueError, match="more than 32 arrays and maps") as exc:
            bounded([empty] * 32)
        assert not isinstance(exc.value, codec.TooLarge)
    mixed = {"a": [[]] * 15, "b": [{}] * 14}                  # arrays and maps count together: 1 + 2 + 29
    assert bounded(mixed) == mixed
    with pytest.raises(ValueError, match="more than 32"):
        bounded({**mixed, "b": [{}] * 15})
    # the count is per frame, not per process
    assert bounded([[]] * 31) == bounded([[]] * 31)


def test_maps_hold_at_most_64_pairs_with_string_keys_and_no_ext_types():
    assert len(bounded({str(i): i for i in range(64)})) == 64
    assert len(bounded({str(i): i for i in range(8)}, max_map=8)) == 8
    for obj in ({str(i): i for i in range(65)}, {1: 2}, msgpack.ExtType(1, b"x"), [msgpack.ExtType(1, b"xy")]):
        with pytest.raises(ValueError) as exc:
            bounded(obj)
        assert not isinstance(exc.value, codec.TooLarge)
    assert bounded({"k": "v"}) == {"k": "v"}                 # str, not bytes


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1k"])
def test_garbage_is_a_plain_value_error(raw):
    with pytest.raises(ValueError) as exc:
        codec.unpack_bounded(raw, max_str=10, max_array=10)
    assert not isinstance(exc.value, codec.TooLarge)


def test_peek_field_reads_only_the_first_4_kib_and_16_pairs():
    # docs/protocol.md: the id of a frame too big or broken is read from the map's first 4 KiB
    at_4096 = codec.pack({"pad": "x" * 4084, "id": 5})      # the id's value is byte 4096
    assert len(at_4096) == 4096 and codec.peek_field(at_4096 + b"\xc1" * 64, "id") == 5
    at_4097 = codec.pack({"pad": "x" * 4085, "id": 5})
    assert len(at_4097) == 4097 and codec.peek_field(at_4097, "id") is None
    pads = {f"p{i}": i for i in range(16)}
    assert codec.peek_field(codec.pack({**dict(list(pads.items())[:15]), "id": 5}), "id") == 5   # 16th pair
    assert codec.peek_field(codec.pack({**pads, "id": 5}), "id") is None                         # 17th pair


def test_peek_field_skips_other_values_and_returns_only_short_scalars():
    assert codec.peek_field(codec.pack({"a": "id", "id": 3}), "id") == 3     # a value equal to the name is no key
    assert codec.peek_field(codec.pack({"v": 1, "id": "s", "op": "x" * 5000}), "id") == "s"
    for frame in (codec.pack({"id": [1]}), codec.pack({"id": {"a": 1}}), codec.pack({"id": msgpack.ExtType(1, b"x")}),
                  codec.pack([1, "id", 3]), codec.pack({"ids": 3}), b"", b"\xc1"):
        assert codec.peek_field(frame, "id") is None


# ---- request limits (messages; docs/protocol.md "Limits") -----------------------------------------------

def sized_frame(size: int, text_bytes: int, rid=7) -> bytes:
    """An embed frame of exactly ``size`` bytes whose texts are at most ``text_bytes`` bytes each."""
    n = 1
    while True:
        texts = ["x" * text_bytes] * n
        base = len(frame(id=rid, texts=texts + [""]))
        if base + text_bytes >= size:
            break
        n += 1
    last = size - base
    for _ in range(4):                  # the last text's length prefix grows with it
        raw = frame(id=rid, texts=texts + ["y" * last])
        last += size - len(raw)
    assert len(raw) == size and last <= text_bytes
    return raw


def test_default_limits_are_the_documented_ones():
    limits = messages.DEFAULT_LIMITS
    assert limits == messages.Limits() == messages.Limits(8 * 2**20, 4096, 256 * 2**10)
    assert messages.MAX_ID_BYTES == 256 and messages.MAX_PROMPT_CHARS == 4096
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):      # shared by every parse: nobody may change them
        limits.max_frame_bytes = 2**40


def test_a_frame_exactly_at_max_frame_bytes_is_accepted_and_one_byte_more_is_payload_too_large():
    top = 8 * 2**20
    req = parse_request(sized_frame(top, 256 * 2**10))
    assert isinstance(req, EmbedRequest) and sum(len(t) for t in req.texts) > top - 1000
    with pytest.raises(messages.PayloadTooLarge) as exc:
        parse_request(sized_frame(top + 1, 256 * 2**10, rid="big"))
    err = exc.value
    assert err.code == ErrorCode.PAYLOAD_TOO_LARGE and err.retryable is False and err.request_id == "big"
    assert f"max_frame_bytes = {top}" in err.message and f"{top + 1} bytes" in err.message
    small = messages.Limits(max_frame_bytes=200)
    assert isinstance(parse_request(sized_frame(200, 50), small), EmbedRequest)
    with pytest.raises(messages.PayloadTooLarge):
        parse_request(sized_frame(201, 50), small)


def test_a_text_exactly_at_max_text_bytes_is_accepted_and_one_byte_more_is_payload_too_large():
    top = 256 * 2**10
    assert parse_request(frame(texts=["é" * (top // 2)])).texts == ["é" * (top // 2)]   # UTF-8 bytes count
    for over in (frame(texts=["a", "é" * (top // 2) + "a"]), frame(backend="b" * (top + 1))):
        with pytest.raises(messages.PayloadTooLarge) as exc:
            parse_request(over)
        assert exc.value.request_id == 7 and exc.value.code == ErrorCode.PAYLOAD_TOO_LARGE
        assert f"{top + 1} bytes" in exc.value.message and f"max_text_bytes = {top}" in exc.value.message


def test_max_texts_per_request_is_configurable_below_the_hard_cap_of_4096():
    three = messages.Limits(max_texts_per_request=3)
    assert len(parse_request(frame(texts=["a"] * 3), three).texts) == 3
    with pytest.raises(RequestError) as exc:
        parse_request(frame(texts=["a"] * 4), three)
    assert exc.value.request_id == 7 and "too many texts (4)" in exc.value.message and "at most 3" in exc.value.message
    loose = messages.Limits(max_texts_per_request=5000)     # the config refuses this; the parser holds anyway
    assert "too many texts" in pytest.raises(RequestError, parse_request, frame(texts=["a"] * 4097), loose).value.message


def test_the_worker_limits_let_through_whatever_the_supervisor_may_accept():
    from akidb_embed.supervisor.guard import MAX_FRAME_CEILING
    w = messages.WORKER_LIMITS
    assert w.max_frame_bytes >= MAX_FRAME_CEILING and w.max_text_bytes >= MAX_FRAME_CEILING
    assert w.max_texts_per_request == MAX_TEXTS_PER_REQUEST
    text = "x" * (300 * 2**10)                                 # over the default max_text_bytes
    assert parse_request(frame(texts=[text]), w).texts == [text]


# ---- ids ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", [0, -2**63, 2**64 - 1, "", "x" * 256, "é" * 128])
def test_ids_within_64_bits_or_256_utf8_bytes_are_valid(rid):
    assert messages.valid_id(rid) and messages.echo_id(rid) == rid
    assert parse_request(frame(id=rid)).id == rid


@pytest.mark.parametrize("rid", [-2**63 - 1, 2**64, "x" * 257, "é" * 129, True, 1.5, b"x", None, [1]])
def test_other_ids_are_invalid(rid):
    assert not messages.valid_id(rid)


@pytest.mark.parametrize("rid, echoed", [(True, True), (False, False), (1.5, 1.5), (b"b" * 256, b"b" * 256),
                                         (b"b" * 257, None), ("x" * 257, None), (2**64, None), ([1], None),
                                         ({"a": 1}, None), (None, None)])
def test_an_invalid_id_is_echoed_only_when_it_is_a_short_scalar(rid, echoed):
    got = messages.echo_id(rid)
    assert got == echoed and type(got) is type(echoed)


@pytest.mark.parametrize("rid", [b"b" * 256, "x" * 257, b"b" * 257])
def test_a_wrongly_typed_id_is_refused_with_what_can_be_echoed(rid):
    err = bad(id=rid)
    assert "'id'" in err.message and err.request_id == messages.echo_id(rid)


def test_peek_id_reads_the_id_of_an_unreadable_frame():
    assert messages.peek_id(codec.pack({"v": 1, "id": 9, "op": "x" * 5000})) == 9
    assert messages.peek_id(codec.pack({"v": 1, "id": "s"})[:-1] + b"\xc1") is None     # cut inside the id
    assert messages.peek_id(codec.pack({"id": "x" * 300, "texts": []})) is None         # read, but not an id
    assert messages.peek_id(codec.pack({"id": 1.5}) + b"\xc1") == 1.5
    assert messages.peek_id(b"\xc1") is None


# ---- clip ---------------------------------------------------------------------------------------------

def test_clip_quotes_a_value_and_cuts_it_to_200_characters_saying_how_long_it_was():
    assert messages.CLIP_CHARS == 200
    assert messages.clip(5) == "5" and messages.clip(None) == "None" and messages.clip("ab") == "'ab'"
    assert messages.clip("x" * 198) == repr("x" * 198)                         # 200 characters: whole
    assert messages.clip("x" * 199) == repr("x" * 199)[:200] + "... (201 chars)"
    assert messages.clip("x" * 300) == repr("x" * 300)[:200] + "... (302 chars)"
    assert messages.clip("x" * 800).endswith("... (802 chars)")                 # short enough to repr whole
    assert messages.clip("x" * 801) == repr("x" * 200)[:200] + "... (202 chars)"   # long: only its head is read
    assert messages.clip(b"y" * 10**6) == repr(b"y" * 200)[:200] + "... (203 chars)"
    assert messages.clip(list(range(100))) == repr(list(range(100)))[:200] + "... (390 chars)"
    assert messages.clip("abcd", 3) == "'ab... (6 chars)" and messages.clip("abc", 5) == "'abc'"
    err = bad(op="o" * 10**5)                                                   # an unknown op is quoted clipped
    assert len(err.message) < 400 and "... (202 chars)" in err.message
    assert len(bad(v="9" * 10**5).message) < 400


# ---- embed options ------------------------------------------------------------------------------------

def test_embed_options_at_their_bounds():
    for name in ("prompt", "prompt_name"):
        assert getattr(parse_request(frame(**{name: "p" * 4096})), name) == "p" * 4096
        err = bad(**{name: "p" * 4097})
        assert f"{name!r} is longer than 4096" in err.message and err.request_id == 7
    assert "not both" in bad(prompt="", prompt_name="q").message
    assert parse_request(frame(dimensions=1)).dimensions == 1
    for dims in (0, -3):
        assert "'dimensions' must be a positive" in bad(dimensions=dims).message
    assert parse_request(frame(timeout_ms=1)).timeout_ms == 1
    for side in ("end", "start", "none"):
        assert parse_request(frame(truncate=side)).truncate == side
    assert "end, start, none" in bad(truncate="middle").message
    assert parse_request(frame(deadline_unix_ms=1_700_000_000_000)).deadline_unix_ms == 1_700_000_000_000
    assert "'deadline_unix_ms' must be int" in bad(deadline_unix_ms="soon").message
    assert parse_request(frame(normalize=None, dtype=None, truncate=None)) == EmbedRequest(id=7, texts=["a"])


def test_version_must_be_the_integer_1():
    for v in (True, 1.0, "1", 0):
        assert "version" in bad(v=v).message
    assert parse_request(frame(v=1)).id == 7


def test_a_frame_that_is_not_a_map_is_bad_request_without_an_id():
    for obj in ([7], "id", 7):
        with pytest.raises(RequestError) as exc:
            parse_request(codec.pack(obj))
        assert exc.value.request_id is None and "must be a msgpack map" in exc.value.message
    with pytest.raises(RequestError) as exc:
        parse_request(codec.pack({"v": 1, "id": 3}) + b"\xc1")              # broken after the id
    assert exc.value.request_id == 3 and "not valid msgpack" in exc.value.message


def test_embed_response_carries_per_text_tokens_and_truncated_rows_only_when_given():
    vec = np.zeros((2, 3), dtype=np.float32)
    full = codec.unpack(messages.embed_response(1, vec, dtype="float32", backend="b", model="m", truncated=1,
                                                tokens=[5, 512], truncated_rows=[False, True]))
    assert full["tokens"] == [5, 512] and full["truncated_rows"] == [False, True] and full["truncated"] == 1
    assert codec.unpack(messages.embed_response(1, vec, dtype="float32", backend="b", model="m", truncated=0,
                                                tokens=[], truncated_rows=[]))["tokens"] == []
    bare = codec.unpack(messages.embed_response(1, vec, dtype="float32", backend="b", model="m", truncated=0))
    assert "tokens" not in bare and "truncated_rows" not in bare
    only = codec.unpack(messages.embed_response(1, vec, dtype="float32", backend="b", model="m", truncated=0,
                                                truncated_rows=[False, False]))
    assert "tokens" not in only and only["truncated_rows"] == [False, False]
