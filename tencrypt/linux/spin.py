"""The proxy's event loop selector: epoll that keeps polling a short while before it sleeps.

Why: on an idle proxy every packet first wakes a sleeping process, and on a virtual machine a
wake-up (an interrupt to a halted vCPU, cold caches after it) costs tens of µs, paid at each
of a round trip's four proxy hops. A reply usually comes back within a few hundred µs of the
request, so a proxy that keeps polling for that long after its last event catches it awake.
The kernel's own busy polling (``SO_BUSY_POLL``) does not apply: TUN and veth have no NAPI
queue to poll.

Rules:
1. ``select(timeout)`` first polls without blocking; whatever is ready returns at once. Not
   after ``spin`` without an event (an idle proxy): it blocks at once, as ``spin`` 0 does.
   Whatever that poll could find, the blocking call returns as soon, and nothing it finds
   there can change the budget (rule 3 counts gaps within ``spin`` only); the poll would
   only cost a system call on every first packet after idle (bench/results/cold-path.md).
2. Nothing ready: it polls again, yielding the CPU between polls (``sched_yield``: a runnable
   process on this CPU, e.g. the application it serves, goes first), until an event, the
   caller's ``timeout`` or the end of the window: ``budget`` seconds after the last event.
   Then it blocks for what is left of ``timeout``.
3. The budget adapts, so that polling is spent only where it pays: it starts at ``spin``; a
   window that runs out without an event halves it (below ``spin / 64``: 0, no polling at
   all); an event that wakes the blocked selector ``gap`` seconds after the previous one,
   with ``gap`` within ``spin`` (a longer poll would have caught it), raises it to twice the
   budget or twice the gap, whichever is more, at most ``spin``. A proxy whose packets come
   further apart than ``spin`` therefore soon sleeps at once, and one that answers round
   trips polls through them.
4. ``spin`` 0: plain epoll.
5. ``wait`` (the express lane's, tencrypt/daemon.py): when set, ``select`` is one call of it
   instead of ``select.epoll.poll``: it blocks in C, serves the readiness of the lane's own
   descriptors there (core/express.py, tencrypt/_lane.c ``Lane.wait``) and returns only what
   Python must see, as ``(fd, events)`` pairs, or nothing at ``timeout``. Rules 1-4 then run
   inside it, in C, with ``spin`` (the lane keeps that window's state), on every event
   whoever serves it, but a wake-up that only sent the pod's packets to the network (their
   answers are a network round trip away: no window opens) and one that carried bulk (a TSO
   super-packet or a GRO read of several datagrams: a stream's next readiness comes by
   itself, and polling for it only takes a core from the stream's own ends). The lane's
   packets wake straight into C, and a back-to-back exchange it carries is caught awake as
   before.
"""

from __future__ import annotations

import os
import select
import selectors
import time
from collections.abc import Callable

SelectResult = list[tuple[selectors.SelectorKey, int]]
# rule 5: (epoll fd, timeout in seconds or None, max events) -> [(fd, epoll events)], polling
# within the selector's ``spin`` by rules 1-3 itself
Wait = Callable[[int, float | None, int], list[tuple[int, int]]]


class SpinSelector(selectors.EpollSelector):
    """``selectors.EpollSelector`` with the adaptive polling window above."""

    def __init__(self, spin: float, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.spin = self.budget = spin
        self.clock = clock
        self.last_event = float("-inf")  # when a select last returned something
        self.polls = self.misses = self.grown = 0  # for tests and debugging
        self.wait: Wait | None = None  # rule 5

    def select(self, timeout: float | None = None) -> SelectResult:
        if self.spin <= 0 or self.wait is not None:  # rule 4; rule 5: the wait spins itself
            return self._epoll(timeout)
        now = self.clock()
        if now - self.last_event > self.spin and timeout != 0:  # rule 1: idle, sleep at once
            ready = self._epoll(timeout)
            if ready:
                self.last_event = self.clock()
            return ready
        deadline = None if timeout is None else now + timeout
        ready = self._epoll(0)  # rule 1
        if not ready and timeout != 0:  # rule 2
            until = self.last_event + self.budget
            cut = False
            if deadline is not None and deadline <= until:  # the caller's limit comes first
                until, cut = deadline, True
            spun = now < until
            while not ready and now < until:
                os.sched_yield()
                self.polls += 1
                ready = self._epoll(0)
                now = self.clock()
            if spun and not ready and not cut:
                self._shrink()
            if not ready:
                ready = self._epoll(None if deadline is None else max(0.0, deadline - now))
                now = self.clock()
                if ready and now - self.last_event <= self.spin:
                    self._grow(now - self.last_event)
        if ready:
            self.last_event = now
        return ready

    def _epoll(self, timeout: float | None) -> SelectResult:
        """``EpollSelector.select``, through ``wait`` when one is set (rule 5)."""
        wait = self.wait
        if wait is None:
            return super().select(timeout)
        ready = []
        keys = self.get_map()
        for fd, event in wait(self.fileno(), timeout, max(len(keys), 1)):
            key = keys.get(fd)
            if key is not None:  # as EpollSelector: anything but IN is a write, but OUT a read
                events = (selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
                    selectors.EVENT_READ if event & ~select.EPOLLOUT else 0
                )
                ready.append((key, events & key.events))
        return ready

    def _shrink(self) -> None:
        """Rule 3: a window ran out."""
        self.misses += 1
        self.budget = self.budget / 2 if self.budget / 2 >= self.spin / 64 else 0.0

    def _grow(self, gap: float) -> None:
        """Rule 3: a longer poll would have caught what woke us."""
        self.grown += 1
        self.budget = min(self.spin, 2 * max(self.budget, gap))
