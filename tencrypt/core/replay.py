"""Sliding anti-replay window over 64-bit message counters (RFC 6479).

Rules:
- A counter is fresh if it was never marked and is within ``WINDOW`` of the highest counter
  marked so far (``top - counter < WINDOW``); anything higher than ``top`` is always fresh.
  Packets reordered by up to ``WINDOW - 1`` positions are accepted, each at most once.
- ``check`` answers "is it fresh" without changing anything: it runs before the AEAD.
  ``update`` marks a counter: it runs only after the tag verified, otherwise a forged datagram
  with a huge counter would slide the window and make every genuine packet "too old".
- RFC 6479's layout: a ring of 64-bit blocks; bit ``c % 64`` of block ``c // 64`` (mod the
  ring) is counter ``c``. Advancing clears only the blocks the window slides into, so an
  in-order packet costs a few small-int operations. The ring holds 128 blocks, more than the
  65 that a 4096-counter span can touch, so every counter inside the window has its own bit.
- The ring is a writable buffer of native u64 words (a memoryview cast to ``"Q"``), never
  replaced, only written: the compiled open loop (core/fastpath.py, tencrypt/_fastpath.c)
  reads and marks the same words, and ``top`` is the one other piece of state.
"""

from __future__ import annotations

WINDOW = 4096  # counters; the design asks for at least 2048 packets of reordering tolerance
_RING = 128  # blocks of 64 bits (a power of two: the index is a mask)
_RING_MASK = _RING - 1
_ZEROS = memoryview(bytes(8 * _RING)).cast("Q")


def _new_ring() -> memoryview:
    return memoryview(bytearray(8 * _RING)).cast("Q")


class ReplayWindow:
    __slots__ = ("top", "ring")

    def __init__(self) -> None:
        self.top = -1  # nothing seen yet
        self.ring = _new_ring()

    def check(self, counter: int) -> bool:
        diff = self.top - counter
        if diff < 0:
            return True
        if diff >= WINDOW:
            return False
        return not (self.ring[(counter >> 6) & _RING_MASK] >> (counter & 63)) & 1

    def update(self, counter: int) -> None:
        ring = self.ring
        top = self.top
        if counter > top:
            block = counter >> 6
            gap = block - (top >> 6)
            if gap == 1:  # the common in-order case: one fresh block
                ring[block & _RING_MASK] = 0
            elif gap >= _RING:
                # A jump past the whole ring forgets everything (counters are 64-bit: never
                # loop over the gap).
                ring[:] = _ZEROS
            elif gap:
                for b in range((top >> 6) + 1, block + 1):
                    ring[b & _RING_MASK] = 0
            self.top = counter
            ring[block & _RING_MASK] |= 1 << (counter & 63)
        elif top - counter < WINDOW:
            ring[(counter >> 6) & _RING_MASK] |= 1 << (counter & 63)

    def check_and_update(self, counter: int) -> bool:
        if not self.check(counter):
            return False
        self.update(counter)
        return True
