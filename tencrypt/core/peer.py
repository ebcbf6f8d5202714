"""The state the tunnel keeps per session and per peer, and the knobs that bound it.

Rules:
- A ``Session`` is one handshake's keys: one ChaCha20Poly1305 object per direction, a send
  counter, a replay window, and deadlines fixed at creation. Its keys are never reused by
  another session, and are dropped (set to None) the moment it expires.
- A ``Peer`` is one remote pod: the inner addresses that lead to it (its pod IP, a
  dual-stack pod's address of the other family, and any Service VIP we reached it through),
  where to send datagrams, and up to three sessions:
  ``current`` (confirmed, used to send), ``previous`` (still opens in-flight packets after a
  re-key) and ``next`` (a responder's session, unconfirmed until the initiator's first data
  message arrives on it; never used to send before that).
- A dual-stack pod is one ``Peer`` with two pod addresses: ``pod_ip`` (the one its handshake
  bound to the network) and ``paired`` (the other family's, accepted by core/identity.py
  rule 5's pairing). Looking up either finds the same peer and so the same sessions: its
  inner IPv4 and IPv6 packets are sealed under one session and share its one send counter
  (``Session.send_counter``; a nonce is never reused whatever the inner family).
- ``allowed`` holds the peer's IPv4 addresses packed (4 bytes), ``allowed6`` its IPv6 ones
  (16 bytes): the inner sources it may use, kept apart by family for the batch loops
  (core/fastpath.py's ``allowed`` and ``allowed6``).
- An ``Endpoint`` is (outer address text, UDP port), IPv4 or IPv6. The shell hands the core
  canonical text (dotted IPv4, compressed IPv6, an IPv4 datagram never as IPv4-mapped IPv6);
  handshake code compares addresses through ``wire.outer_ip`` all the same.
- ``Sessions`` owns the indexes over them (see its rules); session.py owns the protocol
  (with handshaking.py and timers.py).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core.handshake import Templates
from tencrypt.core.noise import HandshakeState
from tencrypt.core.replay import ReplayWindow
from tencrypt.core.stats import DropReason, Stats
from tencrypt.core.wire import Buffer

Endpoint = tuple[str, int]
# What the tunnel asks the shell to send: (data, endpoint, size). ``size`` 0: ``data`` is one
# datagram; otherwise ``data`` holds consecutive datagrams of ``size`` bytes, the last one
# possibly shorter - UDP GSO's layout, so a sealed super-packet goes out without a copy.
Transmit = tuple[Buffer, Endpoint, int]


@dataclass(frozen=True, slots=True)
class Limits:
    """Every timer (seconds) and counter the state machine uses. Tests pass small ones."""

    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    rekey_after_messages: int = 2**60
    reject_after_messages: int = 2**64 - 2**13 - 1
    rekey_timeout: float = 2.0  # retry an unanswered initiation
    handshake_give_up: float = 30.0  # then drop queued packets (HANDSHAKE_TIMEOUT)
    keepalive_timeout: float = 2.0  # passive keepalive: we received data but sent nothing
    stale_timeout: float = 5.0  # we sent data, nothing authenticated came back: re-handshake
    queue_limit: int = 512  # packets queued per peer while a handshake runs
    initiation_max_age: float = 180.0  # initiations with an older timestamp are stale
    initiation_max_skew: float = 30.0  # ... and those this far in the future are refused
    handshake_rate: float = 20.0  # per source IP token bucket, checked before any DH
    handshake_burst: int = 10
    handshake_budget_rate: float = 500.0  # handshakes per second from all sources together
    handshake_budget_burst: int = 100
    max_peers: int = 1024  # peers known at once (an app sweeping the Service CIDR)
    queue_total_limit: int = 4096  # packets queued over all peers (memory bound)
    tombstone_time: float = 180.0  # after expiry a session answers EXPIRED_SESSION, then is gone


@dataclass(frozen=True, slots=True)
class PeerUp:
    """A session with ``pod_ip`` is confirmed: route ``pod_ip``/32 into tenc0."""

    pod_ip: str
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class PeerDown:
    """No session with ``pod_ip`` any more and none could be made (or the VIP moved away)."""

    pod_ip: str


@dataclass(frozen=True, slots=True)
class PeerUnreachable:
    """Nobody answered our initiations to ``addresses`` for handshake_give_up seconds: no proxy
    there (an unpatched pod), or none reachable. The shell decides: refuse, or go in the clear."""

    addresses: tuple[str, ...]


PeerEvent = PeerUp | PeerDown | PeerUnreachable


@dataclass(slots=True, eq=False)
class Session:
    local_index: int  # chosen by us: the receiver_index of data messages sent to us
    remote_index: int  # chosen by the peer: the receiver_index of data messages we send
    send_aead: ChaCha20Poly1305 | None
    recv_aead: ChaCha20Poly1305 | None
    initiator: bool
    confirmed: bool
    pod_ip: bytes  # the remote pod's IPv4 address its handshake proved (4 bytes), or b""
    peer: Peer
    rekey_at: float  # the initiator re-keys when it sends after this
    renew_at: float  # ... or when it receives after this (one-way traffic towards it)
    expires_at: float
    forget_at: float
    send_counter: int = 0
    replay: ReplayWindow = field(default_factory=ReplayWindow)
    send_key: bytes | None = None  # the raw keys, for the batch loops (core/fastpath.py)
    recv_key: bytes | None = None
    key: str = ""  # fingerprint of the project key of its handshake (core/keyring.py)
    pod_ip6: bytes = b""  # ... its IPv6 address (16 bytes), or b""
    # the pod addresses it speaks for as text (the bound claim, then the other family's if
    # accepted): the peer's once the session is confirmed (``Sessions.adopt``)
    claims: tuple[str, ...] = ()

    def expire(self) -> None:
        """Drop the keys: from now on the session only answers EXPIRED_SESSION."""
        self.send_aead = None
        self.recv_aead = None
        self.send_key = None
        self.recv_key = None


@dataclass(slots=True, eq=False)
class Pending:
    """Our initiation in flight: retried every rekey_timeout, abandoned after give_up."""

    index: int
    state: HandshakeState
    first_sent: float
    last_sent: float
    rekey: bool  # started to replace a live session (counted in "rekeys" when it completes)
    templates: Templates  # the ring's current key when sent: the response must use it too


@dataclass(slots=True, eq=False)
class Peer:
    endpoint: Endpoint
    pod_ip: str | None = None
    addresses: set[str] = field(default_factory=set)
    allowed: set[bytes] = field(default_factory=set)  # IPv4 ``addresses`` packed (hot path)
    allowed6: set[bytes] = field(default_factory=set)  # IPv6 ``addresses`` packed
    paired: str | None = None  # a dual-stack pod's other address (identity rule 5's pairing)
    current: Session | None = None
    previous: Session | None = None
    next: Session | None = None
    pending: Pending | None = None
    queue: deque[bytes] = field(default_factory=deque)
    up: bool = False  # PeerUp(pod_ip) (and PeerUp(paired)) was emitted and no PeerDown since
    confirmed: bool = False  # a response or an authenticated data message proved its keys
    keepalive_due: float | None = None  # received data, sent nothing since: keepalive then
    stale_due: float | None = None  # sent data, nothing authenticated since: handshake then
    pinned: bool = False  # via a Service VIP: the VIP stays its endpoint (session.py rule 11)
    # for tencrypt status (wg show's): what its last handshake claimed it is (the pod behind a
    # VIP), when that was, and the inner packets and bytes each way (counted per batch)
    claimed: str | None = None
    claimed_other: str | None = None  # ... and the other family's address it claimed
    last_handshake: float | None = None
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0

    def sessions(self) -> list[Session]:
        return [s for s in (self.current, self.previous, self.next) if s is not None]

    def pod_ips(self) -> tuple[str, ...]:
        """Its pod addresses (the bound one first): what PeerUp and PeerDown name."""
        return tuple(a for a in (self.pod_ip, self.paired) if a is not None)


# initiations unanswered this long make a peer "unanswered" (tencrypt status, the metric
# tencrypt_peers_unanswered): a stale session's re-handshake, not a peer gone, takes less
UNANSWERED_AFTER = 5.0


def describe_peer(peer: Peer, now: float, limits: Limits) -> dict[str, object]:
    """One peer as JSON-ready data for ``tencrypt status`` (Tunnel.status)."""
    slots = (("current", peer.current), ("previous", peer.previous), ("next", peer.next))
    sessions = [
        {
            "slot": slot,
            "local_index": s.local_index,
            "age": round(now - (s.expires_at - limits.reject_after_time), 3),
            "expires_in": round(s.expires_at - now, 3),
            "initiator": s.initiator,
            "confirmed": s.confirmed,
            "live": s.recv_aead is not None and now < s.expires_at,
            "sent": s.send_counter,
            "key": s.key,
        }
        for slot, s in slots
        if s is not None
    ]
    return {
        "pod_ip": peer.pod_ip,
        "paired_pod_ip": peer.paired,
        "addresses": sorted(peer.addresses),
        "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}",
        "up": peer.up,
        "confirmed": peer.confirmed,
        "handshake_pending": peer.pending is not None,
        # our initiations have gone unanswered this long (a proxy that is not there, or a
        # NetworkPolicy that drops the tunnel's UDP); None: nothing asked or it answered
        "unanswered_for": None if peer.pending is None else round(now - peer.pending.first_sent, 3),
        "queued": len(peer.queue),
        "sessions": sessions,
        "claimed_pod_ip": peer.claimed,
        "claimed_other_pod_ip": peer.claimed_other,
        "last_handshake_ago": None
        if peer.last_handshake is None
        else round(now - peer.last_handshake, 3),
        "sent": {"packets": peer.tx_packets, "bytes": peer.tx_bytes},
        "received": {"packets": peer.rx_packets, "bytes": peer.rx_bytes},
    }


def describe(table: Sessions, now: float, limits: Limits) -> dict[str, object]:
    """Every peer (``describe_peer``) and the totals: Tunnel.status without the pod IP."""
    peers = [describe_peer(p, now, limits) for p in table.peers]
    peers.sort(key=lambda d: str(d["pod_ip"] or d["addresses"]))
    return {
        "peers": peers,
        "totals": {
            "peers": len(peers),
            "peers_up": sum(1 for p in table.peers if p.up),
            "sessions": sum(1 for s in table.by_index.values() if s.recv_aead is not None),
            "handshakes_pending": len(table.pending),
            "queued": table.queued,
        },
    }


def usable(s: Session | None, now: float, limits: Limits) -> bool:
    """May ``s`` seal another packet? (Keys held, not past either hard limit.)"""
    return (
        s is not None
        and s.send_aead is not None
        and now < s.expires_at
        and s.send_counter < limits.reject_after_messages
    )


class Sessions:
    """The one owner of the tunnel's tables, and of the PeerUp/PeerDown events they imply.

    Rules:
    - An inner address maps to at most one peer; a local index names at most one session
      (tombstones included) or one initiation in flight, and is never 0.
    - A session leaves the tables with its keys: ``forget`` drops both at once.
    - PeerUp is emitted once per peer and pod address (``Peer.pod_ips``), when its first
      session is confirmed, or when an up peer gains an address; PeerDown when that address
      stops being reachable through this peer.
    - An address of the other family joins a peer (``pair``) only from a session that
      accepted it; a peer that held it before (the same pod, reached over its other family:
      crossing handshakes) is merged into the one that gains it.
    - ``queued`` counts the packets waiting in all peers' queues (a global memory bound).
    """

    __slots__ = (
        "peers",
        "by_addr",
        "by_index",
        "pending",
        "events",
        "queued",
        "_rng",
        "_limits",
        "_stats",
    )

    def __init__(self, rng: Callable[[int], bytes], limits: Limits, stats: Stats) -> None:
        self.peers: set[Peer] = set()
        self.by_addr: dict[str, Peer] = {}
        self.by_index: dict[int, Session] = {}
        self.pending: dict[int, Peer] = {}  # local index of our initiation -> its peer
        self.events: list[PeerEvent] = []
        self.queued = 0
        self._rng = rng
        self._limits = limits
        self._stats = stats

    def new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "little")
            if index and index not in self.by_index and index not in self.pending:
                return index

    def new_peer(self, endpoint: Endpoint, address: str) -> Peer:
        peer = Peer(endpoint)
        self.peers.add(peer)
        self.map(peer, address)
        return peer

    def map(self, peer: Peer, address: str) -> None:
        peer.addresses.add(address)
        packed = ipaddress.ip_address(address).packed
        (peer.allowed if len(packed) == 4 else peer.allowed6).add(packed)
        self.by_addr[address] = peer

    def unmap(self, peer: Peer, address: str) -> None:
        peer.addresses.discard(address)
        packed = ipaddress.ip_address(address).packed
        (peer.allowed if len(packed) == 4 else peer.allowed6).discard(packed)
        if self.by_addr.get(address) is peer:
            del self.by_addr[address]

    def install(self, peer: Peer, s: Session) -> None:
        """``s`` becomes current; current becomes previous; the old previous is forgotten."""
        if peer.previous is not None:
            self.forget(peer.previous)
        peer.previous, peer.current = peer.current, s

    def forget(self, s: Session) -> None:
        """A replaced session: its keys and index go now (late packets: UNKNOWN_INDEX)."""
        s.expire()
        drop_slot(s.peer, s)
        self.by_index.pop(s.local_index, None)

    def peer_up(self, peer: Peer) -> None:
        if not peer.up and peer.pod_ip is not None:
            peer.up = True
            self.events.extend(PeerUp(ip, peer.endpoint) for ip in peer.pod_ips())

    def make_room(self, now: float) -> bool:
        """Below max_peers, or after forgetting one idle peer (no usable session, nothing in
        flight); False if every peer is busy."""
        if len(self.peers) < self._limits.max_peers:
            return True
        for peer in self.peers:
            if (
                peer.pending is None
                and not peer.queue
                and peer.next is None
                and not usable(peer.current, now, self._limits)
            ):
                self.remove_peer(peer)
                return True
        return False

    def remove_peer(self, peer: Peer) -> None:
        for s in peer.sessions():
            self.forget(s)
        if peer.pending is not None:
            self.pending.pop(peer.pending.index, None)
            peer.pending = None
        self.queued -= len(peer.queue)
        peer.queue.clear()
        for address in list(peer.addresses):
            self.unmap(peer, address)
        if peer.up:
            self.events.extend(PeerDown(ip) for ip in peer.pod_ips())
        peer.up = False
        self.peers.discard(peer)

    def _move_queue(self, source: Peer, target: Peer) -> None:
        """``source``'s queued packets go behind ``target``'s (a merge of two peers into one);
        what exceeds the queue limit is dropped from the front, counted."""
        target.queue.extend(source.queue)
        source.queue.clear()
        while len(target.queue) > self._limits.queue_limit:
            target.queue.popleft()
            self.queued -= 1
            self._stats.drop(DropReason.QUEUE_FULL)

    def bind_pod_ip(self, peer: Peer, pod_ip: str) -> Peer:
        """A response named the pod behind ``peer``; return the peer that now owns it.

        A VIP can move to another pod (PeerDown for the old one), and two routes can lead to
        one pod (a VIP and the pod IP, two VIPs, crossing handshakes): those peers merge.
        """
        if peer.pod_ip == pod_ip:
            return peer
        if peer.paired == pod_ip and peer.pod_ip is not None:  # bound over its other family
            peer.pod_ip, peer.paired = pod_ip, peer.pod_ip
            return peer
        self.pair(peer, None)  # its other address was paired with the old name
        if peer.pod_ip is not None:
            self.unmap(peer, peer.pod_ip)
            if peer.up:
                self.events.append(PeerDown(peer.pod_ip))
                peer.up = False
            peer.pod_ip = None
        other = self.by_addr.get(pod_ip)
        if other is None or other is peer:
            peer.pod_ip = pod_ip
            self.map(peer, pod_ip)
            return peer
        for address in list(peer.addresses):
            self.map(other, address)
        peer.addresses.clear()
        self._move_queue(peer, other)
        self.remove_peer(peer)
        if other.pod_ip is None:
            other.pod_ip = pod_ip
        return other

    def adopt(self, peer: Peer, s: Session) -> None:
        """A confirmed session's pod addresses become its peer's: the one the peer is known
        by stays ``pod_ip``, the other (or none) becomes ``paired``."""
        if peer.pod_ip is None or peer.pod_ip not in s.claims:
            return  # named after a VIP, or renamed since: nothing to pair
        others = [a for a in s.claims if a != peer.pod_ip]
        self.pair(peer, others[0] if others else None)

    def pair(self, peer: Peer, address: str | None) -> None:
        """``address`` (None: none) becomes ``peer``'s other-family pod address. A peer that
        held it is merged into ``peer`` (its sessions forgotten, its queue taken over): the
        handshake that accepted the pairing proved it is the same pod (core/identity.py rule
        6 refused it if that peer was live elsewhere)."""
        old = peer.paired
        if old == address and (address is None or self.by_addr.get(address) is peer):
            return
        if old is not None:
            self.unmap(peer, old)
            peer.paired = None
            if peer.up:
                self.events.append(PeerDown(old))
        if address is None or address == peer.pod_ip:
            return
        other = self.by_addr.get(address)
        if other is not None and other is not peer:
            self._absorb(peer, other)
        self.map(peer, address)
        peer.paired = address
        if peer.up:
            self.events.append(PeerUp(address, peer.endpoint))

    def _absorb(self, keeper: Peer, gone: Peer) -> None:
        """``gone`` (the same pod as ``keeper``) leaves the tables: its queue and Service VIPs
        go to ``keeper``; PeerDown for what it announced that ``keeper`` does not."""
        announced = gone.pod_ips() if gone.up else ()
        pod_ips = set(gone.pod_ips())
        for address in list(gone.addresses):
            self.unmap(gone, address)
            if address not in pod_ips:
                self.map(keeper, address)
        gone.up, gone.pod_ip, gone.paired = False, None, None
        self._move_queue(gone, keeper)
        self.remove_peer(gone)
        mine = keeper.pod_ips() if keeper.up else ()
        self.events.extend(PeerDown(ip) for ip in announced if ip not in mine)


def drop_slot(peer: Peer, s: Session) -> None:
    """Take ``s`` out of whichever of the peer's three slots holds it."""
    if peer.current is s:
        peer.current = None
    elif peer.previous is s:
        peer.previous = None
    elif peer.next is s:
        peer.next = None
