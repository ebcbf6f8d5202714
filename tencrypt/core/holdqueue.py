"""What waits for a decision: packets held per destination while a reverse lookup or the
membership decides (core/dispatch.py), opened packets waiting for their sender's route
(daemon.py), queued connections waiting for their source's class (linux/inbound.py).

Rules:
1. Items wait under a key, in arrival order, each key with a deadline (``inf``: none).
2. Bounded per key and in total: an item that does not fit is refused (the caller counts it
   and fails closed: drops it, refuses the connection); items already held are never pushed
   out by newer ones, so a burst cannot evict what waits for an answer already on its way.
3. ``pop`` hands over a key's items (all of them, in order) and forgets the key; ``expired``
   hands over every key whose deadline has passed. Nothing is ever released twice.
4. Keys are whatever the holder names a destination by; core/dispatch.py uses the address's
   canonical text, so an IPv6 destination (compressed form) waits under one key however the
   packet spelled it.
Pure: keys and items in, ``now`` an argument; the holder copies buffers it reuses.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class HoldQueue(Generic[K, V]):
    __slots__ = ("per_key", "limit", "total", "_items", "_deadlines")

    def __init__(self, per_key: int, limit: int) -> None:
        if per_key < 1 or limit < per_key:
            raise ValueError("a hold queue needs 1 <= per_key <= limit")
        self.per_key, self.limit = per_key, limit
        self.total = 0  # items held over all keys
        self._items: dict[K, list[V]] = {}
        self._deadlines: dict[K, float] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        """Keys waiting."""
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def add(self, key: K, items: Sequence[V], deadline: float = float("inf")) -> tuple[bool, int]:
        """Hold ``items`` under ``key`` (rule 2). Returns (whether the key is new, how many
        items were refused). A new key takes ``deadline``; a held one keeps its own."""
        held = self._items.get(key)
        new = held is None
        if held is None:
            held = []
        room = min(self.per_key - len(held), self.limit - self.total)
        taken = list(items[: max(room, 0)])
        if new and not taken:
            return False, len(items)  # nothing fits: the key does not start waiting
        if new:
            self._items[key] = held
            self._deadlines[key] = deadline
        held.extend(taken)
        self.total += len(taken)
        return new, len(items) - len(taken)

    def pop(self, key: K) -> list[V]:
        """Every item held under ``key``, in order; the key is forgotten (rule 3)."""
        items = self._items.pop(key, [])
        self._deadlines.pop(key, None)
        self.total -= len(items)
        return items

    def expired(self, now: float) -> list[tuple[K, list[V]]]:
        """Every key past its deadline, with its items, removed (rule 3)."""
        due = [k for k, d in self._deadlines.items() if d <= now]
        return [(k, self.pop(k)) for k in due]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a held key (``inf`` ones excluded), or None."""
        due = min(self._deadlines.values(), default=float("inf"))
        return None if due == float("inf") else due

    def count(self, key: K) -> int:
        return len(self._items.get(key, ()))
