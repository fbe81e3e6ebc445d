"""Batching correctness (no timing assertions): every request gets its own vectors, in order, whatever
the grouping; plan_groups covers every text once within its limits; and `akidb-embed bench` runs."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading

import numpy as np
import pytest

from akidb_embed.workers.backends.mock import mock_vector
from akidb_embed.workers.batching import Slot, plan_groups

DIM = 16


# ---- plan_groups -------------------------------------------------------------------------------

def _check_plan(lengths: list[tuple[Slot, int]], groups: list[list[Slot]], max_size: int, max_tokens: int) -> None:
    length_of = dict(lengths)
    planned = [slot for group in groups for slot in group]
    assert sorted(planned, key=lambda s: (s.job, s.row)) == sorted(length_of, key=lambda s: (s.job, s.row))
    assert len(planned) == len(set(planned)), "a slot planned twice"
    for group in groups:
        assert group, "an empty group"
        assert len(group) <= max_size
        longest = max(length_of[s] for s in group)
        assert longest * len(group) <= max_tokens or len(group) == 1, "padded cost over max_batch_tokens"
    flat = [length_of[s] for s in planned]
    assert flat == sorted(flat), "texts not sorted by length across the groups"


@pytest.mark.parametrize("seed", range(20))
def test_plan_groups_random(seed: int) -> None:
    rng = random.Random(seed)
    jobs = rng.randint(1, 40)
    lengths = [(Slot(j, r), rng.choice([rng.randint(3, 20), rng.randint(30, 120), rng.randint(200, 600)]))
               for j in range(jobs) for r in range(rng.randint(1, 6))]
    max_size, max_tokens = rng.choice([1, 2, 4, 8, 32, 64]), rng.choice([64, 256, 1024, 4096])
    _check_plan(lengths, plan_groups(lengths, max_size, max_tokens), max_size, max_tokens)


def test_plan_groups_edges() -> None:
    assert plan_groups([], 32, 4096) == []
    one = [(Slot(0, 0), 10)]
    assert plan_groups(one, 32, 4096) == [[Slot(0, 0)]]
    # a single text over max_batch_tokens still runs, alone
    big = [(Slot(0, 0), 5000), (Slot(1, 0), 5)]
    groups = plan_groups(big, 32, 4096)
    _check_plan(big, groups, 32, 4096)
    assert groups == [[Slot(1, 0)], [Slot(0, 0)]]
    # equal lengths: cut by max_batch_size exactly
    same = [(Slot(j, 0), 10) for j in range(10)]
    assert [len(g) for g in plan_groups(same, 4, 4096)] == [4, 4, 2]
    # cut by tokens: 10 tokens each, at most 30 padded tokens -> groups of 3
    assert [len(g) for g in plan_groups(same, 32, 30)] == [3, 3, 3, 1]


# ---- end to end through the supervisor (mock backend) ----------------------------------------------

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def _text(rng: random.Random, tag: str) -> str:
    n = rng.choice([rng.randint(1, 6), rng.randint(20, 60), rng.randint(100, 200)])
    return tag + " " + " ".join(rng.choice(WORDS) for _ in range(n))


def _expected(texts: list[str], normalize: bool = True) -> np.ndarray:
    out = np.stack([mock_vector(t, DIM) for t in texts])
    if normalize:
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out


CONFIG = f"""
    [backends.m]
    kind = "mock"
    dim = {DIM}
    delay_ms = 3
    max_batch_size = 4
    max_batch_tokens = 120
"""


def test_each_request_gets_its_own_vectors_in_order(serve) -> None:
    """Threads with blocking clients, mixed lengths and counts: every answer matches its own texts."""
    server = serve(CONFIG)
    failures: list[str] = []

    def client_thread(k: int) -> None:
        rng = random.Random(k)
        try:
            with server.client(timeout=30) as c:
                for i in range(12):
                    texts = [_text(rng, f"t{k}.{i}.{r}") for r in range(rng.randint(1, 7))]
                    normalize = rng.random() < 0.8
                    got = c.embed(texts, normalize=normalize)
                    if got.shape != (len(texts), DIM) or not np.allclose(got, _expected(texts, normalize),
                                                                         rtol=1e-5, atol=1e-6):
                        failures.append(f"client {k} request {i}: wrong vectors")
        except Exception as exc:  # reported below; a thread must not die silently
            failures.append(f"client {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread is still running"
    assert not failures, failures[:5]


def test_async_client_many_requests_in_flight(serve) -> None:
    """One AsyncClient, 48 concurrent requests on one socket, duplicates included: all answered, matched."""
    from akidb_embed import AsyncClient

    server = serve(CONFIG)
    rng = random.Random(7)
    requests = [[_text(rng, f"a{i}.{r}") for r in range(rng.randint(1, 5))] for i in range(48)]
    requests += [requests[0], requests[1]]   # same texts twice in the same batch

    async def main() -> list[np.ndarray]:
        async with AsyncClient(server.endpoint, timeout=30) as c:
            return await asyncio.gather(*(c.embed(texts) for texts in requests))

    results = asyncio.run(main())
    assert len(results) == len(requests)
    for texts, got in zip(requests, results):
        assert got.shape == (len(texts), DIM)
        assert np.allclose(got, _expected(texts), rtol=1e-5, atol=1e-6)
    status = server.status()["backends"]["m"]
    assert status["served"] >= len(requests)
    assert status["queue"] == 0 and status["in_flight"] == 0


# ---- the bench command -------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_mock_smoke(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "bench", "--kind", "mock", "--requests", "50",
                           "--duration", "5", "--warmup", "5", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in-process" in proc.stdout and "bridge" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["kind"] == "mock"
    assert result["inprocess"]["short_seq"]["ok"] == 50
    for phase in ("short_seq", "c1", "c16", "c64"):
        assert result["bridge"][phase]["errors"] == 0, result["bridge"][phase]["error_samples"]
        assert result["bridge"][phase]["ok"] == 50
    assert result["bridge"]["supervisor_peak_rss_mb"] > 0
    assert result["ratios"]["bridge"]["c64_throughput"] is not None
    assert {t["target"] for t in result["targets"]} >= {"supervisor peak RSS <= 80 MB"}


def test_bench_corpus_is_deterministic() -> None:
    from akidb_embed.bench import corpus
    a, b = corpus("short", 100), corpus("short", 100)
    assert a == b and len(set(a)) > 90
    assert all(3 <= len(t.split()) <= 17 for t in a)
    assert all(33 <= len(t.split()) <= 96 for t in corpus("medium", 100))
