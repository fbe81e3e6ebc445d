"""Pass sizing: short passes while interactive work is around, efficient ones otherwise."""
from __future__ import annotations

from akidb_embed.supervisor.passes import PassSizer, estimate_tokens


def test_token_estimate_grows_with_length_and_is_capped() -> None:
    assert estimate_tokens("") == 2
    assert estimate_tokens("x" * 400) == 102
    assert estimate_tokens("x" * 100_000, max_tokens=512) == 512


def test_passes_are_full_size_until_interactive_work_is_seen() -> None:
    s = PassSizer(max_batch_tokens=4096, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(1000, 0.2)                       # 0.2 ms per token
    assert s.budget(now=10.0) == 4096
    s.note_interactive(now=10.0)
    assert s.budget(now=10.5) == 150           # 30 ms / 0.2 ms
    assert s.budget(now=12.0) == 4096          # the window has passed


def test_short_passes_do_not_teach_the_rate_and_the_rate_is_a_moving_mean() -> None:
    s = PassSizer(max_batch_tokens=4096, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(8, 0.05)                         # one short query: fixed cost, ignored
    assert s.s_per_token is None
    s.observe(100, 0.1)
    s.observe(100, 0.2)
    assert s.s_per_token is not None and 0.001 < s.s_per_token < 0.002
    s.note_interactive(0.0)
    assert 1 <= s.budget(0.0) <= 30
