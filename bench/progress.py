"""The benchmark's progress line on stderr."""

from __future__ import annotations

import sys
import time

PACE_DAMPING = 30.0  # seconds


class Progress:
    """One line on stderr: step k of n, what runs, elapsed and an estimate of what is left
    (the plan's nominal seconds, scaled by how the finished steps actually went)."""

    def __init__(self, estimates: list[float]) -> None:
        self.estimates, self.index, self.started = estimates, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.line = ""

    def step(self, label: str) -> None:
        self.index += 1
        elapsed = time.monotonic() - self.started
        done = sum(self.estimates[: self.index - 1])
        # actual/nominal pace of the finished steps, damped so that the first steps (a set-up
        # that took no time, a slow lab) do not swing the estimate
        pace = (elapsed + PACE_DAMPING) / (done + PACE_DAMPING)
        left = sum(self.estimates[self.index - 1 :]) * pace
        n = len(self.estimates)
        self.line = (
            f"bench [{min(self.index, n):>2}/{n}] {label} · {_clock(elapsed)} elapsed"
            f" · ~{_clock(left)} left"
        )
        self._draw()

    def say(self, text: str) -> None:
        self.clear()
        print(text, file=sys.stderr, flush=True)
        if self.tty and self.line:
            self._draw()

    def clear(self) -> None:
        if self.tty and self.line:
            sys.stderr.write("\r\033[K")

    def _draw(self) -> None:
        sys.stderr.write(f"\r\033[K{self.line}" if self.tty else f"{self.line}\n")
        sys.stderr.flush()


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
