"""The tunnel's handshakes: initiations out, initiations and responses in, and the sessions
they make. ``Handshakes`` is the part of ``Tunnel`` (core/session.py) that keeps the handshake
state (the last initiation timestamp; the per-key counts and key mismatches of rule 10) and
works on the Tunnel's gate, tables, stats and limits. It returns what to send, never sends: the
Tunnel queues the datagrams it returns and seals what waited for a completed handshake. Pure
like all of core/: ``now`` and ``wall`` are arguments.

Rules (numbered once for the whole tunnel: 2-4, 8 and 11 are in core/session.py, 6-7 in
core/timers.py):
1. Every session comes from its own handshake (fresh ephemeral keys: forward secrecy) and is
   keyed by a random non-zero 32-bit index that is unique among live sessions, tombstones and
   initiations in flight.
5. Handshake messages are checked cheapest first (core/gate.py): version, mac1 (BAD_MAC,
   before any Noise work), replayed copy, per-source and global budgets, Noise AEAD,
   timestamp; then the claimed pod IP (rule 9); only then the DH. Responses pass version,
   mac1 and the budgets before their DH, and a failed or refused one leaves the initiation
   intact, so a forged response cannot kill a handshake.
9. Identity (with a ``ClaimPolicy``; core/identity.py): the pod addresses an initiation or a
   response claims pass the policy before the session is attached to a peer. The claim of
   the outer datagram's family is the **bound** one: it names the session (and, for a new
   peer, the peer and its endpoint, port 1337). The other family's claim joins the session
   only if the policy accepts it (the membership pairs it with the bound one, rules 1-4 and
   6); a refused one is counted (``claims_unpaired``), not a drop: the handshake goes on for
   the bound family. The session joins the peer known by its bound address (a new one if
   none), and its addresses become that peer's once it is confirmed (``Sessions.adopt``; a
   peer that held the other address, the same pod reached over its other family, is merged
   into it then, not before: crossing handshakes over both families each keep their own
   ``next`` until the initiator picks one). From then on either address finds the peer, and
   the packets of both families share its sessions and their counters. Without a
   policy (tests) both claims are taken once they pass the baseline; a bound claim that
   fails the baseline is ``bad_handshake``, an other one is left out. A peer is
   ``confirmed`` once an authenticated data message arrived on one of its sessions; a
   confirmed peer is never renamed to another pod IP, and a claim of a pod IP whose peer is
   confirmed with a usable session at another UDP endpoint is CLAIM_REBIND (a restarted pod
   comes back from the same pod IP and port 1337, so it is let in). A response that came
   back from the Service VIP we initiated to cannot prove its claim: that session speaks
   for the VIP only (allowed inner source, PeerUp name), never for the claimed pod IP.
10. Keys (core/keyring.py): initiations use the ring's ``current`` key; an initiation is
   accepted under any key of the ring and answered under the same key; a response must use
   the key of the initiation it answers (else BAD_MAC). ``set_ring`` replaces the ring at run
   time and touches no session: each keeps the key it was made with until its normal
   re-key, which uses the new ``current``. Sessions and completed handshakes are counted per
   key fingerprint (``status()["keys"]``). A member of the project (per the ClaimPolicy)
   whose initiation fails mac1 under every key is counted (``handshakes_wrong_key``) and
   listed in ``status()["key_mismatch"]`` until a handshake with it completes: a pod that
   missed a rotation phase is refused (fail closed) and visible. The list holds at most 256
   sources; one more is counted (``key_mismatches_unlisted``), not listed.
"""

from __future__ import annotations

import ipaddress

from tencrypt.core import handshake, wire
from tencrypt.core.gate import Gate
from tencrypt.core.handshake import Keys
from tencrypt.core.identity import (
    ClaimPolicy,
    claimable,
    initiation_name,
    live_elsewhere,
    other_claim,
    proved,
    response_name,
)
from tencrypt.core.keyring import KeyMismatches
from tencrypt.core.peer import (
    Endpoint,
    Limits,
    Peer,
    Pending,
    Session,
    Sessions,
    Transmit,
)
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.core.wire import Buffer


class Handshakes:
    """The handshake state of one Tunnel, and what it does with handshake messages. The
    ``table``, ``stats``, ``limits`` and ``gate`` are the Tunnel's own (shared, not copied)."""

    __slots__ = (
        "table",
        "stats",
        "limits",
        "port",
        "handshakes_by_key",
        "key_mismatch",
        "_gate",
        "identity",
        "pod_ips",
        "_own",
        "_last_stamp_ns",
    )

    def __init__(
        self,
        gate: Gate,
        table: Sessions,
        stats: Stats,
        limits: Limits,
        pod_ip: str,
        port: int,
        identity: ClaimPolicy | None,
        secondary_ip: str | None = None,
    ) -> None:
        """``pod_ip``: this pod's address; ``secondary_ip``: its address of the other family
        (a dual-stack pod), claimed too."""
        self.table = table
        self.stats = stats
        self.limits = limits
        self.port = port
        self.handshakes_by_key: dict[str, int] = {}  # fingerprint -> sessions made with it
        self.key_mismatch = KeyMismatches()
        self._gate = gate
        self.identity = identity
        self.pod_ips = wire.pod_ips(pod_ip, secondary_ip)  # what our payloads claim
        self._own = frozenset(self.pod_ips.present)
        self._last_stamp_ns = 0

    def initiate(
        self, peer: Peer, now: float, wall: float, rekey: bool, first_sent: float | None = None
    ) -> Transmit:
        """A fresh initiation (new ephemeral, new index, newer timestamp) to send to the peer,
        now pending (rule 7 retries it: core/timers.py)."""
        if peer.pending is not None:
            self.table.pending.pop(peer.pending.index, None)
        index = self.table.new_index()
        # Timestamps strictly increase even if the wall clock stalls or steps back, so the
        # peer never mistakes our retry for a replay.
        stamp = max(int(wall * 1e9), self._last_stamp_ns + 1)
        self._last_stamp_ns = stamp
        templates = self._gate.ring.current  # rule 10: the newest key everyone accepts
        state, datagram = handshake.build_initiation(templates, index, stamp, self.pod_ips)
        peer.pending = Pending(
            index, state, now if first_sent is None else first_sent, now, rekey, templates
        )
        self.table.pending[index] = peer
        peer.stale_due = None
        self.stats.inc(Counter.HANDSHAKES_INITIATED)
        return (datagram, peer.endpoint, 0)

    def on_initiation(
        self, datagram: Buffer, addr: Endpoint, now: float, wall: float
    ) -> Transmit | None:
        """Rule 5: the gate (core/gate.py), the claims (rule 9), then the DH. The response to
        send, or None (a counted drop)."""
        source = wire.outer_ip(addr[0])
        init = self._gate.initiation(datagram, source, now, wall)
        if isinstance(init, DropReason):
            self.stats.drop(init)
            if (
                init is DropReason.BAD_MAC
                and self.identity is not None
                and self.identity.is_member(source)
            ):  # rule 10: a pod a phase behind?
                self.stats.inc(Counter.HANDSHAKES_WRONG_KEY)
                if not self.key_mismatch.note(source):
                    self.stats.inc(Counter.KEY_MISMATCHES_UNLISTED)
            return None
        claims = self._claims(init.pod_ips, source)
        if isinstance(claims, DropReason):
            self.stats.drop(claims)
            return None
        bound, other = claims
        pod_ip, reason, accepted = bound, None, other
        if self.identity is not None:
            pod_ip = initiation_name(self.identity, self.table.by_addr, bound, addr)
            reason = self.identity.check(bound, bound if pod_ip != bound else source)
            if pod_ip != bound:  # through a VIP's conntrack entry: speaks for the VIP only
                accepted = None
        by_addr = self.table.by_addr
        peer = by_addr.get(pod_ip)
        if (
            self.identity is not None
            and accepted is not None
            and reason is None
            and other_claim(self.identity, by_addr, peer, accepted, bound, addr, now, self.limits)
        ):
            accepted = None
        if reason is None and peer is not None and self._live_elsewhere(peer, addr, now, accepted):
            reason = DropReason.CLAIM_REBIND
        if reason is not None:
            self.stats.drop(reason)
            return None
        if peer is None and not self.table.make_room(now):  # max_peers, all of them busy
            self.stats.drop(DropReason.PEERS_FULL)
            return None
        index = self.table.new_index()
        reply = handshake.build_response(init, index, self.pod_ips, init.templates.mac_key)
        if reply is None:
            self.stats.drop(DropReason.BAD_HANDSHAKE)
            return None
        datagram_out, keys = reply
        self._gate.stamps.accept(_packed(bound), init.unix_ns)
        if accepted is not None:
            self._gate.stamps.accept(_packed(accepted), init.unix_ns)
        elif len(init.pod_ips.present) == 2:
            self.stats.inc(Counter.CLAIMS_UNPAIRED)
        if peer is None:
            # Until a data message confirms it, send to the pod's own tunnel port, not to
            # wherever this (possibly replayed) initiation came from.
            peer = self.table.new_peer((pod_ip, self.port), pod_ip)
        if peer.pod_ip is None:  # we were initiating to this pod IP ourselves
            peer.pod_ip = pod_ip
        s = self._new_session(
            peer,
            index,
            init.sender_index,
            keys,
            (pod_ip,) if accepted is None else (pod_ip, accepted),
            now,
            initiator=False,
            key=init.templates.fingerprint,
        )
        if peer.next is not None:
            self.table.forget(peer.next)
        peer.next = s
        peer.claimed, peer.claimed_other = bound, other  # what its handshake said, for status
        self.key_mismatch.clear(source)
        self.stats.inc(Counter.HANDSHAKES_RESPONDED)
        return (datagram_out, addr, 0)

    def on_response(self, datagram: Buffer, addr: Endpoint, now: float) -> Peer | None:
        """Rule 5's checks, the claims (rule 9), then the DH: the peer whose handshake this
        completed (its session installed and confirmed), or None (a counted drop)."""
        gate = self._gate
        key = gate.response_envelope(datagram)
        if isinstance(key, DropReason):
            self.stats.drop(key)
            return None
        parsed = wire.parse_response(datagram)
        if parsed is None:  # the envelope checked the length: cannot happen
            self.stats.drop(DropReason.BAD_HANDSHAKE)
            return None
        index, message = parsed
        peer = self.table.pending.get(index)
        if peer is None or peer.pending is None:
            self.stats.drop(DropReason.UNKNOWN_INDEX)
            return None
        if key.mac_key != peer.pending.templates.mac_key:  # rule 10: not our initiation's key
            self.stats.drop(DropReason.BAD_MAC)
            return None
        source = wire.outer_ip(addr[0])
        reason = gate.admit(source, now)
        if reason is not None:
            self.stats.drop(reason)
            return None
        state = peer.pending.state.clone()  # committed only if the claims are accepted too
        got = handshake.read_response(state, message)
        if got is None:
            self.stats.drop(DropReason.BAD_HANDSHAKE)
            return None
        remote_index, ips, keys = got
        claims = self._claims(ips, source)
        if isinstance(claims, DropReason):
            self.stats.drop(claims)
            return None
        bound, other = claims
        name, accepted = self._response_claims(peer, bound, other, addr, now)
        if isinstance(name, DropReason):
            self.stats.drop(name)  # the initiation stays pending: retried, then given up
            return None
        if accepted is None and len(ips.present) == 2:
            self.stats.inc(Counter.CLAIMS_UNPAIRED)
        pending = peer.pending
        del self.table.pending[index]
        peer.pending = None
        here = (name,) if accepted is None else (name, accepted)
        if peer.pod_ip is None or peer.pod_ip not in here:
            peer = self.table.bind_pod_ip(peer, name)
        s = self._new_session(
            peer, index, remote_index, keys, here, now, initiator=True, key=key.fingerprint
        )
        self.table.install(peer, s)
        self.table.adopt(peer, s)
        peer.claimed, peer.claimed_other = bound, other  # through a VIP: the pod behind it
        peer.endpoint = addr
        peer.pinned = name != bound  # session.py rule 11: answered through the VIP we asked
        peer.confirmed = True  # rule 9: the response proved the keys
        self.key_mismatch.clear(source)
        self.stats.inc(Counter.HANDSHAKES_COMPLETED)
        if pending.rekey:
            self.stats.inc(Counter.REKEYS)
        self.table.peer_up(peer)
        return peer

    def _response_claims(
        self, peer: Peer, bound: str, other: str | None, addr: Endpoint, now: float
    ) -> tuple[str | DropReason, str | None]:
        """Rules 7 (the bound claim: the name, or why it is refused) and 5-6 for the other
        claim (accepted, or None)."""
        if self.identity is None:
            return bound, other
        accepted = other
        if other is not None and other_claim(
            self.identity, self.table.by_addr, peer, other, bound, addr, now, self.limits
        ):
            accepted = None
        here = () if accepted is None else (accepted,)
        name = response_name(
            self.identity, self.table.by_addr, peer, bound, addr, now, self.limits, here
        )
        if name != bound:  # refused, or through a VIP: that session speaks for the VIP only
            accepted = None
        return name, accepted

    def _claims(self, ips: wire.PodIPs, source: str) -> tuple[str, str | None] | DropReason:
        """Rule 9's split of a payload's claims: (the bound one, the other family's or None),
        each past the baseline (``identity.claimable``); or why the handshake is refused."""
        v6 = ":" in source
        bound, other = (ips.ip6, ips.ip4) if v6 else (ips.ip4, ips.ip6)
        if bound is None:
            if self.identity is not None and self.identity.bind_to_source:
                return DropReason.CLAIM_NOT_SOURCE  # nothing claimed of its own family
            bound, other = other, None
        assert bound is not None  # a payload holds at least one address (wire.py)
        name = claimable(bound, self._own)
        if name is None:
            return DropReason.BAD_HANDSHAKE
        return name, None if other is None else claimable(other, self._own)

    def _new_session(
        self,
        peer: Peer,
        index: int,
        remote_index: int,
        keys: Keys,
        claims: tuple[str, ...],
        now: float,
        initiator: bool,
        key: str,
    ) -> Session:
        limits = self.limits
        expires_at = now + limits.reject_after_time
        renew_at = expires_at - limits.keepalive_timeout - limits.rekey_timeout
        packed = [_packed(a) for a in claims]
        s = Session(
            index,
            remote_index,
            keys.send,
            keys.recv,
            initiator,
            initiator,
            next((p for p in packed if len(p) == 4), b""),
            peer,
            rekey_at=now + limits.rekey_after_time,
            renew_at=renew_at,
            expires_at=expires_at,
            forget_at=expires_at + limits.tombstone_time,
            send_key=keys.send_key,
            recv_key=keys.recv_key,
            key=key,
            pod_ip6=next((p for p in packed if len(p) == 16), b""),
            claims=claims,
        )
        self.table.by_index[index] = s
        self.handshakes_by_key[key] = self.handshakes_by_key.get(key, 0) + 1
        peer.last_handshake = now
        return s

    def _live_elsewhere(self, peer: Peer, addr: Endpoint, now: float, other: str | None) -> bool:
        """Rule 9's CLAIM_REBIND (core/identity.py rule 6), when claims are checked at all:
        ``other`` is the other family's claim the handshake proved beside its source."""
        if self.identity is None:
            return False
        here = proved(self.identity, addr[0], other)
        return live_elsewhere(peer, addr, now, self.limits, here)


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed
