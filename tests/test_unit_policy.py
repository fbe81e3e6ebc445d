"""RestartPolicy as pure logic: backoff growth and cap, the crash window, reset on ready."""
from __future__ import annotations

import pytest

# The one place this file names production classes (the supervisor rebuild only changes this import).
from akidb_embed.supervisor.config import Policy
from akidb_embed.supervisor.policy import RestartPolicy


def make(**kw) -> RestartPolicy:
    kw.setdefault("restart_backoff_min_s", 0.1)
    kw.setdefault("restart_backoff_max_s", 1.0)
    kw.setdefault("restart_max", 100)
    kw.setdefault("restart_window_s", 60.0)
    return RestartPolicy(Policy(**kw))


def test_backoff_doubles_per_consecutive_crash_up_to_the_cap():
    p = make()
    delays = [p.record_crash(float(i)) for i in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_first_delay_is_the_minimum_and_ready_resets_the_backoff():
    p = make()
    assert p.record_crash(0.0) == pytest.approx(0.1)
    assert p.record_crash(1.0) == pytest.approx(0.2)
    p.record_ready()
    assert p.record_crash(2.0) == pytest.approx(0.1)


def test_more_than_restart_max_crashes_within_the_window_fail():
    p = make(restart_max=3, restart_window_s=10.0)
    assert [p.record_crash(t) is not None for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert p.record_crash(3.0) is None          # the 4th within 10 s: FAILED


def test_exactly_restart_max_crashes_are_allowed():
    p = make(restart_max=2, restart_window_s=10.0)
    assert p.record_crash(0.0) is not None
    assert p.record_crash(1.0) is not None
    assert p.record_crash(2.0) is None


def test_crashes_outside_the_window_do_not_count():
    p = make(restart_max=2, restart_window_s=10.0)
    assert p.record_crash(0.0) is not None
    p.record_ready()                             # workers came up in between: only the window counts
    assert p.record_crash(5.0) is not None
    p.record_ready()
    # 0.0 is now 10.5 s old: out of the window, so this is the 2nd crash in it, not the 3rd
    assert p.record_crash(10.5) is not None
    p.record_ready()
    assert p.record_crash(11.0) is None          # 5.0, 10.5, 11.0: three within 10 s


def test_more_than_restart_max_consecutive_failed_starts_fail_whatever_the_window():
    p = make(restart_max=2, restart_window_s=1.0)
    assert p.record_crash(0.0) is not None
    assert p.record_crash(100.0) is not None     # far apart: the window alone would never fill
    assert p.record_crash(200.0) is None         # the 3rd crash with no worker ready in between
    p.reset()
    assert p.record_crash(300.0) is not None


def test_a_ready_worker_resets_the_consecutive_count():
    p = make(restart_max=2, restart_window_s=1.0)
    for t in (0.0, 100.0, 200.0, 300.0):
        assert p.record_crash(t) is not None
        p.record_ready()


def test_a_crash_exactly_at_the_window_edge_still_counts():
    p = make(restart_max=1, restart_window_s=10.0)
    assert p.record_crash(0.0) is not None
    p.record_ready()                             # not the consecutive-start cap: the window alone
    assert p.record_crash(10.0) is None          # 0.0 is exactly 10 s old: still in the window
    q = make(restart_max=1, restart_window_s=10.0)
    assert q.record_crash(0.0) is not None
    q.record_ready()
    assert q.record_crash(10.01) is not None     # just past it: forgotten


def test_reset_forgets_crashes_and_backoff():
    p = make(restart_max=1, restart_window_s=100.0)
    p.record_crash(0.0)
    p.record_crash(1.0)
    p.reset()
    assert p.record_crash(2.0) == pytest.approx(0.1)
