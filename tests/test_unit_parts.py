"""A large request cut into parts and its parts' answers assembled into one answer."""
from __future__ import annotations

import numpy as np

from akidb_embed.protocol.codec import pack, unpack
from akidb_embed.protocol.errors import Timeout
from akidb_embed.protocol.messages import (
    assemble_embed_parts,
    embed_part_frames,
    embed_response,
    error_response,
    request_frame,
)


def test_parts_keep_every_field_and_slice_the_texts() -> None:
    frame = request_frame(7, "embed", texts=[f"t{i}" for i in range(10)], backend="b", normalize=False,
                          priority="low", dtype="float16")
    parts = [unpack(f) for f in embed_part_frames(frame, [(0, 4), (4, 9), (9, 10)])]
    assert [p["texts"] for p in parts] == [["t0", "t1", "t2", "t3"], ["t4", "t5", "t6", "t7", "t8"], ["t9"]]
    for p in parts:
        assert (p["id"], p["backend"], p["normalize"], p["priority"], p["dtype"]) == (7, "b", False, "low", "float16")


def test_answers_are_concatenated_in_order_with_counts_summed_and_row_lists_joined() -> None:
    rng = np.random.default_rng(0)
    vecs = [rng.standard_normal((n, 5)).astype(np.float32) for n in (3, 1, 2)]
    answers = []
    for i, v in enumerate(vecs):
        msg = unpack(embed_response(99, v, dtype="float32", backend="b", model="m", truncated=i))
        msg["tokens"] = [10 * i + r for r in range(v.shape[0])]
        answers.append(pack(msg))
    out = unpack(assemble_embed_parts(1, answers))
    assert out["id"] == 1 and out["ok"] is True and out["shape"] == [6, 5]
    assert out["truncated"] == 0 + 1 + 2
    assert out["tokens"] == [0, 1, 2, 10, 20, 21]
    got = np.frombuffer(out["data"], "<f4").reshape(6, 5)
    assert np.array_equal(got, np.concatenate(vecs))


def test_the_first_error_among_the_parts_is_the_answer() -> None:
    ok = embed_response(5, np.zeros((1, 2), np.float32), dtype="float32", backend="b", model="m", truncated=0)
    out = unpack(assemble_embed_parts(5, [ok, error_response(5, Timeout("late")), ok]))
    assert out["id"] == 5 and out["ok"] is False and out["error"]["code"] == "TIMEOUT"


def test_parts_with_different_shapes_are_an_internal_error() -> None:
    a = embed_response(5, np.zeros((1, 2), np.float32), dtype="float32", backend="b", model="m", truncated=0)
    b = embed_response(5, np.zeros((1, 3), np.float32), dtype="float32", backend="b", model="m", truncated=0)
    out = unpack(assemble_embed_parts(5, [a, b]))
    assert out["ok"] is False and out["error"]["code"] == "INTERNAL"
