"""Logging that a flood of bad input cannot turn into a flood of log lines.

Rules:
- Messages are grouped by a caller-chosen ``key`` (a reason, not a per-packet value: use
  ``"dns-malformed-query"``, never the client's address, or the key table becomes the flood).
- The first message of a key is logged; more of the same key within ``per_key_interval``
  seconds are counted, not logged; the next one logged after the interval says how many were
  suppressed in between.
- At most ``max_keys`` keys are remembered; past that the stalest is forgotten (its count of
  suppressed messages is lost, which only costs a line of context).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _KeyState:
    last: float
    suppressed: int = 0


@dataclass(slots=True)
class RateLimitedLog:
    logger: logging.Logger
    per_key_interval: float = 10.0
    max_keys: int = 1024
    clock: Callable[[], float] = time.monotonic
    _keys: dict[Hashable, _KeyState] = field(default_factory=dict)

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` logged less than an interval ago; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        state = self._keys.get(key)
        if state is not None and now - state.last < self.per_key_interval:
            state.suppressed += 1
            return False
        suppressed = state.suppressed if state is not None else 0
        self._remember(key, now)
        if suppressed:
            msg = f"{msg} (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
        return True

    def warn(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def suppressed(self, key: Hashable) -> int:
        state = self._keys.get(key)
        return state.suppressed if state is not None else 0

    def _remember(self, key: Hashable, now: float) -> None:
        self._keys.pop(key, None)  # re-insert: dict order is then least recently logged first
        if len(self._keys) >= self.max_keys:
            del self._keys[next(iter(self._keys))]
        self._keys[key] = _KeyState(now)
