"""linux/spin.py: the proxy's selector polls within its window after an event, never at idle,
and never past the caller's timeout. A counting clock makes the window deterministic; no test
asserts how long anything took."""

from __future__ import annotations

import select
import selectors
import socket
import threading
from collections.abc import Iterator

import pytest

from tencrypt.linux.spin import SpinSelector

MS = 1 / 1024  # a binary fraction: the counting clock's sums stay exact


class Ticks:
    """A clock that advances ``step`` seconds per reading."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1024.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def selector(spin: float, a: socket.socket, clock: Ticks | None = None) -> SpinSelector:
    sel = SpinSelector(spin, clock or Ticks(MS))
    sel.register(a, selectors.EVENT_READ)
    return sel


def woken(sel: SpinSelector, b: socket.socket, data: bytes) -> list[object]:
    """What ``select(None)`` returns while a timer thread soon sends ``data`` to its socket."""
    writer = threading.Timer(0.01, b.send, (data,))
    writer.start()
    try:
        return [key.fileobj for key, _ in sel.select(None)]
    finally:
        writer.cancel()


def test_ready_events_return_at_once_without_polling(pair):
    a, b = pair
    sel = selector(10.0, a)
    b.send(b"x")
    assert [key.fileobj for key, _ in sel.select(None)] == [a]
    assert sel.polls == 0


def test_an_idle_proxy_sleeps_at_once(pair):
    """No event yet: no window, so no polling, only the caller's timeout."""
    a, _b = pair
    sel = selector(10.0, a)
    assert sel.select(0.01) == [] and sel.polls == 0


def test_after_an_event_it_polls_until_the_window_ends_then_sleeps(pair):
    a, b = pair
    clock = Ticks(MS)
    sel = selector(5 * MS, a, clock)
    b.send(b"x")
    assert sel.select(None)
    a.recv(1)
    assert sel.select(0.05) == []  # the window ends long before the timeout
    assert sel.polls == 4  # ticks 2..5 after the event; the sixth reading ends it


def test_the_window_never_outlasts_the_timeout(pair):
    a, b = pair
    sel = selector(1000.0, a, Ticks(MS))
    b.send(b"x")
    assert sel.select(None)
    a.recv(1)
    assert sel.select(3 * MS) == [] and sel.polls == 3  # one per tick of the timeout
    before = sel.polls
    assert sel.select(0) == [] and sel.polls == before  # a zero timeout only looks


def test_an_event_during_the_window_is_caught_awake(pair):
    a, b = pair
    sel = selector(600.0, a, Ticks(0.0))  # a window that never ends by itself
    b.send(b"x")
    assert sel.select(None)
    a.recv(1)
    assert woken(sel, b, b"y") == [a]
    assert sel.polls > 0


def test_spin_zero_is_plain_epoll(pair):
    a, b = pair
    sel = selector(0.0, a)
    b.send(b"x")
    assert sel.select(None)
    a.recv(1)
    assert sel.select(0.01) == [] and sel.polls == 0


def event(sel: SpinSelector, a: socket.socket, b: socket.socket) -> None:
    """One event seen by a non-blocking select (the window's reference point), then drained."""
    b.send(b"x")
    assert sel.select(0)
    a.recv(1)


def test_windows_that_run_out_halve_the_budget_until_no_polling_is_left(pair):
    """Rule 3: packets further apart than the window soon cost no polling at all."""
    a, b = pair
    sel = selector(64 * MS, a, Ticks(MS))
    budgets = []
    for _ in range(8):
        event(sel, a, b)
        sel.select(100 * MS)  # a timeout beyond the window: the window runs out first
        budgets.append(sel.budget / MS)
    # a window of one tick is over before the next select reads the clock: never polled
    assert budgets == [32, 16, 8, 4, 2, 1, 1, 1] and sel.misses == 6
    before = sel.polls
    event(sel, a, b)
    assert sel.select(100 * MS) == [] and sel.polls == before  # asleep at once


def test_a_wake_up_a_poll_would_have_caught_restores_the_budget(pair):
    a, b = pair
    clock = Ticks(MS)
    sel = selector(64 * MS, a, clock)
    sel.budget = 0.0  # decayed by sparse traffic
    event(sel, a, b)  # at tick 1; the blocked select reads ticks 2 and 3: a gap of 2
    assert woken(sel, b, b"y") == [a]
    assert sel.grown == 1 and sel.budget == 4 * MS  # twice the gap
    clock.step = 100 * MS  # a wake-up further apart than spin changes nothing
    event(sel, a, b)
    assert woken(sel, b, b"z") == [a]
    assert sel.grown == 1


def test_idle_past_spin_it_blocks_without_a_poll_first(pair, monkeypatch):
    """Rule 1: after ``spin`` without an event one epoll call, the blocking one; within
    ``spin`` of the last event the non-blocking poll still comes first."""
    a, b = pair
    timeouts: list[float | None] = []
    real = selectors.EpollSelector.select

    def counted(self, timeout=None):
        timeouts.append(timeout)
        return real(self, timeout)

    monkeypatch.setattr(selectors.EpollSelector, "select", counted)
    clock = Ticks(MS)
    sel = selector(4 * MS, a, clock)
    sel.budget = 0.0  # decayed by sparse traffic: no window
    event(sel, a, b)
    timeouts.clear()
    assert woken(sel, b, b"x") == [a]  # one tick after the event: within spin
    assert timeouts[0] == 0 and timeouts[-1] is None
    a.recv(1)
    clock.now += 10 * MS  # idle for longer than spin
    timeouts.clear()
    assert woken(sel, b, b"y") == [a]
    assert timeouts == [None]  # no poll first
    assert sel.grown == 1  # the first wake-up (a gap within spin) only
    a.recv(1)
    clock.now += 10 * MS
    timeouts.clear()
    assert sel.select(0.01) == [] and timeouts == [0.01]


@pytest.mark.parametrize("spin", [0.0, 4 * MS])
def test_rule_5_a_wait_takes_every_epoll_call_and_what_it_returns_is_the_result(pair, spin):
    a, b = pair
    sel = selector(spin, a)
    calls: list[tuple[int, float | None, int]] = []
    answers = [[], [(a.fileno(), select.EPOLLIN)], [(a.fileno(), select.EPOLLOUT), (999, 1)]]

    def wait(epfd: int, timeout: float | None, maxevents: int) -> list[tuple[int, int]]:
        calls.append((epfd, timeout, maxevents))
        return answers.pop(0) if answers else []

    sel.wait = wait
    b.send(b"x")  # ready, but the wait decides what the loop sees: the lane served it
    assert sel.select(0) == []
    assert calls == [(sel.fileno(), 0, 1)]
    [(key, events)] = sel.select(0)
    assert key.fileobj is a and events == selectors.EVENT_READ
    [(key, events)] = sel.select(0)  # as EpollSelector: a write it did not ask for is 0
    assert key.fileobj is a and events == 0  # and fd 999, registered nowhere, is left out
    sel.wait = None
    [(key, _)] = sel.select(0)  # plain epoll again: the byte is still there
    assert key.fileobj is a
    sel.close()
