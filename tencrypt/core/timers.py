"""The tunnel's timers: everything that happens because time passed, not because a datagram
or a packet arrived. Functions of a ``Tunnel`` (core/session.py), which holds all the state
they read (``table``, ``limits``); they act through its two ways to send, ``_initiate`` and
``_send_keepalive``. The data path arms the deadlines (``stale_due`` when it seals,
``keepalive_due`` when it opens); ``on_timer`` fires them. Pure: ``now`` and ``wall`` are
arguments.

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

from typing import TYPE_CHECKING

from tencrypt.core.peer import Limits, Peer, PeerUnreachable, Sessions, drop_slot, usable
from tencrypt.core.stats import DropReason

if TYPE_CHECKING:
    from tencrypt.core.session import Tunnel


def on_timer(tunnel: Tunnel, now: float, wall: float) -> None:
    """``Tunnel.on_timer`` but the gate's tables: every peer's deadlines, then sessions'
    expiry (keys dropped) and tombstones (forgotten)."""
    table = tunnel.table
    for peer in list(table.peers):
        _tick_peer(tunnel, peer, now, wall)
    for index, s in list(table.by_index.items()):
        if s.recv_aead is not None and now >= s.expires_at:
            s.expire()
        if now >= s.forget_at:
            del table.by_index[index]


def next_timer(table: Sessions, limits: Limits) -> float | None:
    """The earliest ``now`` at which ``on_timer`` has something to do, or None."""
    due: list[float] = [
        s.expires_at if s.recv_aead is not None else s.forget_at for s in table.by_index.values()
    ]
    for peer in table.peers:
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


def _tick_peer(tunnel: Tunnel, peer: Peer, now: float, wall: float) -> None:
    """Rules 6-7 for one peer: expired sessions leave their slots, the initiation in flight is
    retried or given up, a keepalive or a new handshake goes out when due, and a peer left
    with nothing is forgotten."""
    limits = tunnel.limits
    for s in peer.sessions():
        if now >= s.expires_at:
            drop_slot(peer, s)
            s.expire()
    p = peer.pending
    if p is not None:
        if now >= p.first_sent + limits.handshake_give_up:
            _give_up(tunnel, peer, now)
            return
        if now >= p.last_sent + limits.rekey_timeout:
            tunnel._initiate(peer, now, wall, rekey=p.rekey, first_sent=p.first_sent)
    if peer.keepalive_due is not None and now >= peer.keepalive_due:
        peer.keepalive_due = None
        if usable(peer.current, now, limits):
            tunnel._send_keepalive(peer, now)
    if peer.stale_due is not None and now >= peer.stale_due:
        peer.stale_due = None
        if peer.pending is None:
            tunnel._initiate(peer, now, wall, rekey=False)
    if not peer.up and peer.pending is None and not peer.sessions() and not peer.queue:
        tunnel.table.remove_peer(peer)  # e.g. a responder session that was never confirmed


def _give_up(tunnel: Tunnel, peer: Peer, now: float) -> None:
    """Rule 7: nobody answered our initiations for handshake_give_up seconds."""
    table = tunnel.table
    assert peer.pending is not None
    table.pending.pop(peer.pending.index, None)
    peer.pending = None
    if peer.queue:
        tunnel.stats.drop(DropReason.HANDSHAKE_TIMEOUT, len(peer.queue))
        table.queued -= len(peer.queue)
        peer.queue.clear()
    if not usable(peer.current, now, tunnel.limits):  # nothing left to reach it with
        table.events.append(PeerUnreachable(tuple(sorted(peer.addresses))))
        table.remove_peer(peer)
