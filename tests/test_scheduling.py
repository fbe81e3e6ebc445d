"""Scheduling through a real supervisor: fair share between clients, priorities, split requests.

Timing comes from the mock's per-pass delay; the assertions are about the order in which answers
complete, never about wall-clock bounds.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from akidb_embed import AsyncClient, Client
from conftest import poll_until

LONG = "word " * 300          # ~1,500 characters: a bulk-sized single text (more than interactive_tokens)


def _in_flight(server, backend: str) -> int:
    return server.status()["backends"][backend]["in_flight"]


def _held(server, backend: str) -> int:
    """Requests the server holds for a backend: waiting, or handed to a worker."""
    st = server.status()["backends"][backend]
    return st["queue"] + st["in_flight"]


async def _gather_in_order(calls: dict[str, object]) -> list[str]:
    """Await every call; return their names in the order they completed."""
    order: list[str] = []

    async def one(name: str, coro) -> None:
        await coro
        order.append(name)
    await asyncio.gather(*(one(n, c) for n, c in calls.items()))
    return order


def test_a_query_is_served_after_about_one_pass_of_a_flood(serve) -> None:
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 40
    """)
    bulk_texts = [f"bulk text number {i} with a few more words" for i in range(16)]

    async def scenario() -> tuple[int, int]:
        async with AsyncClient(server.endpoint) as bulk, AsyncClient(server.endpoint) as query:
            done: list[str] = []

            async def bulk_call(i: int) -> None:
                await bulk.embed(bulk_texts, backend="m", timeout=60)
                done.append(f"bulk{i}")
            flood = [asyncio.ensure_future(bulk_call(i)) for i in range(40)]
            await asyncio.to_thread(poll_until, lambda: _held(server, "m") >= 30, 30)
            for _ in range(3000):           # let the ingest run for a while (bounded: 30 s)
                if len(done) >= 2:
                    break
                await asyncio.sleep(0.01)
            before = len(done)
            await query.embed(["where is my answer"], backend="m", timeout=60)
            after = len(done)
            await asyncio.gather(*flood)
            return before, after
    before, after = asyncio.run(scenario())
    # FIFO would make the query wait for ~38 bulk requests; fair share serves it next
    # (behind at most the pass running and the one handed over before it arrived)
    assert after - before <= 3, (before, after)


def test_high_before_normal_before_low_when_the_worker_is_busy(serve) -> None:
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 150
        max_batch_size = 1
    """)

    async def scenario() -> list[str]:
        clients = [AsyncClient(server.endpoint) for _ in range(5)]
        try:
            blockers = [asyncio.ensure_future(clients[i].embed([LONG + str(i)], backend="m", timeout=60))
                        for i in range(1)]
            await asyncio.to_thread(poll_until, lambda: _in_flight(server, "m") == 1, 30)
            calls = {"low": clients[2].embed([LONG + "l"], backend="m", priority="low", timeout=60),
                     "normal": clients[3].embed([LONG + "n"], backend="m", timeout=60),
                     "high": clients[4].embed([LONG + "h"], backend="m", priority="high", timeout=60)}
            order = await _gather_in_order(calls)
            await asyncio.gather(*blockers)
            return order
        finally:
            for c in clients:
                await c.close()
    assert asyncio.run(scenario()) == ["high", "normal", "low"]


def test_low_still_completes_while_high_work_keeps_arriving(serve) -> None:
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 20
        max_batch_size = 1
    """)

    async def scenario() -> tuple[int, int]:
        async with AsyncClient(server.endpoint) as high, AsyncClient(server.endpoint) as low:
            done: list[str] = []

            async def high_stream(k: int) -> None:
                for i in range(40):          # 4 streams keep high work queued the whole time
                    await high.embed([LONG + f"h{k}.{i}"], backend="m", priority="high", timeout=60)
                    done.append("high")
            streams = [asyncio.ensure_future(high_stream(k)) for k in range(4)]
            await asyncio.to_thread(poll_until, lambda: server.status()["backends"]["m"]["queue"] >= 2, 30)
            await low.embed([LONG + "low"], backend="m", priority="low", timeout=60)
            served_high = len(done)
            await asyncio.gather(*streams)
            return served_high, len(done)
    served_high, total = asyncio.run(scenario())
    assert served_high < total - 40, (served_high, total)   # low did not wait for the high streams to end


def test_backend_default_priority_applies_to_requests_that_name_none(serve) -> None:
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 150
        max_batch_size = 1
        default_priority = "low"
    """)

    async def scenario() -> list[str]:
        clients = [AsyncClient(server.endpoint) for _ in range(4)]
        try:
            blockers = [asyncio.ensure_future(clients[i].embed([LONG + str(i)], backend="m", timeout=60))
                        for i in range(1)]
            await asyncio.to_thread(poll_until, lambda: _in_flight(server, "m") == 1, 30)
            calls = {"default": clients[2].embed([LONG + "d"], backend="m", timeout=60),
                     "normal": clients[3].embed([LONG + "n"], backend="m", priority="normal", timeout=60)}
            order = await _gather_in_order(calls)
            await asyncio.gather(*blockers)
            return order
        finally:
            for c in clients:
                await c.close()
    assert asyncio.run(scenario()) == ["normal", "default"]


def test_an_unknown_priority_is_a_bad_request(serve) -> None:
    from akidb_embed import EmbedError
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
    """)
    with server.client() as c, pytest.raises(EmbedError) as err:
        c.embed(["x"], backend="m", priority="urgent")
    assert err.value.code.value == "BAD_REQUEST" and "priority" in err.value.message


@pytest.mark.parametrize("kind,model", [
    ("mock", "mock"),
    pytest.param("onnx", "sentence-transformers/all-MiniLM-L6-v2", marks=pytest.mark.slow),   # a real backend
])
def test_a_4096_text_request_split_into_parts_equals_one_pass(serve, kind: str, model: str) -> None:
    """Vectors, order and truncation of a split request are those of the same texts run unsplit."""
    # short texts and a short limit: the 4,096 texts are the point, not their length (a real model's cost)
    max_tokens = "max_tokens = 2" if kind == "mock" else "max_seq_length = 4"
    server = serve(f"""
        [backends.split]
        kind = "{kind}"
        model = "{model}"
        {max_tokens}
        part_tokens = 64

        [backends.whole]
        kind = "{kind}"
        model = "{model}"
        {max_tokens}
        part_tokens = 100000000
        max_batch_size = 4096
        max_batch_tokens = 100000000
    """, timeout=300)
    rng = np.random.default_rng(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(4096)]
    with Client(server.endpoint) as c:
        split = c.embed_result(texts, backend="split", timeout=300)
        whole = c.embed_result(texts, backend="whole", timeout=300)
    assert split.vectors.shape == (4096, whole.vectors.shape[1])
    assert split.truncated == whole.truncated > 0
    cos = np.sum(split.vectors * whole.vectors, axis=1)
    assert cos.min() >= 0.9999, cos.min()


def test_split_request_survives_a_worker_kill_and_isolates_a_poison_part(serve) -> None:
    """Retry once and poison isolation work per part: a killed worker's parts are re-run; the part
    holding a poison text is found, and only its request gets POISON_INPUT."""
    import os
    import signal

    from akidb_embed import EmbedError
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 30
        part_tokens = 16
        replicas = 2
        crash_on = "POISON"
    """)
    texts = [f"split text {i} " + "pad " * 5 for i in range(200)]
    with Client(server.endpoint) as c:
        whole = c.embed(texts, backend="m", timeout=60)
    assert whole.shape == (200, 8)

    async def scenario() -> tuple[object, object]:
        async with AsyncClient(server.endpoint) as a, AsyncClient(server.endpoint) as b:
            good = asyncio.ensure_future(a.embed(texts, backend="m", timeout=60))
            await asyncio.to_thread(poll_until, lambda: _in_flight(server, "m") > 0, 30)
            os.kill(server.worker_pids("m")[0], signal.SIGKILL)
            bad = asyncio.ensure_future(b.embed(texts[:50] + ["POISON"] + texts[50:100], backend="m", timeout=60))
            results = await asyncio.gather(good, bad, return_exceptions=True)
            return results[0], results[1]
    good, bad = asyncio.run(scenario())
    assert isinstance(good, np.ndarray) and np.array_equal(good, whole)
    assert isinstance(bad, EmbedError) and bad.code.value == "POISON_INPUT", bad
    with Client(server.endpoint) as c:
        assert np.array_equal(c.embed(texts, backend="m", timeout=60), whole)
