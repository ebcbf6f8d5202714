"""The express lane for established flows (issue 26): its tables, and the pure-Python twin of
the compiled lane (``tencrypt._fastpath.Lane``, tencrypt/_lane.c), which reads the same tables.

A packet of a flow the Python path has already routed to SEAL, with a usable session, takes
one short path with no per-packet Python beyond one admission call:
  out: tenc0 frame -> checks -> checksum completed -> ``take`` (the Python state changes) ->
       translation (cluster IP:port -> endpoint:target port) -> seal -> one UDP datagram;
  in:  UDP datagram -> session by index -> limit, replay check, AEAD -> inner checks ->
       ``accept`` (the Python state changes) -> replay mark -> reverse translation -> tenc0.
Anything else (and every failure) is handed back untouched, in order, to the Python path,
which then does exactly what it always did: drops are counted there, once.

Rules:
1. Tables (Python owns them, both lanes only read them; ``Express`` writes them):
   ``out``: key13 of the packet as the app sent it (``key13``: protocol, source, destination,
   source port, destination port of an IPv4 packet; an ICMP echo request's ports are (id, 0),
   a reply's (0, id), so that a request's key with addresses and ports swapped is its
   reply's) -> (send key, the peer's receiver index, new destination (4 bytes, or b""
   untranslated), new destination port (-1; an echo: 0, never written), ``take``, its lease
   cell (rule 6), the session (whose counter a leased packet advances));
   ``inn``: key13 of an opened packet (the reply as it arrives) -> (the cluster IP to put
   back as its source (or b""), the Service port (-1), the flow's ``FlowRef``s: its Service
   flow and its NetworkPolicy flow, those that exist, its lease cell);
   ``slots``: our receiver index -> (receive key, the session's ``ReplayWindow``, the
   message limit, ``accept``).
2. Eligible packets, both ways: IPv4 with a 20-byte header, total length exact, not a
   fragment; UDP, or TCP with a valid data offset and none of SYN, FIN, RST (conntrack's
   state changes stay Python's), or an ICMP echo request or reply (type 8 or 0, code 0) with
   an id other than 0 (id 0 would give a request and a reply of the other direction one
   key); ICMP errors and other queries stay Python's (the related-flow logic), and the ICMP
   checksum is not checked, as the Python path does not check it (the receiver's kernel
   does); out: a frame within the MTU, or a super-packet (rule 2a);
   in: a data message whose inner destination is this pod's IPv4 address. A table is filled
   only by ``learn`` (the Python path just routed a packet of the flow to SEAL: a packet of
   a flow either side opened, since ``learn`` installs the reply's ``inn`` entry too; a
   peer-opened flow, such as a peer's ping, is learnt from our first reply; an untranslated
   flow whose replies are a Service flow's reply tuple (conntrack rule 8) is not) and emptied
   by ``flush`` (the shell calls it on a new membership and on peer events; what else could
   change the route of a learnt flow, ``take``/``accept`` re-check per packet) or
   ``forget`` (a SYN of the flow: it may choose another endpoint). Bounds: at most
   ``MAX_FLOWS`` flows (one more flushes them all: the next packet of each live flow learns
   it again), and at most one session per peer: learning a peer's new session drops every
   entry of its previous one, so no retired key stays in the tables.
2a. Super-packets (bulk TCP): a TSO frame (gso_type TCPV4, with or without ECN) of a learnt
   flow whose headers are rule 2's, whose segments (headers plus ``gso_size``) fit the MTU
   and number at most ``MAX_SEGMENTS``, goes out as the Python path's ``_outbound_super``
   sends it: translated on its headers, cut by core/batch.py's split (rules 2-4 there: every
   checksum recomputed), each segment sealed as its own datagram with consecutive counters;
   one ``take(nbytes, now, segments)`` for all of them, which makes the state changes of
   that many packets (and counts the split). Anything else is handed back whole.
2b. GRO reads (bulk in): a read of 2 to ``MAX_SEGMENTS`` datagrams (the kernel's UDP_GRO: one
   size but the last) is checked whole first: every datagram a data message of the same
   receiver index, counters strictly increasing and each one passing the replay check, each
   opening, every inner packet rule 2's, to this pod; one that fails hands the whole read back
   untouched. Then, group by group of consecutive packets of one flow (a peer's parallel
   connections share its socket's GRO reads), in order: one ``accept(source, nbytes, addr,
   now, refs, count)`` makes the state changes of the group's packets, the window marks each,
   and the frames are what the daemon's ``_inject`` writes for them: coalesced (core/batch.py
   rule 6, partial checksums), the reply's translation, the TSO header. A group without an
   entry or refused by ``accept`` stops there: the lane took the groups before it, and the
   rest of the read (from that group's first datagram) is handed back, in order.
3. Exactness: ``take`` and ``accept`` re-check at every packet what the Python path would
   decide (the peer still owns the destination and ``current`` is the learnt session, its
   limits and re-key times not reached, the Service flow and the NetworkPolicy flow alive
   (and allowed) and a policy in force exactly when one was at ``learn``, no standalone
   VIP flow in force; in: the session still holds its index, confirmed, the
   datagram from the peer's endpoint, no renewal due, the inner source allowed) and then
   make exactly the state changes that path makes for that packet: the session's counter,
   the peer's keepalive/stale deadlines, endpoint and tx/rx figures, the stats counters and
   the last-seen times of the Service flow (core/conntrack.py) and of the policy flow
   (core/policyflows.py), as their ``touch`` for a packet without SYN, FIN or RST (an echo's:
   its Service flow (ICMP, source, id, cluster IP, 0), a request's to a cluster IP and the
   reply's coming back; its policy flow (ICMP, pod, id, peer, 0), whichever side opened it;
   both ICMP_TIMEOUT flows). A refusal changes
   nothing. The bytes are those of the Python path: the same checksum completion
   (core/batch.py), the same rewrites (core/packet.py: an echo's address and the IPv4 header
   checksum; ICMP's checksum has no pseudo-header, and an echo no port), the same seal
   (core/fastpath.py).
4. Ownership: a session's sending counter and replay window exist once, in its ``Session``
   (``send_counter``, ``replay``). Neither lane copies them: ``take`` reads and advances the
   counter in the same uninterrupted call (under the GIL) in which the lane then seals with
   it, and the lane marks the window in place, only after ``accept`` said yes, within the
   same call. Python's own seals (keepalives, packets that go the slow way) use the same
   field; so the counters on the wire are strictly increasing whichever path seals, and a
   datagram marked by one path is a replay for the other. Hand-over needs no step: a
   retired session (re-key, expiry) simply stops passing ``take``/``accept``.
5. Bad input never raises: anything the lane cannot take is handed back (rule 1 of the
   module: the Python path counts it).
6. Leases (the compiled lane only; the twin calls ``take``/``accept`` for every packet).
   Every check of rule 3 reads state that only Python code changes, or the clock. The proxy
   runs its Python on one thread, and between two calls of the lane from Python (a pump, a
   ``wait``, ``outbound``...: an *epoch*) the only Python that runs is the lane's own
   ``take``/``accept``/``commit`` calls, which make a flow's state changes and no other
   (they never remove a flow, change a session, a peer's ``pending``, the tables or a
   policy). So a grant holds for the rest of its epoch, as long as what the clock decides
   holds too: ``take`` and ``accept`` return it with the grant, ``until`` (the session's
   expiry; its re-key time (out) or renewal time (in) when that check applies), for
   ``take`` the ``bound`` the counter plus the packets may reach (the re-key point while no
   handshake is pending, else the reject limit), and ``ttl``, the shortest idle timeout of
   the flow's ``FlowRef``s (the flows stay alive while the lane touches them more often
   than that: their ``last_seen`` is never older than the lease's last packet). A later
   packet of the entry in the same epoch, at ``now`` < ``until``, within ``ttl`` of the
   lease's last packet, (out) whose counter plus packets stays within ``bound``, (in) of
   the same session index from the same source address, is admitted in C: the counter is
   read and advanced in its ``Session`` (rule 4 unchanged), the window marked, and the
   rest of ``take``'s/``accept``'s state changes (``commit``) is recorded and replayed in
   order, by calling ``commit``, before any Python runs: before the lane calls
   ``take``/``accept`` and before it returns. Python therefore never sees a state the
   per-packet calls would not have made; only the moment it is made moves, within one
   call of the lane. The timers are unaffected (control.py rule 4c): the deadlines a
   ``commit`` sets are those ``take``/``accept`` set, and the timer task's sleep was
   already bounded by them. By the same argument the compiled lane keeps, for the rest of
   one call, what it looked up in the tables (entries, a session's slot, its replay window,
   whose ``top`` it writes back when the call ends: nothing reads it before).
Pure: no I/O; ``now`` is an argument. The daemon's hooks (tencrypt/daemon.py) call ``learn``
and ``forget``; the compiled lane adds the reads and writes (``pump_tun``, ``pump_udp``).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core import fastpath as pure_fastpath
from tencrypt.core.batch import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR_LEN,
    Rows,
    build_gso_vnet_hdr,
    coalesce_batch,
    csum_field,
    ones_sum,
    rewrite_partial_csum,
    split_tcp_batch,
)
from tencrypt.core.packet import (
    DST,
    ICMP,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    SRC,
    TCP,
    UDP,
    parse_ipv4,
    rewrite_addr,
    rewrite_port,
)
from tencrypt.core.policyflows import PolicyFlows
from tencrypt.core.stats import Counter, Stats

if TYPE_CHECKING:
    from tencrypt.core.conntrack import ServiceFlows
    from tencrypt.core.dispatch import Dispatcher
    from tencrypt.core.nat import FlowTable
    from tencrypt.core.peer import Endpoint, Peer, Session
    from tencrypt.core.session import Tunnel

Buffer = bytes | bytearray | memoryview
MAX_FLOWS = 4096  # learnt flows; one more flushes the tables (closed flows are never removed)
MAX_SEGMENTS = 64  # a super-packet's segments, a GRO read's datagrams (UDP_MAX_SEGMENTS)
MAX_READ = 65536  # the compiled lane's receive buffer
LEASE_BYTES = 64  # an entry's lease cell (rule 6), the compiled lane's struct Lease
NO_SYN_FIN_RST = 0x07  # TCP flags the lane leaves to the Python path (conntrack state)
_HEADER = struct.Struct("<IIQ")
_VNET = struct.Struct("=BBHHHH")
_ZERO_VNET = bytes(VNET_HDR_LEN)
_U16 = struct.Struct("!H")


def key13(pkt: Buffer) -> bytes | None:
    """Rule 2's eligibility and the flow key of an IPv4 packet: protocol, source, destination,
    source port, destination port (13 bytes; an ICMP echo's id in the port of its opener's
    side: a request's source port, a reply's destination port), or None."""
    n = len(pkt)
    if n < 28 or pkt[0] != 0x45 or (pkt[2] << 8 | pkt[3]) != n or (pkt[6] & 0x3F) or pkt[7]:
        return None
    proto = pkt[9]
    if proto == TCP:
        if n < 40 or pkt[33] & NO_SYN_FIN_RST or not 20 <= (pkt[32] >> 4) << 2 <= n - 20:
            return None
    elif proto == ICMP:  # an echo request (id, 0) or reply (0, id): ``_swap`` maps them
        kind, ident = pkt[20], bytes(pkt[24:26])
        if pkt[21] or kind not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) or ident == b"\0\0":
            return None
        ports = ident + b"\0\0" if kind == ICMP_ECHO_REQUEST else b"\0\0" + ident
        return bytes((ICMP,)) + bytes(pkt[12:20]) + ports
    elif proto != UDP:
        return None
    return bytes((proto,)) + bytes(pkt[12:24])


def _swap(key: bytes) -> bytes:
    """The key of the reply: addresses and ports swapped."""
    return key[:1] + key[5:9] + key[1:5] + key[11:13] + key[9:11]


def _reply_tuple(key: bytes) -> tuple[int, int, int, int, int]:
    """core/conntrack.py's reply tuple (proto, source, source port, destination, destination
    port; an echo reply's id as its source port and 0) of the replies to ``key``'s packet."""
    proto, a, b = key[0], int.from_bytes(key[1:5], "big"), int.from_bytes(key[5:9], "big")
    sport, dport = int.from_bytes(key[9:11], "big"), int.from_bytes(key[11:13], "big")
    if proto == ICMP:
        return (proto, b, sport or dport, a, 0)
    return (proto, b, dport, a, sport)


class FlowRef:
    """A flow of core/conntrack.py (Service translation) or core/policyflows.py (NetworkPolicy)
    as the lane sees it: alive (the same flow object still in its table, not idle past its
    class's timeout, a policy flow not blocked), and touched by a packet (what ``translate``,
    ``translate_reply``, ``outbound`` and ``inbound`` do for a packet without SYN, FIN or
    RST: ``IdleFlows.touch`` in its own class)."""

    __slots__ = ("table", "key", "flow", "policy")

    def __init__(self, table: ServiceFlows | PolicyFlows, key: tuple[int, ...], flow: Any):
        # flow: the table's flow object when the lane learnt it
        self.table, self.key, self.flow = table, key, flow
        self.policy = isinstance(table, PolicyFlows)

    def live(self, now: float) -> bool:
        idle: Any = self.table._idle  # read each time: a new policy replaces it
        got = idle.flows.get(self.key)
        if got is None or got is not self.flow:
            return False
        if self.policy and got.decision is None:  # blocked by a newer policy
            return False
        return bool(now - got.last_seen < idle.timeouts[got.queue])

    def touch(self, now: float) -> None:
        idle: Any = self.table._idle
        idle.touch(self.key, self.flow, self.flow.queue, now)

    def ttl(self) -> float:
        """The flow's idle timeout: it stays alive while touched more often (rule 6)."""
        idle: Any = self.table._idle
        return float(idle.timeouts[self.flow.queue])


Refs = tuple[FlowRef, ...]
# rule 6: a grant's lease, (until, bound, ttl) out, (until, ttl) in
OutGrant = tuple[int, "Endpoint", float, int, float]
InGrant = tuple[float, float]


def _cell() -> bytearray:
    """An entry's lease cell (rule 6): the compiled lane's, zero (no lease) until it grants."""
    return bytearray(LEASE_BYTES)


def _ttl(refs: Refs) -> float:
    return min((ref.ttl() for ref in refs), default=float("inf"))


class Sender:
    """One learnt outbound flow's admission (rule 3): ``take(nbytes, now[, segments])`` ->
    (counter, endpoint, until, bound, ttl) after making the Python path's state changes, or
    None (nothing changed); ``commit`` makes those changes but the counter's (rule 6)."""

    __slots__ = ("lane", "peer", "session", "dst", "refs", "policy")

    def __init__(self, lane: Express, peer: Peer, s: Session, dst: str, refs: Refs, policy: bool):
        self.lane, self.peer, self.session, self.dst, self.refs = lane, peer, s, dst, refs
        self.policy = policy  # a NetworkPolicy was in force at ``learn``

    def take(self, nbytes: int, now: float, segments: int = 0) -> OutGrant | None:
        """One packet of ``nbytes`` (``segments`` 0), or a super-packet cut into ``segments``
        packets of ``nbytes`` in all: the counter of the first, where they go, and the lease
        (rule 6): the same checks pass for this flow until ``until``, for a counter (plus the
        packets) up to ``bound``, while its flows are touched within ``ttl``."""
        n = segments or 1
        lane, peer, s = self.lane, self.peer, self.session
        if len(lane.nat) or (lane.dispatch.netpol.policy is not None) != self.policy:
            return None
        if peer.current is not s or lane.by_addr.get(self.dst) is not peer:
            return None
        limits = lane.tunnel.limits
        c = s.send_counter
        if s.send_aead is None or now >= s.expires_at or c + n > limits.reject_after_messages:
            return None
        if peer.pending is None and (
            c + n >= limits.rekey_after_messages or (s.initiator and now >= s.rekey_at)
        ):
            return None  # this packet starts a re-key: the Python path's
        refs = self.refs
        for ref in refs:
            if not ref.live(now):
                return None
        s.send_counter = c + n  # rule 4: the one counter, advanced where it is used
        self.commit(nbytes, now, segments)
        until = s.expires_at
        if peer.pending is None:
            bound = min(limits.reject_after_messages, limits.rekey_after_messages - 1)
            if s.initiator:
                until = min(until, s.rekey_at)
        else:
            bound = limits.reject_after_messages
        return c, peer.endpoint, until, bound, _ttl(refs)

    def commit(self, nbytes: int, now: float, segments: int = 0) -> None:
        """``take``'s state changes but the counter's, for a packet (or super-packet) the
        checks passed for (rule 6: a lease's packets, replayed in order)."""
        lane, peer, n = self.lane, self.peer, segments or 1
        for ref in self.refs:
            ref.touch(now)
        peer.keepalive_due = None
        peer.tx_packets += n
        peer.tx_bytes += nbytes
        if peer.stale_due is None:
            peer.stale_due = now + lane.tunnel.limits.stale_timeout
        counters = lane.stats.counters
        counters[Counter.PACKETS_SEALED] = counters.get(Counter.PACKETS_SEALED, 0) + n
        counters[Counter.BYTES_SEALED] = counters.get(Counter.BYTES_SEALED, 0) + nbytes
        if segments:  # as the Python path's _outbound_super
            lane.stats.inc(Counter.SUPER_PACKETS_SPLIT)


class Receiver:
    """One session's inbound admission (rule 3): ``accept(source, nbytes, addr, now, refs[,
    count])`` makes the Python path's state changes for one opened packet (or ``count``) and
    gives its lease (until, ttl: rule 6), or changes nothing and gives None; ``commit`` makes
    those changes."""

    __slots__ = ("lane", "peer", "session")

    def __init__(self, lane: Express, peer: Peer, s: Session):
        self.lane, self.peer, self.session = lane, peer, s

    def accept(
        self,
        source: bytes,
        nbytes: int,
        addr: Endpoint,
        now: float,
        refs: tuple[Refs, bool],
        count: int = 1,
    ) -> InGrant | None:
        """``count`` packets of one flow (a GRO read's: rule 2b), ``nbytes`` in all."""
        lane, peer, s = self.lane, self.peer, self.session
        flows, policy = refs
        if (lane.dispatch.netpol.policy is not None) != policy:
            return None
        if s.recv_aead is None or now >= s.expires_at or not s.confirmed:
            return None
        if lane.by_index.get(s.local_index) is not s or s.peer is not peer:
            return None
        if addr != peer.endpoint:  # roaming, or a VIP peer's traffic from elsewhere: Python's
            return None
        renews = s.initiator and peer.pending is None and peer.current is s
        if renews and now >= s.renew_at:
            return None  # this packet starts a renewal
        if source not in peer.allowed and source != s.pod_ip:
            return None
        for ref in flows:
            if not ref.live(now):
                return None
        self.commit(nbytes, addr, now, refs, count)
        return (min(s.expires_at, s.renew_at) if renews else s.expires_at), _ttl(flows)

    def commit(
        self, nbytes: int, addr: Endpoint, now: float, refs: tuple[Refs, bool], count: int = 1
    ) -> None:
        """``accept``'s state changes, for packets the checks passed for (rule 6)."""
        lane, peer = self.lane, self.peer
        for ref in refs[0]:
            ref.touch(now)
        peer.stale_due = None
        peer.endpoint = addr
        peer.confirmed = True
        if peer.keepalive_due is None:
            peer.keepalive_due = now + lane.tunnel.limits.keepalive_timeout
        peer.rx_packets += count
        peer.rx_bytes += nbytes
        counters = lane.stats.counters
        counters[Counter.PACKETS_OPENED] = counters.get(Counter.PACKETS_OPENED, 0) + count
        counters[Counter.BYTES_OPENED] = counters.get(Counter.BYTES_OPENED, 0) + nbytes


class Express:
    """The lane's tables (rule 1) and the pure twin of the compiled lane's per-packet work."""

    def __init__(
        self,
        tunnel: Tunnel,
        dispatch: Dispatcher,
        nat: FlowTable,
        stats: Stats,
        pod_ip: str,
        mtu: int,
    ) -> None:
        self.tunnel, self.dispatch, self.nat, self.stats = tunnel, dispatch, nat, stats
        self.by_addr = tunnel.table.by_addr
        self.by_index = tunnel.table.by_index
        self.pod4 = ipaddress.IPv4Address(pod_ip).packed
        self.mtu = mtu
        self.out: dict[
            bytes, tuple[bytes, int, bytes, int, Callable[..., Any], bytearray, Any]
        ] = {}
        self.inn: dict[bytes, tuple[bytes, int, tuple[Refs, bool], bytearray]] = {}
        self.slots: dict[int, tuple[bytes, Any, int, Callable[..., InGrant | None]]] = {}
        self.learnt = 0  # entries installed (status, tests)
        self._sessions: dict[Peer, Session] = {}  # the one session per peer the tables hold

    # ---- the tables (rule 2) ------------------------------------------------------------
    def flush(self) -> None:
        self.out.clear()
        self.inn.clear()
        self.slots.clear()
        self._sessions.clear()

    def _retire(self, old: Session) -> None:
        """Every entry of ``old`` (its peer has a new session) goes."""
        self.slots.pop(old.local_index, None)
        stale = [k for k, e in self.out.items() if e[6] is old]  # the entry's session
        for key in stale:
            self.forget(key)

    def before(self, pkt: Buffer) -> bytes | None:
        """The shell, for a packet read from tenc0 before anything rewrites it: its key when
        the lane could take the flow (``learn`` after the route); a TCP SYN of an IPv4
        flow makes the lane forget that flow (rule 2)."""
        key = key13(pkt)
        syn = key is None and len(pkt) >= 40 and pkt[0] == 0x45 and pkt[9] == TCP
        if syn and self.out and pkt[33] & 0x02:
            self.forget(bytes(pkt[9:10]) + bytes(pkt[12:24]))
        return key

    def forget(self, key: bytes) -> None:
        """A SYN of flow ``key`` (as the app sent it): its entries go (it may choose again)."""
        entry = self.out.pop(key, None)
        if entry is not None:
            new_dst, new_dport = entry[2], entry[3]
            reply = _swap(key)
            if new_dst:
                reply = reply[:1] + new_dst + reply[5:9] + _U16.pack(new_dport) + reply[11:13]
            self.inn.pop(reply, None)

    def learn(self, key: bytes, pkt: Buffer, dst: str, now: float) -> bool:
        """The Python path routed ``pkt`` (flow ``key``, as sent; now translated in place) to
        SEAL for ``dst``: install its entries if the lane can take its next packets."""
        if len(self.nat):
            return False
        peer = self.by_addr.get(dst)
        s = peer.current if peer is not None else None
        if peer is None or s is None or not s.confirmed or s.send_key is None:
            return False
        if s.recv_key is None or (not self.dispatch.cluster and peer.pinned):
            return False  # standalone's VIP path counts its packets: Python's
        old = self._sessions.get(peer)
        if old is not None and old is not s:
            self._retire(old)
        if len(self.out) >= MAX_FLOWS and key not in self.out:
            self.flush()
        proto, src = key[0], int.from_bytes(key[1:5], "big")
        icmp = proto == ICMP
        # after the route: the destination (and port: an echo's is the key's, it has none)
        new = bytes(pkt[16:20]) + (key[11:13] if icmp else bytes(pkt[22:24]))
        translated = new != key[5:9] + key[11:13]
        flows = self.dispatch.flows
        if not translated and _reply_tuple(key) in flows._replies:
            return False  # its replies may be a Service flow's (conntrack rule 8): Python's
        self._sessions[peer] = s
        # the flow from the pod's side (core/policyflows.py rule 1): an echo by its id
        sport = int.from_bytes(key[9:11], "big")
        if icmp:  # an echo's id is its port on our side, a request's or a reply's
            sport = sport or int.from_bytes(key[11:13], "big")
        refs: list[FlowRef] = []
        netpol = self.dispatch.netpol
        policy = netpol.policy is not None
        if policy:  # the policy flow, keyed from the pod's side after the translation
            pkey = (
                proto,
                src,
                sport,
                int.from_bytes(new[:4], "big"),
                0 if icmp else int.from_bytes(new[4:], "big"),
            )
            pflow = netpol._idle.flows.get(pkey)
            if pflow is None or pflow.decision is None:
                return False
            refs.append(FlowRef(netpol, pkey, pflow))
        if translated:  # its Service flow is touched per packet (an echo: requests only)
            vport = int.from_bytes(key[11:13], "big")
            skey = (proto, src, sport, int.from_bytes(key[5:9], "big"), vport)
            flow = flows._idle.flows.get(skey)
            if flow is None:
                return False
            refs.append(FlowRef(flows, skey, flow))
        both = tuple(refs)
        sender = Sender(self, peer, s, dst, both, policy).take
        if translated:
            new_dst, new_dport = new[:4], int.from_bytes(new[4:], "big")
            self.out[key] = (s.send_key, s.remote_index, new_dst, new_dport, sender, _cell(), s)
            reply = key[:1] + new_dst + key[1:5] + new[4:] + key[9:11]
            self.inn[reply] = (key[5:9], vport, (both, policy), _cell())
        else:
            self.out[key] = (s.send_key, s.remote_index, b"", -1, sender, _cell(), s)
            self.inn[_swap(key)] = (b"", -1, (both, policy), _cell())
        self.slots[s.local_index] = (
            s.recv_key,
            s.replay,
            self.tunnel.limits.reject_after_messages,
            Receiver(self, peer, s).accept,
        )
        self.learnt += 1
        return True

    # ---- the twin of the compiled lane ----------------------------------------------------
    def outbound(self, frame: Buffer, now: float) -> tuple[bytes, Endpoint] | None:
        """One frame read from tenc0 (virtio-net header, then the packet): the sealed datagram
        (a super-packet: its segments' datagrams, one after the other) and where it goes, or
        None (the Python path's; nothing changed)."""
        if len(frame) < VNET_HDR_LEN + 28:
            return None
        flags, gso_type, _h, gso_size, start, offset = _VNET.unpack_from(frame, 0)
        if gso_type & ~VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_TCPV4:
            return self._outbound_super(frame, gso_size, now)
        if gso_type:
            return None
        pkt = bytearray(frame[VNET_HDR_LEN:])
        key = key13(pkt)
        if key is None or len(pkt) > self.mtu:
            return None
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:  # as core/batch.py _complete
            at = start + offset
            if start < 20 or at + 2 > len(pkt):
                return None
            ck = csum_field(ones_sum(pkt, start, len(pkt)))
            if ck == 0 and pkt[9] == UDP:
                ck = 0xFFFF
            _U16.pack_into(pkt, at, ck)
        entry = self.out.get(key)
        if entry is None:
            return None
        send_key, index, new_dst, new_dport, take = entry[:5]
        got = take(len(pkt), now)
        if got is None:
            return None
        counter, endpoint = got[0], got[1]
        if new_dst:
            self._translate(pkt, new_dst, new_dport)
        return pure_fastpath.seal_batch(send_key, index, counter, [pkt]), endpoint

    def _outbound_super(self, frame: Buffer, mss: int, now: float) -> tuple[bytes, Endpoint] | None:
        """A TSO super-packet (rule 2a) of a learnt flow: the Python path's ``_outbound_super``
        (translation on its headers, then core/batch.py's split, which recomputes every
        checksum) and one ``take`` for all its segments, sealed with consecutive counters."""
        pkt = bytearray(frame[VNET_HDR_LEN:])
        key = key13(pkt)
        if key is None or pkt[9] != TCP:
            return None
        hlen = 20 + ((pkt[32] >> 4) << 2)
        payload = len(pkt) - hlen
        if mss < 1 or hlen + mss > self.mtu:
            return None
        count = max(1, -(-payload // mss))
        if count > MAX_SEGMENTS:
            return None
        entry = self.out.get(key)
        if entry is None:
            return None
        send_key, index, new_dst, new_dport, take = entry[:5]
        got = take(count * hlen + payload, now, count)
        if got is None:
            return None
        counter, endpoint = got[0], got[1]
        if new_dst:
            self._translate(pkt, new_dst, new_dport)
        segments = split_tcp_batch(bytes(frame[:VNET_HDR_LEN]) + pkt, self.stats)
        return pure_fastpath.seal_batch(send_key, index, counter, segments), endpoint

    @staticmethod
    def _translate(pkt: bytearray, addr: bytes, port: int, side: int = DST) -> None:
        """As core/conntrack.py translate (``DST``) and translate_reply (``SRC``): the
        address, then the port."""
        ip = parse_ipv4(pkt)
        assert ip is not None
        rewrite_addr(pkt, ip, side, int.from_bytes(addr, "big"))
        rewrite_port(pkt, ip, side, port)

    def _slot(self, datagram: Buffer) -> tuple[int, tuple[bytes, Any, int, Any]] | None:
        """A data message's counter and its session's slot (rule 1), or None."""
        word, index, counter = _HEADER.unpack_from(datagram, 0)
        slot = self.slots.get(index) if word == 4 else None
        return None if slot is None else (counter, slot)

    def inbound(self, datagram: Buffer, addr: Endpoint, now: float) -> bytes | None:
        """One datagram: the frame to write to tenc0 (an all-zero virtio-net header, then the
        packet), or None (the Python path's; nothing changed)."""
        got = self._slot(datagram) if len(datagram) >= 32 + 28 else None
        if got is None:
            return None
        counter, (recv_key, window, limit, accept) = got
        if counter >= limit or not window.check(counter):
            return None
        nonce = b"\x00\x00\x00\x00" + bytes(datagram[8:16])
        try:
            plain = ChaCha20Poly1305(recv_key).decrypt(
                nonce, bytes(datagram[16:]), bytes(datagram[:16])
            )
        except InvalidTag:
            return None
        key = key13(plain)
        if key is None or plain[16:20] != self.pod4:
            return None
        entry = self.inn.get(key)
        if entry is None:
            return None
        vip, vport, refs = entry[:3]
        if not accept(plain[12:16], len(plain), addr, now, refs):
            return None
        window.update(counter)
        pkt = bytearray(plain)
        if vip:
            self._translate(pkt, vip, vport, SRC)
        return _ZERO_VNET + bytes(pkt)

    def inbound_run(
        self, data: Buffer, size: int, addr: Endpoint, now: float
    ) -> tuple[list[bytes], int] | None:
        """A GRO read (rule 2b): datagrams of ``size`` bytes (the last may be shorter). The
        frames to write to tenc0 and how many datagrams (a prefix) they took, or None (the
        Python path's; nothing changed)."""
        n = len(data)
        count = -(-n // size) if size > 0 else 0
        ok = size >= 32 + 28 and 2 <= count <= MAX_SEGMENTS and n <= MAX_READ
        got = self._slot(data) if ok else None
        if got is None:
            return None
        recv_key, window, limit, accept = got[1]
        aead, head = ChaCha20Poly1305(recv_key), bytes(data[:8])
        packets: list[bytes] = []
        counters: list[int] = []
        keys: list[bytes] = []
        for at in range(0, n, size):  # every check first: nothing changes on a refusal
            d = bytes(data[at : at + size])
            if len(d) < 32 + 28 or d[:8] != head:
                return None
            counter = _HEADER.unpack_from(d, 0)[2]
            if counter >= limit or (counters and counter <= counters[-1]):
                return None
            if not window.check(counter):
                return None
            try:
                plain = aead.decrypt(b"\x00\x00\x00\x00" + d[8:16], d[16:], d[:16])
            except InvalidTag:
                return None
            key = key13(plain)
            if key is None or plain[16:20] != self.pod4:
                return None
            keys.append(key)
            counters.append(counter)
            packets.append(plain)
        frames: list[bytes] = []
        taken = 0
        while taken < count:  # a group of consecutive packets of one flow at a time
            end = taken + 1
            while end < count and keys[end] == keys[taken]:
                end += 1
            entry = self.inn.get(keys[taken])
            if entry is None:
                break
            vip, vport, refs = entry[:3]
            group = packets[taken:end]
            if not accept(group[0][12:16], sum(map(len, group)), addr, now, refs, end - taken):
                break
            for counter in counters[taken:end]:
                window.update(counter)
            for pkt, gso_size in coalesce_batch(group, partial=True):  # as the daemon's _inject
                buf = bytearray(pkt)
                if vip:
                    self._translate(buf, vip, vport, SRC)
                if gso_size:
                    rewrite_partial_csum(buf)
                frames.append(build_gso_vnet_hdr(buf, gso_size) + bytes(buf))
            taken = end
        return (frames, taken) if taken else None


def read_datagrams(
    data: bytes, gro_size: int, truncated: bool, stats: Stats
) -> list[memoryview] | Rows:
    """What ``linux.gso.UdpBatch.recv_batch`` makes of one receive, for a receive the compiled
    lane made and handed back: the datagrams (a GRO read cut every ``gro_size`` bytes)."""
    view = memoryview(data)
    nbytes = len(data)
    size = gro_size or nbytes
    if truncated:
        stats.inc(Counter.UDP_TRUNCATED)
        if size <= 0 or size >= nbytes:
            return []
        nbytes -= nbytes % size
    if size <= 0 or size >= nbytes:
        return [view[:nbytes]]
    count = -(-nbytes // size)
    return Rows(view, size, size, count, nbytes - (count - 1) * size)
