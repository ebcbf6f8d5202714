"""Receiver-side NAT: Service VIP -> this pod's IP on the way in, and back on the way out.

A peer sends to a Service VIP; kube-proxy DNATs the sealed :1337 datagram to this pod, but the
packet inside still says VIP, which no socket here owns. ``FlowTable`` rewrites it to the pod
IP and remembers which VIP each peer flow used, so that the application's replies leave with
that VIP as source and the peer's socket recognises them (DESIGN.md §1 NAT).

Rules:
0. Families: the table knows at most one pod IP and any Service CIDRs per family (IPv4,
   IPv6); a packet is judged against those of its own family only, and a translation never
   changes its family. A family with no pod IP here has no destination to accept.
1. In (``rewrite_inbound``, packets opened from the tunnel): a destination equal to the pod IP
   of its family passes untouched; one inside a Service CIDR of its family becomes that pod
   IP — statelessly, since every VIP whose :1337 led here is this pod — and the flow is
   recorded; any other destination is dropped as BAD_DESTINATION.
2. Out (``rewrite_outbound``, packets the application wrote to tenc0): source equal to the pod
   IP with a live flow -> source becomes the flow's VIP. Otherwise untouched (True).
3. Flow key: (proto, peer, peer port, local port), the peer as ``packet.addr_key`` (IPv4 and
   IPv6 flows never share a key). ICMP queries use (1, peer, id, 0), ICMPv6 echoes (58, peer,
   id, 0): only requests coming in create one and only replies going out use one, so this
   pod's own pings are never translated. Protocols without ports use (proto, peer, -1, -1).
4. ICMP errors. In: a peer reports on a packet we sent as VIP -> outer destination and quoted
   source VIP -> pod IP (stateless, as 1). Out: our stack reports on a packet that came in for
   a VIP -> outer source and quoted destination -> that flow's VIP. The quoted IP checksum,
   quoted UDP checksum, quoted TCP checksum when the whole TCP header is quoted (as Linux
   nf_nat does) and the ICMP checksum are updated incrementally (see core/packet.py); ICMPv6
   errors alike, their checksum also over the outer pseudo-header.
5. Fragments: later inbound fragments need only the stateless rewrite. Outbound, a first
   fragment's VIP is kept under (proto, peer, IP id; IPv6: the Fragment header's id) for
   FRAG_TIMEOUT, so that the later fragments, which carry no ports, get the same source
   address.
6. Timeouts count idle time since the last packet either way: TCP ``tcp_idle``; TCP after an
   RST, or after a FIN each way, ``tcp_closed`` (an incoming SYN reopens it); UDP and other
   protocols ``udp_idle``; ICMP ``icmp_idle``. A flow past its timeout is dead at once, even
   before ``expire`` reaps it. ``now`` is a monotonic clock.
7. Bound: at most ``max_flows``. A new flow in a full table first reaps dead flows, then evicts
   the closed TCP flow idle longest, else the flow idle longest. Eviction drops the whole entry:
   a later packet of that flow starts a fresh one, never a half mapping.
8. Per-peer quota: a flow belongs to the tunnel peer whose inner source address opened it (the
   key's peer IP: session.py has already checked that the peer may use that source, so
   it cannot be spoofed through the tunnel). One source holds at most ``max_flows_per_peer``
   flows (default a quarter of ``max_flows``; ``max_flows`` or more: no quota); a new flow beyond it first reaps dead flows,
   then is dropped (NAT_PEER_QUOTA) - it never evicts anyone's flow. When the whole table
   is full, the eviction of rule 7 takes the flow from the source holding the most flows,
   so one peer cannot push out the flows of others.
9. Two VIPs, one tuple: when VIP1 and VIP2 both lead here and a peer uses the same (peer IP,
   peer port, local port) for both, this pod's stack sees a single flow and its replies cannot
   say which VIP they answer. UDP, ICMP and others: the latest VIP wins (``nat_vip_remapped``).
   TCP: an open connection keeps its VIP and the other VIP's segments are dropped
   (NAT_CONFLICT), since injected they would land in that connection's socket; once it is
   closed or dead the newcomer takes the flow. (Linux would remap the source port instead.)
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tencrypt.core.flowstate import (
    FIN_IN,
    FIN_OUT,
    ICMP_LIKE,
    ICMP_TIMEOUT,
    TCP_CLOSED,
    TCP_CLOSED_TIMEOUT,
    TCP_OPEN,
    UDP_LIKE,
    UDP_TIMEOUT,
    FlowState,
    IdleFlows,
    earliest,
)
from tencrypt.core.packet import (
    DST,
    ERRORS,
    ICMP_PROTO,
    IP_MF,
    QUERY_REPLY,
    SRC,
    TCP,
    TCP_RST,
    IPView,
    addr_key,
    int_to_ip,
    ip_key,
    parse_icmp_quote,
    parse_ident,
    parse_ip,
    rewrite_addr,
    rewrite_icmp_quote,
)
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.errors import UsageError

FlowKey = tuple[int, int, int, int]
FragKey = tuple[int, int, int]

_REPLIES = tuple(frozenset(replies.values()) for replies in QUERY_REPLY)  # by the view's v6

FRAG_TIMEOUT = 30.0  # seconds a datagram's fragments may trail its first (Linux ipfrag_time)
MAX_FRAG_DATAGRAMS = 1024


@dataclass(slots=True)
class Flow(FlowState):
    vip: int = 0  # the address, of the flow's family (not a key)


class FlowTable:
    """The receiver's NAT state: one per proxy, owned by the udp -> open -> nat -> inject path."""

    __slots__ = (
        "_pod",
        "_nets",
        "_stats",
        "_max",
        "_per_peer",
        "_idle",
        "_frags",
        "_owned",
    )

    def __init__(
        self,
        pod_ip: str | Sequence[str],
        service_cidr: str | Sequence[str] = "172.30.0.0/16",
        stats: Stats | None = None,
        max_flows: int = 65536,
        tcp_idle: float = 7440.0,
        tcp_closed: float = TCP_CLOSED_TIMEOUT,
        udp_idle: float = UDP_TIMEOUT,
        icmp_idle: float = ICMP_TIMEOUT,
        max_flows_per_peer: int | None = None,
    ) -> None:
        self._pod, self._nets = _families(pod_ip, service_cidr)  # rule 0
        if max_flows < 1:
            raise UsageError("max_flows must be at least 1")
        self._stats = stats if stats is not None else Stats()
        self._max = max_flows
        self._per_peer = (
            max(1, max_flows // 4) if max_flows_per_peer is None else max_flows_per_peer
        )
        if self._per_peer < 1:
            raise UsageError("max_flows_per_peer must be at least 1")
        self._owned: dict[int, int] = {}  # peer IP -> flows it holds (rule 8)
        self._idle: IdleFlows[FlowKey, Flow] = IdleFlows(
            (tcp_idle, tcp_closed, udp_idle, icmp_idle)
        )
        self._frags: OrderedDict[FragKey, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._idle)

    def flows_of(self, peer_ip: str) -> int:
        """How many flows ``peer_ip`` holds (rule 8)."""
        return self._owned.get(ip_key(peer_ip), 0)

    # --- the two directions -------------------------------------------------------------------

    def rewrite_inbound(self, buf: bytearray | memoryview, now: float) -> bool:
        """VIP -> pod IP on a packet opened from the tunnel. False: drop it (already counted)."""
        ip = parse_ip(buf)
        if ip is None:
            self._stats.drop(DropReason.MALFORMED_PACKET)
            return False
        vip = ip.dst
        v6 = ip.v6
        pod = self._pod[v6]
        if vip == pod:
            return True
        if pod < 0 or not any(vip & mask == net for net, mask in self._nets[v6]):
            self._stats.drop(DropReason.BAD_DESTINATION)
            return False
        if ip.frag == 0:
            if ip.proto == ICMP_PROTO[v6] and ip.info >> 8 in ERRORS[v6]:
                return self._inbound_icmp_error(buf, ip, pod)
            if not self._track_inbound(ip, now):
                return False
        rewrite_addr(buf, ip, DST, pod)
        return True

    def rewrite_outbound(self, buf: bytearray | memoryview, now: float) -> bool:
        """Pod IP -> VIP on a reply read from tenc0 whose flow came in for a VIP.

        True also when no flow matched and nothing changed; False only for a malformed packet.
        """
        ip = parse_ip(buf)
        if ip is None:
            self._stats.drop(DropReason.MALFORMED_PACKET)
            return False
        v6 = ip.v6
        if ip.src != self._pod[v6]:
            return True
        if ip.frag:
            return self._outbound_fragment(buf, ip, now)
        proto = ip.proto
        peer = addr_key(ip.dst, v6)
        if proto == ICMP_PROTO[v6]:
            kind = ip.info >> 8
            if kind in ERRORS[v6]:
                return self._outbound_icmp_error(buf, ip, now)
            if kind not in _REPLIES[v6]:
                return True
            key = (proto, peer, ip.sport, 0)
        else:
            key = (proto, peer, ip.dport, ip.sport)
        flow = self._live(key, now)
        if flow is None:
            return True
        if proto == TCP:
            self._idle.on_tcp(key, flow, ip.info, FIN_OUT, FIN_IN, now)
        else:
            self._touch(key, flow, flow.queue, now)
        rewrite_addr(buf, ip, SRC, flow.vip)
        if ip.flags & IP_MF:
            self._remember_fragments(buf, ip, flow.vip, now)
        return True

    def expire(self, now: float) -> int:
        """Remove every flow past its timeout; returns how many were removed."""
        reaped = self._idle.reap(now)
        for key, _ in reaped:
            self._disown(key[1])
        removed = len(reaped)
        frags = self._frags
        while frags and now - next(iter(frags.values()))[1] >= FRAG_TIMEOUT:
            frags.popitem(last=False)
        if removed:
            self._stats.inc(Counter.NAT_FLOWS_EXPIRED, removed)
        return removed

    def next_expiry(self) -> float | None:
        """When ``expire`` next has something to remove (a flow past its timeout, a fragment
        record past FRAG_TIMEOUT), or None. Memory only: a dead flow is already dead to
        every lookup (rule 2 of core/flowstate.py)."""
        frags = self._frags
        frag = next(iter(frags.values()))[1] + FRAG_TIMEOUT if frags else None
        return earliest(self._idle.next_expiry(), frag)

    # --- inbound helpers ----------------------------------------------------------------------

    def _track_inbound(self, ip: IPView, now: float) -> bool:
        proto = ip.proto
        if proto == ICMP_PROTO[ip.v6]:
            if ip.info >> 8 not in QUERY_REPLY[ip.v6]:
                return True  # only requests open an ICMP flow
            queue = ICMP_LIKE
        else:
            queue = TCP_OPEN if proto == TCP else UDP_LIKE
        key = (proto, addr_key(ip.src, ip.v6), ip.sport, ip.dport)
        flow = self._live(key, now)
        if flow is None:
            if proto == TCP and ip.info & TCP_RST:
                return True  # nothing to remember about a reset of an unknown flow
            inserted = self._insert(key, ip.dst, queue, now)
            if inserted is None:
                return False
            flow = inserted
        elif flow.vip != ip.dst:
            if flow.queue == TCP_OPEN:
                self._stats.drop(DropReason.NAT_CONFLICT)
                return False
            self._stats.inc(Counter.NAT_VIP_REMAPPED)
            flow.vip = ip.dst
            flow.fins = 0
            self._touch(key, flow, queue, now)
        if proto == TCP:
            self._idle.on_tcp(key, flow, ip.info, FIN_IN, FIN_IN, now)
        else:
            self._touch(key, flow, queue, now)
        return True

    def _inbound_icmp_error(self, buf: bytearray | memoryview, ip: IPView, pod: int) -> bool:
        inner = parse_icmp_quote(buf, ip)
        if inner is None:
            self._stats.drop(DropReason.MALFORMED_PACKET)
            return False
        if inner.src == ip.dst:
            rewrite_icmp_quote(buf, ip, inner, SRC, pod)
        rewrite_addr(buf, ip, DST, pod)
        return True

    # --- outbound helpers ---------------------------------------------------------------------

    def _outbound_icmp_error(self, buf: bytearray | memoryview, ip: IPView, now: float) -> bool:
        inner = parse_icmp_quote(buf, ip)
        if inner is None:
            self._stats.drop(DropReason.MALFORMED_PACKET)
            return False
        v6 = inner.v6
        if inner.dst != self._pod[v6]:
            return True
        if inner.proto == ICMP_PROTO[v6] and inner.info >> 8 not in QUERY_REPLY[v6]:
            return True
        peer = addr_key(inner.src, v6)
        flow = self._live((inner.proto, peer, inner.sport, inner.dport), now)
        if flow is None:
            return True
        rewrite_icmp_quote(buf, ip, inner, DST, flow.vip)
        rewrite_addr(buf, ip, SRC, flow.vip)
        return True

    def _remember_fragments(
        self, buf: bytearray | memoryview, ip: IPView, vip: int, now: float
    ) -> None:
        key = (ip.proto, addr_key(ip.dst, ip.v6), parse_ident(buf, ip))
        self._frags[key] = (vip, now)
        self._frags.move_to_end(key)
        if len(self._frags) > MAX_FRAG_DATAGRAMS:
            self._frags.popitem(last=False)

    def _outbound_fragment(self, buf: bytearray | memoryview, ip: IPView, now: float) -> bool:
        entry = self._frags.get((ip.proto, addr_key(ip.dst, ip.v6), parse_ident(buf, ip)))
        if entry is not None and now - entry[1] < FRAG_TIMEOUT:
            rewrite_addr(buf, ip, SRC, entry[0])
        return True

    # --- the table ----------------------------------------------------------------------------

    def _live(self, key: FlowKey, now: float) -> Flow | None:
        if self._idle.dead(key, now):
            self._remove(key)
            self._stats.inc(Counter.NAT_FLOWS_EXPIRED)
            return None
        return self._idle.flows.get(key)

    def _touch(self, key: FlowKey, flow: Flow, queue: int, now: float) -> None:
        self._idle.touch(key, flow, queue, now)

    def _insert(self, key: FlowKey, vip: int, queue: int, now: float) -> Flow | None:
        """A new flow, or None (counted NAT_PEER_QUOTA) if its peer holds its quota."""
        peer = key[1]
        if self._per_peer < self._max and self._owned.get(peer, 0) >= self._per_peer:
            self.expire(now)
            if self._owned.get(peer, 0) >= self._per_peer:
                self._stats.drop(DropReason.NAT_PEER_QUOTA)
                return None
        if len(self._idle) >= self._max:
            self.expire(now)
            if len(self._idle) >= self._max:
                self._evict()
        flow = Flow(now, queue, vip=vip)
        self._idle.insert(key, flow)
        self._owned[peer] = self._owned.get(peer, 0) + 1
        self._stats.inc(Counter.NAT_FLOWS_CREATED)
        return flow

    def _evict(self) -> None:
        """Rules 7-8: of the source holding the most flows, remove its closed TCP flow idle
        longest, else its flow idle longest of any class (a scan, only when the table is full)."""
        heaviest = max(self._owned, key=self._owned.__getitem__)
        candidates = [next((k for k in q if k[1] == heaviest), None) for q in self._idle.queues]
        closed = candidates[TCP_CLOSED]
        if closed is not None:
            key = closed
        else:
            flows = self._idle.flows
            key = min((k for k in candidates if k is not None), key=lambda k: flows[k].last_seen)
        self._remove(key)
        self._stats.inc(Counter.NAT_FLOWS_EVICTED)

    def _remove(self, key: FlowKey) -> None:
        self._idle.remove(key)
        self._disown(key[1])

    def _disown(self, peer: int) -> None:
        left = self._owned[peer] - 1
        if left:
            self._owned[peer] = left
        else:
            del self._owned[peer]


def _families(
    pod_ips: str | Sequence[str], cidrs: str | Sequence[str]
) -> tuple[tuple[int, int], tuple[tuple[tuple[int, int], ...], ...]]:
    """Rule 0: (IPv4 pod IP, IPv6 pod IP), -1 where none, and per family the Service CIDRs as
    (network, mask) ints. UsageError for a bad address or CIDR, two pod IPs of one family, or
    a pod IP inside a Service CIDR."""
    pods = [-1, -1]
    nets: tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], ...] = ([], [])
    try:
        for text in (pod_ips,) if isinstance(pod_ips, str) else pod_ips:
            addr = ipaddress.ip_address(text)
            if pods[addr.version == 6] >= 0:
                raise UsageError(f"two IPv{addr.version} pod IPs: {pod_ips}")
            pods[addr.version == 6] = int(addr)
        for text in (cidrs,) if isinstance(cidrs, str) else cidrs:
            net = ipaddress.ip_network(text)
            nets[net.version == 6].append(net)
    except ValueError as exc:
        raise UsageError(f"bad pod IP or Service CIDR: {exc}") from exc
    for v6 in (False, True):
        for net in nets[v6]:
            if pods[v6] >= 0 and int(net.network_address) == pods[v6] & int(net.netmask):
                pod = int_to_ip(pods[v6], v6)
                raise UsageError(f"pod IP {pod} lies inside the Service CIDR {net}")
    masks = tuple(tuple((int(n.network_address), int(n.netmask)) for n in f) for f in nets)
    return (pods[0], pods[1]), masks
