"""The key ring: the project keys a proxy accepts, and the one it initiates with.

A rotation moves a project from key K1 to K2 in three phases without cutting a connection
(scripts/k8s/README.md, "Rotating a project's key")::

    phase          ring of every pod          initiates   accepts
    before         current K1                 K1          K1
    add-next       current K1, next K2        K1          K1, K2
    promote        current K2, previous K1    K2          K2, K1
    drop-previous  current K2                 K2          K2

Any two neighbouring phases share a key, so pods a phase apart still handshake while the new
Secret reaches every node; pods two phases apart share none and are refused (BAD_MAC).

Rules:
1. ``current`` initiates and is accepted; ``next`` and ``previous`` are accepted and never
   initiate. The keys are distinct (``psk.check_keyset``).
2. A handshake message names its key by its mac1 (``wire.mac_key_index``): one keyed BLAKE2s
   per key held, current first, before any Noise work; none verifies is BAD_MAC, so a wrong
   key costs at most three BLAKE2s, never a DH.
3. Each key keeps its own psk-premixed Noise templates (``handshake.Templates``); a ring built
   ``from_keys(..., reuse=old)`` keeps the templates of keys the old ring held, so a reload
   costs nothing for keys that stay.
4. A response uses the key of the initiation it answers; a session remembers the fingerprint
   of the key it was made with. A new ring changes no session: each lives on until its normal
   re-key, which then happens under the new ``current``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from tencrypt.core import exposition, wire
from tencrypt.core.handshake import Keygen, Templates
from tencrypt.core.psk import KeySet, check_keyset

RETIRED = "retired"  # the role shown for a key that sessions still use but the ring dropped


class KeyRing:
    """Up to three keys' templates by role. Immutable: a reload builds a new ring."""

    __slots__ = ("current", "next", "previous", "accepted", "_mac_keys")

    def __init__(
        self, current: Templates, next: Templates | None = None, previous: Templates | None = None
    ) -> None:
        self.current = current
        self.next = next
        self.previous = previous
        # rule 2: the order mac1 is tried in; current first (nearly every message uses it)
        self.accepted: tuple[Templates, ...] = tuple(
            t for t in (current, next, previous) if t is not None
        )
        self._mac_keys = tuple(t.mac_key for t in self.accepted)

    @classmethod
    def from_keys(cls, keys: KeySet, keygen: Keygen, reuse: KeyRing | None = None) -> KeyRing:
        """The ring of ``keys`` (rule 3: templates of keys ``reuse`` holds are kept)."""
        check_keyset(keys)
        known = {t.mac_key: t for t in (reuse.accepted if reuse is not None else ())}

        def templates(psk: bytes | None) -> Templates | None:
            if psk is None:
                return None
            return known.get(wire.derive_mac_key(psk)) or Templates(psk, keygen)

        current = templates(keys.current)
        assert current is not None
        return cls(current, templates(keys.next), templates(keys.previous))

    def find(self, datagram: wire.Buffer) -> Templates | None:
        """The key whose mac1 verifies on ``datagram`` (rule 2), or None."""
        i = wire.mac_key_index(self._mac_keys, datagram)
        return None if i is None else self.accepted[i]

    def roles(self) -> list[tuple[str, str]]:
        """``(role, fingerprint)`` of each key held, current first."""
        held = (("current", self.current), ("next", self.next), ("previous", self.previous))
        return [(role, t.fingerprint) for role, t in held if t is not None]

    def role_of(self, fingerprint: str) -> str:
        """The role of the key with ``fingerprint`` in this ring, or RETIRED."""
        for role, fp in self.roles():
            if fp == fingerprint:
                return role
        return RETIRED

    def __repr__(self) -> str:
        return "KeyRing(" + ", ".join(f"{r}={fp}" for r, fp in self.roles()) + ")"


def describe_keys(
    ring: KeyRing, session_keys: Iterable[str], handshakes: dict[str, int]
) -> list[dict[str, object]]:
    """``/status``'s ``keys``: each key of the ring, then each retired key sessions still use,
    with its role, the live sessions made with it and the handshakes completed with it."""
    sessions: dict[str, int] = {}
    for fp in session_keys:
        sessions[fp] = sessions.get(fp, 0) + 1
    rows = [(role, fp) for role, fp in ring.roles()]
    held = {fp for _, fp in rows}
    rows += [(RETIRED, fp) for fp in sorted(sessions) if fp not in held]
    return [
        {
            "role": role,
            "fingerprint": fp,
            "sessions": sessions.get(fp, 0),
            "handshakes": handshakes.get(fp, 0),
        }
        for role, fp in rows
    ]


def render_key_metrics(keys: list[dict[str, object]]) -> str:
    """Prometheus families for ``describe_keys``' rows: ``tencrypt_key`` (1 for a key the ring
    holds, 0 for a retired one; by fingerprint and role), ``tencrypt_key_sessions`` (by
    fingerprint and role) and ``tencrypt_key_handshakes_total`` (by fingerprint only: a
    counter keeps its labels while the key changes roles)."""
    rows = [(str(r["fingerprint"]), str(r["role"]), r) for r in keys]
    return exposition.text(
        exposition.family(
            "tencrypt_key", [((fp, role), 0 if role == RETIRED else 1) for fp, role, _ in rows]
        )
        + exposition.family(
            "tencrypt_key_sessions",
            [((fp, role), cast(int, r["sessions"])) for fp, role, r in rows],
        )
        + exposition.family(
            "tencrypt_key_handshakes_total",
            [((fp,), cast(int, r["handshakes"])) for fp, _, r in rows],
        )
    )


class KeyMismatches:
    """Members of the project whose initiations carry no valid mac1 under any key of the ring:
    most likely pods that missed a rotation phase (a forged datagram from a member's address
    looks the same, which is why this is a counter and a list, never a decision). Bounded at
    ``limit`` sources; a source leaves once a handshake with it completes (``clear``). A new
    source when the list is full is not listed (``note`` returns False: the caller counts
    it). No budget runs first (mac1 failed: there is no key to budget), so the list is
    bounded by size alone; a source is only noted when the membership names it."""

    __slots__ = ("limit", "_by_source")

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._by_source: dict[str, int] = {}

    def note(self, source: str) -> bool:
        """Count a refused initiation from ``source``; False when the full list left it out."""
        if source in self._by_source or len(self._by_source) < self.limit:
            self._by_source[source] = self._by_source.get(source, 0) + 1
            return True
        return False

    def clear(self, source: str) -> None:
        self._by_source.pop(source, None)

    def describe(self) -> list[dict[str, object]]:
        """``/status``'s ``key_mismatch``: each such source and its refused initiations."""
        return [{"source": src, "refused": n} for src, n in sorted(self._by_source.items())]

    def __len__(self) -> int:
        return len(self._by_source)
