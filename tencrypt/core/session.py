"""The sealed tunnel as a pure state machine: IP packets and UDP datagrams in, datagrams,
peer events and a timer deadline out. The shell pulls results (aioquic style); nothing here
calls into I/O or reads a clock: ``now`` (monotonic seconds) and ``wall`` (Unix seconds, only
for initiation timestamps) are arguments.

Rules, numbered once for the whole tunnel and each stated in the module that implements it:
1, 5, 9 and 10 (handshakes, identity, keys) in core/handshaking.py, 6 and 7 (timers) in
core/timers.py, and these:
2. Sending: the peer's ``current`` session seals, unless it is past ``reject_after_time`` or
   ``reject_after_messages``; then the packet is queued and a handshake starts. Queues are
   bounded per peer (QUEUE_FULL drops the oldest) and in total (QUEUE_FULL refuses the new
   packet), and so is the number of peers (an idle one is forgotten to make room). The
   initiator of ``current`` re-keys when it sends after ``rekey_after_time``; either side
   after ``rekey_after_messages``. Traffic keeps flowing on ``current`` while the new
   handshake runs.
3. Receiving: a data message is opened by whichever of the peer's sessions its index names
   (``previous`` keeps opening in-flight packets after a re-key). Stages: index, expiry,
   replay check, AEAD, replay mark (only after the tag verified), the inner packet (one IPv4
   or IPv6 packet, its length exact: NOT_IPV4 otherwise) and its source, which must be one
   of the peer's addresses of that family or the session's (BAD_SOURCE).
4. A responder's session is ``next`` (unconfirmed, never used to send, does not replace
   ``current``) until the first authenticated data message arrives on it. The initiator
   therefore sends a keepalive right after the handshake when it has nothing queued. A
   confirmed session's pod addresses become its peer's (``Sessions.adopt``: a dual-stack
   pod's second address, core/handshaking.py rule 9).
8. Every datagram ends as exactly one of: an accepted inner packet, a handled handshake
   message, or one counted drop. ``receive`` never raises.
11. Roaming: an authenticated data message moves its peer's endpoint to where it came from,
   except for a peer we reach through a Service VIP (``pinned``: its endpoint is the VIP, and
   which pod is behind it is the node's choice). Such a session's traffic from any other
   address means conntrack no longer maps the VIP to the pod we keyed with (its endpoint moved,
   the entry was cleaned): it is still opened and delivered (it is authenticated, and its
   flows may finish), counted (``vip_data_elsewhere``), but it neither moves the endpoint nor
   proves the session alive. Our traffic keeps going to the VIP, so after ``stale_timeout``
   without an answer from the VIP a new handshake reaches whichever pod the Service now picks.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tencrypt.core import TUNNEL_PORT, fastpath, wire
from tencrypt.core.batch import Rows
from tencrypt.core.fastpath import Backend
from tencrypt.core.gate import Gate
from tencrypt.core.handshaking import Handshakes
from tencrypt.core.identity import ClaimPolicy
from tencrypt.core.keyring import KeyMismatches, KeyRing, describe_keys
from tencrypt.core.peer import (
    Endpoint,
    Limits,
    Peer,
    PeerDown,
    PeerEvent,
    PeerUnreachable,
    PeerUp,
    Session,
    Sessions,
    Transmit,
    describe,
    usable,
)
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.core.timers import Timers, seal_keepalive
from tencrypt.core.wire import Buffer

__all__ = ["Limits", "PeerDown", "PeerEvent", "PeerUnreachable", "PeerUp", "Tunnel"]

_DATA_HEADER = struct.Struct("<IIQ")
_WORD = struct.Struct("<I")
_DEFAULT_LIMITS = Limits()


class Tunnel:
    """All sessions and peers of one pod's proxy. See the module rules."""

    def __init__(
        self,
        psk: bytes | KeyRing,
        pod_ip: str,
        stats: Stats,
        limits: Limits = _DEFAULT_LIMITS,
        port: int = TUNNEL_PORT,
        rng: Callable[[int], bytes] = secrets.token_bytes,
        keygen: Callable[[], X25519PrivateKey] = X25519PrivateKey.generate,
        identity: ClaimPolicy | None = None,
        fastpath: Backend | None = None,
        secondary_ip: str | None = None,
    ) -> None:
        """``psk``: the key ring (rule 10), or one project key as a ring of one.
        ``identity`` binds claimed pod IPs to the network (rule 9; both rules in
        core/handshaking.py). The daemon always passes one; None (no binding, today's unit
        tests) is for tests only. ``fastpath``: the batch loops of ``send_batch`` and
        ``receive_batch`` (core/fastpath.py, or the compiled twin that tencrypt/fastpath.py
        selects); None seals and opens one packet per call. ``secondary_ip``: this pod's
        address of the other family (a dual-stack pod's second ``status.podIPs`` entry),
        claimed in its handshakes beside ``pod_ip``."""
        if not isinstance(psk, KeyRing) and len(psk) != 32:
            raise ValueError("psk must be 32 bytes (see core.psk.parse_psk)")
        self.pod_ip = pod_ip
        self.stats = stats
        self.limits = limits
        self.port = port
        self._identity = identity
        self.fastpath = fastpath
        self._gate = Gate(psk, keygen, limits)
        self.table = Sessions(rng, limits, stats)
        self._transmits: list[Transmit] = []
        self._handshakes = Handshakes(
            self._gate, self.table, stats, limits, pod_ip, port, identity, secondary_ip
        )
        self._timers = Timers(self.table, stats, limits, self._handshakes)

    # ---- what the shell calls ---------------------------------------------------------------
    def send(self, dst_ip: str, packet: Buffer, now: float, wall: float) -> None:
        """Seal ``packet`` (read from tenc0, inner destination ``dst_ip``) for its peer."""
        peer = self.table.by_addr.get(dst_ip)
        if peer is None:
            if not self.table.make_room(now):
                self.stats.drop(DropReason.QUEUE_FULL)
                return
            peer = self.table.new_peer((dst_ip, self.port), dst_ip)
            peer.pinned = self._identity is not None and self._identity.via_vip(dst_ip)
        s = peer.current
        if s is not None and usable(s, now, self.limits):
            self._seal(peer, s, packet, now)
            if peer.pending is None and (
                s.send_counter >= self.limits.rekey_after_messages
                or (s.initiator and now >= s.rekey_at)
            ):
                self._initiate(peer, now, wall, rekey=True)
            return
        self._enqueue(peer, packet)
        if peer.pending is None:
            self._initiate(peer, now, wall, rekey=s is not None)

    def send_batch(self, dst_ip: str, packets: Sequence[Buffer], now: float, wall: float) -> None:
        """``send`` for the segments of one super-packet, in order: one peer lookup and one
        check of the session's limits for all of them, then one datagram each (rule 2 holds
        for every packet; anything unusual takes ``send`` one by one). No packets: nothing."""
        n = len(packets)
        if not n:  # e.g. a malformed super-packet the split dropped (counted there)
            return
        limits = self.limits
        peer = self.table.by_addr.get(dst_ip)
        s = peer.current if peer is not None else None
        if (
            peer is None
            or s is None
            or not usable(s, now, limits)
            or s.send_counter + n > limits.reject_after_messages
        ):
            for packet in packets:
                self.send(dst_ip, packet, now, wall)
            return
        aead, index, counter, endpoint = s.send_aead, s.remote_index, s.send_counter, peer.endpoint
        assert aead is not None
        out, seal = self._transmits, wire.seal
        nbytes = 0
        if self.fastpath is not None and s.send_key is not None:
            # one call seals them all into one buffer of consecutive datagrams
            sealed = self.fastpath.seal_batch(s.send_key, index, counter, packets)
            if isinstance(packets, Rows):  # a super-packet's segments: sizes by geometry
                nbytes, first, run = packets.nbytes, packets.size if n > 1 else packets.last, True
            else:
                sizes = list(map(len, packets))
                nbytes, first = sum(sizes), sizes[0]
                run = sizes.count(first) + (sizes[-1] < first) == n
            if run:  # equal sizes but a shorter last: one GSO run
                out.append((sealed, endpoint, first + wire.DATA_OVERHEAD))
            else:  # a batch of small packets: one datagram each (views keep the buffer)
                view, pos = memoryview(sealed), 0
                for size in sizes:
                    out.append((view[pos : pos + size + wire.DATA_OVERHEAD], endpoint, 0))
                    pos += size + wire.DATA_OVERHEAD
            counter += n
        else:
            for packet in packets:
                out.append((seal(aead, index, counter, packet), endpoint, 0))
                counter += 1
                nbytes += len(packet)
        s.send_counter = counter
        peer.keepalive_due = None
        peer.tx_packets += n
        peer.tx_bytes += nbytes
        if peer.stale_due is None:
            peer.stale_due = now + limits.stale_timeout
        counters = self.stats.counters
        counters[Counter.PACKETS_SEALED] = counters.get(Counter.PACKETS_SEALED, 0) + n
        counters[Counter.BYTES_SEALED] = counters.get(Counter.BYTES_SEALED, 0) + nbytes
        if peer.pending is None and (
            counter >= limits.rekey_after_messages or (s.initiator and now >= s.rekey_at)
        ):
            self._initiate(peer, now, wall, rekey=True)

    def receive(self, datagram: Buffer, addr: Endpoint, now: float, wall: float) -> bytes | None:
        """The authenticated inner IPv4 or IPv6 packet, or None (handshake handled, or a
        counted drop)."""
        if len(datagram) < 4:
            self.stats.drop(DropReason.SHORT)
            return None
        kind = _WORD.unpack_from(datagram)[0]
        if kind == wire.TYPE_DATA:
            return self._on_data(datagram, addr, now, wall)
        if kind == wire.TYPE_INITIATION:
            self._on_initiation(datagram, addr, now, wall)
        elif kind == wire.TYPE_RESPONSE:
            self._on_response(datagram, addr, now)
        else:
            self.stats.drop(DropReason.UNKNOWN_TYPE)
        return None

    def receive_batch(
        self, datagrams: Sequence[Buffer], addr: Endpoint, now: float, wall: float
    ) -> list[bytes]:
        """``receive`` for the datagrams of one read from ``addr``, in order: the authenticated
        inner packets. With a ``fastpath``, each run of data messages of one live session is
        opened by one call (core/fastpath.py rules 2-3); anything else takes ``receive``."""
        out: list[bytes] = []
        i, n = 0, len(datagrams)
        while i < n:
            datagram = datagrams[i]
            if self.fastpath is not None and len(datagram) >= wire.DATA_OVERHEAD:
                word, index, _ = _DATA_HEADER.unpack_from(datagram)
                s = self.table.by_index.get(index) if word == wire.TYPE_DATA else None
                if s is not None and s.recv_key is not None and now < s.expires_at:
                    stop = self._open_run(s, datagrams, i, addr, now, wall, out)
                    if stop > i:
                        i = stop
                        continue
            packet = self.receive(datagram, addr, now, wall)
            if packet is not None:
                out.append(packet)
            i += 1
        return out

    def pop_transmit_runs(self) -> list[Transmit]:
        """What to send, in order: (data, destination, size) - see ``core.peer.Transmit``."""
        out, self._transmits = self._transmits, []
        return out

    def pop_transmits(self) -> list[tuple[Buffer, Endpoint]]:
        """Datagrams to send, in order, with their destination (ip, port), one per entry."""
        return list(datagrams_of(self.pop_transmit_runs()))

    def pop_events(self) -> list[PeerEvent]:
        """PeerUp / PeerDown since the last call. Apply them before injecting the packets
        ``receive`` returned in the same batch (a PeerUp carries the route for the reply)."""
        out, self.table.events = self.table.events, []
        return out

    def knows(self, address: str) -> bool:
        """Is ``address`` (a pod IP or a VIP) already bound to a peer?"""
        return address in self.table.by_addr

    def session_count(self) -> int:
        """Sessions that still hold keys (confirmed or not)."""
        return sum(1 for s in self.table.by_index.values() if s.recv_aead is not None)

    def peer_count(self) -> int:
        return len(self.table.peers)

    @property
    def ring(self) -> KeyRing:
        return self._gate.ring

    @property
    def handshakes_by_key(self) -> dict[str, int]:
        """Fingerprint -> sessions made with that key (rule 10, core/handshaking.py)."""
        return self._handshakes.handshakes_by_key

    @property
    def key_mismatch(self) -> KeyMismatches:
        """Project members refused for a key we do not hold (rule 10, core/handshaking.py)."""
        return self._handshakes.key_mismatch

    def set_identity(self, identity: ClaimPolicy) -> None:
        """Rule 9 (core/handshaking.py) from now on with ``identity`` (the membership brought
        the cluster's pod network, or cluster mode retired the VIP sessions)."""
        self._identity = identity
        self._handshakes.identity = identity

    def set_ring(self, ring: KeyRing) -> None:
        """Rule 10 (core/handshaking.py): from now on initiate with ``ring.current`` and
        accept its keys; every session and initiation in flight keeps its own key."""
        self._gate.ring = ring

    def key_status(self) -> list[dict[str, object]]:
        """Each key of the ring (and each retired one live sessions still use): role,
        fingerprint, live sessions, handshakes completed (``keyring.describe_keys``)."""
        live = (s.key for s in self.table.by_index.values() if s.recv_aead is not None)
        return describe_keys(self._gate.ring, live, self.handshakes_by_key)

    def status(self, now: float) -> dict[str, object]:
        """Peers, their sessions (age, confirmed, packets sent, key) and totals, and the keys,
        JSON-serialisable: the tunnel's part of ``/status`` (tencrypt/status.py prints it)."""
        return {
            "pod_ip": self.pod_ip,
            **describe(self.table, now, self.limits),
            "keys": self.key_status(),
            "key_mismatch": self.key_mismatch.describe(),
        }

    # ---- receive: data ----------------------------------------------------------------------
    def _on_data(self, datagram: Buffer, addr: Endpoint, now: float, wall: float) -> bytes | None:
        # Inlined stages on purpose: this is the per-packet hot path.
        stats = self.stats
        if len(datagram) < wire.DATA_OVERHEAD:
            stats.drop(DropReason.SHORT)
            return None
        _, index, counter = _DATA_HEADER.unpack_from(datagram)
        s = self.table.by_index.get(index)
        if s is None:
            stats.drop(DropReason.UNKNOWN_INDEX)
            return None
        aead = s.recv_aead
        if aead is None or now >= s.expires_at or counter >= self.limits.reject_after_messages:
            stats.drop(DropReason.EXPIRED_SESSION)
            return None
        if not s.replay.check(counter):
            stats.drop(DropReason.REPLAY)
            return None
        packet = wire.open_datagram(aead, datagram)
        if packet is None:
            stats.drop(DropReason.BAD_TAG)
            return None
        s.replay.update(counter)
        peer = s.peer
        n = len(packet)
        self._authenticated(peer, s, addr, 1, n > 0, now, wall)
        if n == 0:
            stats.inc(Counter.KEEPALIVES_RECEIVED)
            return None
        # IPv4 with IHL >= 5 is a first byte of 0x45..0x4f; the total length must be exact.
        # IPv6: version 6, and 40 + the payload length exactly (a jumbogram's 0 is refused).
        first = packet[0]
        if 0x45 <= first <= 0x4F and n >= 20 and (packet[2] << 8 | packet[3]) == n:
            source = packet[12:16]
            if source not in peer.allowed and source != s.pod_ip:
                stats.drop(DropReason.BAD_SOURCE)
                return None
        elif first >> 4 == 6 and n >= 40 and (packet[4] << 8 | packet[5]) + 40 == n:
            source = packet[8:24]
            if source not in peer.allowed6 and source != s.pod_ip6:
                stats.drop(DropReason.BAD_SOURCE)
                return None
        else:
            stats.drop(DropReason.NOT_IPV4)
            return None
        peer.rx_packets += 1
        peer.rx_bytes += n
        counters = stats.counters  # Stats.inc, inlined: two calls per packet are measurable
        counters[Counter.PACKETS_OPENED] = counters.get(Counter.PACKETS_OPENED, 0) + 1
        counters[Counter.BYTES_OPENED] = counters.get(Counter.BYTES_OPENED, 0) + n
        return packet

    def _open_run(
        self,
        s: Session,
        datagrams: Sequence[Buffer],
        start: int,
        addr: Endpoint,
        now: float,
        wall: float,
        out: list[bytes],
    ) -> int:
        """``_on_data`` for a run of ``s``'s messages from ``start``: the loop (counter limit,
        replay, AEAD, inner checks) in one call, then what authenticated traffic changes
        about the peer, once. Returns where the run stopped."""
        assert self.fastpath is not None and s.recv_key is not None
        peer = s.peer
        stop, packets, c = self.fastpath.open_batch(
            s.recv_key,
            s.local_index,
            self.limits.reject_after_messages,
            s.replay,
            b"".join(peer.allowed) + s.pod_ip,
            datagrams,
            start,
            b"".join(peer.allowed6) + s.pod_ip6,
        )
        fastpath.count(self.stats, c, len(packets))
        peer.rx_packets += len(packets)
        peer.rx_bytes += c[fastpath.BYTES_OPENED]
        authenticated, keepalives = c[fastpath.AUTHENTICATED], c[fastpath.KEEPALIVES]
        if authenticated:
            self._authenticated(peer, s, addr, authenticated, authenticated > keepalives, now, wall)
        out.extend(packets)
        return stop

    def _authenticated(
        self,
        peer: Peer,
        s: Session,
        addr: Endpoint,
        count: int,
        carried_data: bool,
        now: float,
        wall: float,
    ) -> None:
        """What ``count`` authenticated data messages of ``s`` from ``addr`` change about its
        peer (once per batch): roaming (rule 11), confirmation (rule 4), renewal, and the
        keepalive owed when some of them carried data (rule 6)."""
        if not peer.pinned or addr == peer.endpoint:  # rule 11
            peer.stale_due = None
            peer.endpoint = addr  # roaming: answer where authenticated traffic comes from
        else:
            self.stats.inc(Counter.VIP_DATA_ELSEWHERE, count)
        peer.confirmed = True
        if not s.confirmed:
            self._confirm(peer, s, now)
        if s.initiator and now >= s.renew_at and peer.pending is None and peer.current is s:
            # One-way traffic towards us would otherwise let the session die un-renewed.
            self._initiate(peer, now, wall, rekey=True)
        if carried_data and peer.keepalive_due is None:
            peer.keepalive_due = now + self.limits.keepalive_timeout

    def _confirm(self, peer: Peer, s: Session, now: float) -> None:
        """Rule 4: the initiator used our responder session, so it has the keys too."""
        s.confirmed = True
        if peer.next is s:
            peer.next = None
        self.table.install(peer, s)
        self.table.adopt(peer, s)
        self.table.peer_up(peer)
        self._flush_queue(peer, now, keepalive=False)

    # ---- receive: handshakes (core/handshaking.py) ------------------------------------------
    def _on_initiation(self, datagram: Buffer, addr: Endpoint, now: float, wall: float) -> None:
        reply = self._handshakes.on_initiation(datagram, addr, now, wall)
        if reply is not None:
            self._transmits.append(reply)

    def _on_response(self, datagram: Buffer, addr: Endpoint, now: float) -> None:
        peer = self._handshakes.on_response(datagram, addr, now)
        if peer is not None:  # our handshake completed: what waited for it, or rule 4's keepalive
            self._flush_queue(peer, now, keepalive=True)

    # ---- timers (core/timers.py) ------------------------------------------------------------
    def on_timer(self, now: float, wall: float) -> None:
        """Run everything due at ``now``: retries, give-ups, keepalives, re-keys, expiry."""
        self._timers.on_timer(now, wall, self._transmits)
        self._gate.prune(now, wall)

    def next_timer(self) -> float | None:
        """The earliest ``now`` at which ``on_timer`` has something to do, or None."""
        return self._timers.next_timer()

    # ---- sending helpers --------------------------------------------------------------------
    def _seal(self, peer: Peer, s: Session, packet: Buffer, now: float) -> None:
        assert s.send_aead is not None
        self._transmits.append(
            (wire.seal(s.send_aead, s.remote_index, s.send_counter, packet), peer.endpoint, 0)
        )
        s.send_counter += 1
        peer.keepalive_due = None
        if packet:  # a keepalive carries nothing to count
            peer.tx_packets += 1
            peer.tx_bytes += len(packet)
        if peer.stale_due is None:
            peer.stale_due = now + self.limits.stale_timeout
        counters = self.stats.counters  # Stats.inc, inlined (hot path)
        counters[Counter.PACKETS_SEALED] = counters.get(Counter.PACKETS_SEALED, 0) + 1
        counters[Counter.BYTES_SEALED] = counters.get(Counter.BYTES_SEALED, 0) + len(packet)

    def _enqueue(self, peer: Peer, packet: Buffer) -> None:
        if len(peer.queue) >= self.limits.queue_limit:
            peer.queue.popleft()  # the oldest is the least likely to still matter
            self.table.queued -= 1
            self.stats.drop(DropReason.QUEUE_FULL)
        if self.table.queued >= self.limits.queue_total_limit:
            self.stats.drop(DropReason.QUEUE_FULL)
            return
        peer.queue.append(bytes(packet))  # the shell reuses its read buffers
        self.table.queued += 1

    def _flush_queue(self, peer: Peer, now: float, keepalive: bool) -> None:
        s = peer.current
        while peer.queue and usable(s, now, self.limits):
            assert s is not None
            self._seal(peer, s, peer.queue.popleft(), now)
            self.table.queued -= 1
            keepalive = False
        if keepalive and usable(s, now, self.limits):  # rule 4: let the responder confirm
            self._transmits.append(seal_keepalive(peer, self.stats))

    def _initiate(
        self, peer: Peer, now: float, wall: float, rekey: bool, first_sent: float | None = None
    ) -> None:
        """Send a fresh initiation to the peer (``Handshakes.initiate``)."""
        self._transmits.append(self._handshakes.initiate(peer, now, wall, rekey, first_sent))


def datagrams_of(runs: Iterable[Transmit]) -> Iterator[tuple[Buffer, Endpoint]]:
    """Each datagram of ``runs`` with its destination, in order (views, no copies)."""
    for data, endpoint, size in runs:
        if not size:
            yield data, endpoint
            continue
        view = memoryview(data)
        for pos in range(0, len(view), size):
            yield view[pos : pos + size], endpoint
