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


# ---- cutting a request into jobs (supervisor/jobs.py) ---------------------------------------------

def test_part_bounds_fill_each_part_up_to_the_limit_exactly() -> None:
    from akidb_embed.supervisor.jobs import part_bounds
    assert part_bounds([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]          # 5 + 5 == 10 still fits
    assert part_bounds([5, 5, 6, 5], 10) == [(0, 2), (2, 3), (3, 4)]
    assert part_bounds([30, 1], 10) == [(0, 1), (1, 2)]               # an oversized text is a part alone
    assert part_bounds([3], 10) == [(0, 1)]


def _request(texts: list[str]):
    from akidb_embed.supervisor.events import Events
    from akidb_embed.supervisor.requests import RequestTable
    table = RequestTable(lambda route, frame: None, Events())
    return table.create([b"peer"], 7, request_frame(7, "embed", texts=texts), texts, "m", 10.0, 0.0)


def test_a_request_within_one_part_is_one_job_carrying_the_client_frame() -> None:
    from akidb_embed.supervisor.jobs import make_jobs
    from akidb_embed.supervisor.passes import estimate_tokens
    texts = ["a" * 36] * 4                                    # 11 estimated tokens each: 44 in all
    assert sum(estimate_tokens(t) for t in texts) == 44
    req = _request(texts)
    [job] = make_jobs(req, 44, 1, 0, 256)
    assert job.frame == req.frame and job.texts == texts and job.cost == 44 and req.parts is None
    assert job.deadline == req.deadline and job.priority == 1
    assert job.index == 0                                     # "0 when it is whole" (jobs.py)


def test_a_larger_request_is_cut_into_parts_in_order() -> None:
    from akidb_embed.supervisor.jobs import make_jobs
    texts = [f"{i:02d}" + "a" * 34 for i in range(4)]            # 11 estimated tokens each
    req = _request(texts)
    jobs = make_jobs(req, 43, 1, 0, 256)
    assert [j.texts for j in jobs] == [texts[:3], texts[3:]]
    assert [j.index for j in jobs] == [0, 1] and [j.cost for j in jobs] == [33, 11]
    assert [unpack(j.frame)["texts"] for j in jobs] == [texts[:3], texts[3:]]
    assert req.parts == [None, None] and req.parts_left == 2
    assert len({j.seq for j in jobs}) == 2


def test_a_single_long_text_is_never_cut_and_queries_are_small_requests_of_quiet_clients() -> None:
    from akidb_embed.supervisor.jobs import make_jobs
    [job] = make_jobs(_request(["x" * 4000]), 10, 1, 0, 256)
    assert job.cost == 512 and job.interactive is False
    assert make_jobs(_request(["a" * 36]), 128, 1, 245, 256)[0].interactive is True     # 11 + 245 == 256
    assert make_jobs(_request(["a" * 36]), 128, 1, 246, 256)[0].interactive is False


def test_one_part_is_its_own_answer_and_a_count_missing_from_a_part_counts_zero() -> None:
    v = np.ones((2, 3), dtype=np.float32)
    one = unpack(assemble_embed_parts(5, [embed_response(9, v, dtype="float32", backend="b", model="m", truncated=2)]))
    assert one["id"] == 5 and one["shape"] == [2, 3] and one["truncated"] == 2
    with_count = embed_response(9, v, dtype="float32", backend="b", model="m", truncated=2)
    without = unpack(embed_response(9, v, dtype="float32", backend="b", model="m", truncated=0))
    without.pop("truncated", None)
    out = unpack(assemble_embed_parts(5, [with_count, pack(without)]))
    assert out["truncated"] == 2 and out["shape"] == [4, 3]
    out = unpack(assemble_embed_parts(5, [pack(without), pack(without)]))
    assert "truncated" not in out                         # a count no part reported is not made up


def test_budget_ms_is_the_time_left_in_whole_milliseconds_and_never_below_one() -> None:
    # docs/protocol.md, worker channel: `budget_ms` (int >= 1, milliseconds left until the deadline)
    from akidb_embed.supervisor.jobs import Job
    job = Job(1, _request(["a"]), 0, b"", ["a"], 1, 1, False, deadline=100.0)
    assert job.budget_ms(98.0) == 2000 and type(job.budget_ms(98.0)) is int
    assert job.budget_ms(99.9995) == 1                        # 0.5 ms left: rounded down, floored at 1
    assert job.budget_ms(99.99) == 10
    assert job.budget_ms(100.0) == 1                          # at or past the deadline the worker still gets 1
    assert job.budget_ms(250.0) == 1
