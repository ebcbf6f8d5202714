"""Sliding anti-replay window over 64-bit message counters (RFC 6479's idea, one big integer).

Rules:
- A counter is fresh if it was never marked and is within ``WINDOW`` of the highest counter
  marked so far (``top - counter < WINDOW``); anything higher than ``top`` is always fresh.
  Packets reordered by up to ``WINDOW - 1`` positions are accepted, each at most once.
- ``check`` answers "is it fresh" without changing anything: it runs before the AEAD.
  ``update`` marks a counter: it runs only after the tag verified, otherwise a forged datagram
  with a huge counter would slide the window and make every genuine packet "too old".
- RFC 6479 keeps a ring of machine words to avoid shifting; in Python one arbitrary-precision
  int shifted by the advance is fewer bytecodes and the same memory (WINDOW bits).
"""

from __future__ import annotations

WINDOW = 4096  # bits; the design asks for at least 2048 packets of reordering tolerance
_MASK = (1 << WINDOW) - 1


class ReplayWindow:
    """Bit ``i`` of ``bitmap`` says counter ``top - i`` was seen."""

    __slots__ = ("top", "bitmap")

    def __init__(self) -> None:
        self.top = -1  # nothing seen yet
        self.bitmap = 0

    def check(self, counter: int) -> bool:
        diff = self.top - counter
        if diff < 0:
            return True
        if diff >= WINDOW:
            return False
        return not (self.bitmap >> diff) & 1

    def update(self, counter: int) -> None:
        diff = self.top - counter
        if diff < 0:
            # A jump of WINDOW or more forgets everything; never shift by it (counters are 64-bit:
            # ``bitmap << 2**60`` would try to allocate an exabyte).
            self.bitmap = 1 if -diff >= WINDOW else ((self.bitmap << -diff) | 1) & _MASK
            self.top = counter
        elif diff < WINDOW:
            self.bitmap |= 1 << diff

    def check_and_update(self, counter: int) -> bool:
        if not self.check(counter):
            return False
        self.update(counter)
        return True
