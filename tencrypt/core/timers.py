"""The tunnel's timers: everything that happens because time passed, not because a datagram
or a packet arrived. ``Timers`` is the part of ``Tunnel`` (core/session.py) that fires the
deadlines; it keeps no state of its own, working on the Tunnel's tables, stats and limits and
starting handshakes through its ``Handshakes`` (core/handshaking.py). What it sends goes to the
``out`` list the Tunnel passes in. ``sleep_plan`` turns the earliest deadline of everything the
shell's timer task drives (``next_timer`` here, the tables' ``next_expiry``) into its sleep
(control.py rule 4: no tick, an idle proxy does not wake). The data path arms the deadlines (``stale_due`` when it
seals, ``keepalive_due`` when it opens). Pure: ``now`` and ``wall`` are arguments.

Rules (numbered once for the whole tunnel: 1, 5, 9 and 10 are in core/handshaking.py, the rest
in core/session.py):
6. Liveness: having sent data with nothing authenticated back for ``stale_timeout`` (the peer
   restarted and lost its keys) starts a new handshake; having received data and sent nothing
   for ``keepalive_timeout`` sends a keepalive, so the other side's stale timer stays quiet.
7. A handshake is retried every ``rekey_timeout`` with a fresh initiation and abandoned after
   ``handshake_give_up`` (queued packets: HANDSHAKE_TIMEOUT). A peer left with no usable session
   is then forgotten: PeerUnreachable (the shell refuses or goes in the clear), and
   PeerDown if it was up.
"""

from __future__ import annotations

from tencrypt.core import wire
from tencrypt.core.handshaking import Handshakes
from tencrypt.core.peer import (
    Limits,
    Peer,
    PeerUnreachable,
    Sessions,
    Transmit,
    drop_slot,
    usable,
)
from tencrypt.core.stats import Counter, DropReason, Stats


class Timers:
    """The deadlines of one Tunnel: its ``table``, ``stats``, ``limits`` and ``handshakes``
    (shared, not copied)."""

    __slots__ = ("table", "stats", "limits", "_handshakes")

    def __init__(
        self, table: Sessions, stats: Stats, limits: Limits, handshakes: Handshakes
    ) -> None:
        self.table = table
        self.stats = stats
        self.limits = limits
        self._handshakes = handshakes

    def on_timer(self, now: float, wall: float, out: list[Transmit]) -> None:
        """``Tunnel.on_timer`` but the gate's tables: every peer's deadlines, then sessions'
        expiry (keys dropped) and tombstones (forgotten)."""
        for peer in list(self.table.peers):
            self._tick_peer(peer, now, wall, out)
        for index, s in list(self.table.by_index.items()):
            if s.recv_aead is not None and now >= s.expires_at:
                s.expire()
            if now >= s.forget_at:
                del self.table.by_index[index]

    def next_timer(self) -> float | None:
        """The earliest ``now`` at which ``on_timer`` has something to do, or None."""
        limits = self.limits
        due: list[float] = [
            s.expires_at if s.recv_aead is not None else s.forget_at
            for s in self.table.by_index.values()
        ]
        for peer in self.table.peers:
            p = peer.pending
            if p is not None:
                due.append(
                    min(p.first_sent + limits.handshake_give_up, p.last_sent + limits.rekey_timeout)
                )
            if peer.keepalive_due is not None:
                due.append(peer.keepalive_due)
            if peer.stale_due is not None:
                due.append(peer.stale_due)
        return min(due, default=None)

    def _tick_peer(self, peer: Peer, now: float, wall: float, out: list[Transmit]) -> None:
        """Rules 6-7 for one peer: expired sessions leave their slots, the initiation in flight
        is retried or given up, a keepalive or a new handshake goes out when due, and a peer
        left with nothing is forgotten."""
        limits = self.limits
        for s in peer.sessions():
            if now >= s.expires_at:
                drop_slot(peer, s)
                s.expire()
        p = peer.pending
        if p is not None:
            if now >= p.first_sent + limits.handshake_give_up:
                self._give_up(peer, now)
                return
            if now >= p.last_sent + limits.rekey_timeout:
                out.append(
                    self._handshakes.initiate(
                        peer, now, wall, rekey=p.rekey, first_sent=p.first_sent
                    )
                )
        if peer.keepalive_due is not None and now >= peer.keepalive_due:
            peer.keepalive_due = None
            if usable(peer.current, now, limits):
                out.append(seal_keepalive(peer, self.stats))
        if peer.stale_due is not None and now >= peer.stale_due:
            peer.stale_due = None
            if peer.pending is None:
                out.append(self._handshakes.initiate(peer, now, wall, rekey=False))
        if not peer.up and peer.pending is None and not peer.sessions() and not peer.queue:
            self.table.remove_peer(peer)  # e.g. a responder session that was never confirmed

    def _give_up(self, peer: Peer, now: float) -> None:
        """Rule 7: nobody answered our initiations for handshake_give_up seconds."""
        assert peer.pending is not None
        self.table.pending.pop(peer.pending.index, None)
        peer.pending = None
        if peer.queue:
            self.stats.drop(DropReason.HANDSHAKE_TIMEOUT, len(peer.queue))
            self.table.queued -= len(peer.queue)
            peer.queue.clear()
        if not usable(peer.current, now, self.limits):  # nothing left to reach it with
            self.table.events.append(PeerUnreachable(tuple(sorted(peer.addresses))))
            self.table.remove_peer(peer)


def seal_keepalive(peer: Peer, stats: Stats) -> Transmit:
    """Rule 6's keepalive (and rule 4's, after a handshake): an empty data message on the
    peer's ``current`` session, which must be usable."""
    s = peer.current
    assert s is not None and s.send_aead is not None
    transmit = (wire.seal(s.send_aead, s.remote_index, s.send_counter, b""), peer.endpoint, 0)
    s.send_counter += 1
    peer.keepalive_due = None
    stats.inc(Counter.KEEPALIVES_SENT)
    return transmit


STUCK = 0.01  # seconds: a deadline already past after its round waits this long, not spins


def sleep_plan(
    now: float, due: float | None, lead: float, cap: float | None = None
) -> tuple[float | None, bool]:
    """How long the shell's timer task sleeps after a round at ``now``: until ``due`` (the
    earliest deadline of everything it drives; None: none), at most ``cap`` seconds; None:
    until woken. The flag is "deep": the wake lies more than ``lead`` (the shortest time
    from any deadline's creation to its due time) ahead, so a deadline created meanwhile may
    fall before it and whoever creates one must wake the task (control.py rule 4). A due
    time already past (a deadline its round did not clear) waits ``STUCK``, never spins."""
    wake = due if cap is None else min(now + cap, due if due is not None else now + cap)
    if wake is None:
        return None, True
    return (wake - now if wake > now else STUCK), wake > now + lead
