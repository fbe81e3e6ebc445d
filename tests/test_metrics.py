"""Prometheus metrics: the `metrics` op and the [metrics] listener, parsed with prometheus_client's parser."""
from __future__ import annotations

import os
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from conftest import poll_until, raw_dealer, recv_answer, running_server

from akidb_embed import EmbedError
from akidb_embed.supervisor.config import ConfigError, build_config

parser = pytest.importorskip("prometheus_client.parser")

CONFIG = """
[metrics]
listen = "127.0.0.1:0"

[supervisor]
restart_backoff_min_s = 0.05

[backends.mock]
kind = "mock"
dim = 8
fail_on = "FAIL"
crash_on = "CRASH"
"""

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("metrics"), CONFIG) as srv:
        yield srv


def op_scrape(server) -> Samples:
    with server.client() as c:
        return parse(c.metrics())


def http_scrape(server) -> Samples:
    listen = server.status()["supervisor"]["metrics_listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(resp.read().decode())


def test_requests_and_batches_counted_by_code(server) -> None:
    before = op_scrape(server)
    with server.client() as c:
        c.embed(["hello world"], backend="mock")                      # 1 text, 2 tokens (mock: one per word)
        c.embed(["one two three"], backend="mock")                    # 1 text, 3 tokens
        c.embed(["a b", "c d e f"], backend="mock")                   # 2 texts, 2 + 4 tokens
        with pytest.raises(EmbedError) as failed:
            c.embed(["FAIL"], backend="mock")
        assert failed.value.code.value == "INTERNAL"
        with pytest.raises(EmbedError) as unknown:
            c.embed(["x"], backend="nope")
        assert unknown.value.code.value == "UNKNOWN_BACKEND"
    sock = raw_dealer(server.endpoint)
    sock.send(b"\xc1 not msgpack")
    assert recv_answer(sock)["error"]["code"] == "BAD_REQUEST"
    sock.close()
    for after in (op_scrape(server), http_scrape(server)):   # both expositions carry the same counters
        def delta(name: str, after: Samples = after, **labels: str) -> float:
            return moved(before, after, name, **labels)
        assert delta("akidb_embed_requests_total", backend="mock", code="ok") == 3
        assert delta("akidb_embed_requests_total", backend="mock", code="INTERNAL") == 1
        assert delta("akidb_embed_requests_total", backend="", code="UNKNOWN_BACKEND") == 1
        assert delta("akidb_embed_requests_total", backend="", code="BAD_REQUEST") == 1
        assert delta("akidb_embed_request_duration_seconds_count", backend="mock") == 4
        assert delta("akidb_embed_queue_duration_seconds_count", backend="mock") == 4
        assert delta("akidb_embed_request_duration_seconds_sum", backend="mock") > 0
        assert delta("akidb_embed_request_duration_seconds_bucket", backend="mock", le="+Inf") == 4
        # one forward pass per successful request (the client waits for each answer); FAIL's pass raised
        assert delta("akidb_embed_batch_texts_count", backend="mock") == 3
        assert delta("akidb_embed_batch_texts_sum", backend="mock") == 4
        assert delta("akidb_embed_batch_tokens_sum", backend="mock") == 2 + 3 + 2 + 4
        assert delta("akidb_embed_inference_duration_seconds_count", backend="mock") == 3
        assert value(after, "akidb_embed_backend_state", backend="mock", state="READY") == 1
        assert value(after, "akidb_embed_backend_state", backend="mock", state="FAILED") == 0
        assert value(after, "akidb_embed_queue_depth", backend="mock") == 0
        assert value(after, "akidb_embed_in_flight", backend="mock") == 0


def test_sigkilled_worker_counted_as_restart(server) -> None:
    status = server.status()["backends"]["mock"]
    old = status["workers"][0]
    before = op_scrape(server)
    assert value(before, "akidb_embed_worker_rss_bytes", backend="mock", wid=old["wid"]) > 1e6
    os.kill(old["pid"], signal.SIGKILL)

    def restarted() -> Samples | None:   # judged on one scrape: the op answers from one consistent state
        now = op_scrape(server)
        ready = value(now, "akidb_embed_backend_state", backend="mock", state="READY") == 1
        gone = ("akidb_embed_worker_rss_bytes", frozenset({"backend": "mock", "wid": old["wid"]}.items())) not in now
        return now if ready and gone else None
    after = poll_until(restarted, timeout=30, interval=0.1)
    assert (value(after, "akidb_embed_worker_restarts_total", backend="mock", reason="crash")
            - value(before, "akidb_embed_worker_restarts_total", backend="mock", reason="crash")) == 1
    new = server.status()["backends"]["mock"]["workers"][0]["wid"]
    assert value(after, "akidb_embed_worker_rss_bytes", backend="mock", wid=new) > 1e6
    # the listener's gauges follow within about a second (its snapshot is refreshed by the event loop)
    poll_until(lambda: value(http_scrape(server), "akidb_embed_worker_rss_bytes", backend="mock", wid=new) > 0,
               timeout=10, interval=0.2)


def test_poison_input_quarantined_and_counted(server) -> None:
    before = op_scrape(server)
    with server.client() as c, pytest.raises(EmbedError) as poison:
        c.embed(["CRASH"], backend="mock", timeout=20)
    assert poison.value.code.value == "POISON_INPUT"
    server.wait_ready(30)
    after = op_scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("akidb_embed_requests_total", backend="mock", code="POISON_INPUT") == 1
    assert delta("akidb_embed_worker_restarts_total", backend="mock", reason="crash") == 2   # first run + alone
    assert value(after, "akidb_embed_quarantined_inputs") == 1
    with server.client() as c, pytest.raises(EmbedError):
        c.embed(["CRASH"], backend="mock")          # refused at once, before any worker
    again = op_scrape(server)
    assert (value(again, "akidb_embed_requests_total", backend="mock", code="POISON_INPUT")
            - value(after, "akidb_embed_requests_total", backend="mock", code="POISON_INPUT")) == 1


def test_metrics_listen_validated() -> None:
    for bad in ("9464", "localhost", "127.0.0.1:http", 9464, "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="metrics.listen"):
            build_config({"metrics": {"listen": bad}}, "x.toml", env={})
    with pytest.raises(ConfigError, match="unknown key metrics.port"):
        build_config({"metrics": {"port": 1}}, "x.toml", env={})
    assert build_config({}, "x.toml", env={}).metrics_listen is None     # off unless configured


def test_metrics_port_in_use_refused(serve, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        srv = serve(f'[metrics]\nlisten = "127.0.0.1:{port}"\n[backends.mock]\nkind = "mock"\n', ready=False)
        assert srv.proc.wait(30) == 2
        assert "metrics.listen" in srv.log()
        assert not srv.children()
    finally:
        taken.close()
