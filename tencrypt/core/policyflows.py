"""NetworkPolicy on the tunnel's flows: the verdict of core/netpolicy.py once per new flow,
cached with the flow, as a CNI's connection tracking does (issue #23).

The receiving proxy asks ``inbound`` for every packet it opened before injecting it; the
sending proxy asks ``outbound`` for every packet it is about to seal, after the Service
translation (core/conntrack.py), so the peer is a pod IP and the port its target port, as a
CNI sees them after kube-proxy's DNAT. Traffic that does not go through the tunnel never comes
here: the CNI enforces the policies on it.

Rules:
1. A flow is keyed from the pod's side: (proto, local address, local port, remote address,
   remote port), addresses as ``packet.addr_key``s (IPv4 and IPv6 flows never share a key);
   an ICMP (ICMPv6) echo by its id as the local port and 0 as the remote one. It
   remembers who opened it: this pod (OUT: its egress policies decided) or the peer (IN: the
   pod's ingress policies decided).
2. A packet of a known flow passes either way, without a lookup: replies of an allowed
   connection are allowed [Kubernetes: "reply traffic for those allowed connections will
   also be implicitly allowed"]. A packet of no known flow opens one in the direction it
   travels: out, ``policy.egress(remote, proto, remote port)``; in,
   ``policy.ingress(remote, proto, local port)``. Allowed: the flow is kept with its
   ``Decision``. Denied: the packet is dropped and counted; nothing is kept, so a peer that
   is denied cannot fill the table. A TCP SYN on a closed flow opens a new one (a reused
   tuple), decided again.
3. ICMP errors travel with the flow they quote (conntrack's RELATED): an error that quotes a
   packet of a known flow passes; any other is a new ICMP flow (rule 2, port 0). ICMPv6
   errors alike (types 1-4, RFC 4443); ICMPv6 is decided as its own protocol, 58.
4. Fragments: a first fragment that passes (MF set) records its datagram (proto, source,
   destination, IP id; IPv6: the Fragment header's id) for FRAG_TIMEOUT; a later fragment passes if its datagram was
   recorded, else it is decided as a new flow without a port (only rules without ports can
   allow it).
5. A new policy (``set_policy``) decides every known flow again with the direction it was
   opened in, as OVN-Kubernetes does when an ACL changes: a flow the new policy denies is
   kept as *blocked* and its packets are dropped both ways until it idles out, so a
   connection allowed by a rule that was removed ends; one that is allowed again passes
   again. Fragment records are dropped.
6. Tracking is on while a policy is loaded (``policy`` is not None), isolating or not, so a
   policy added during traffic knows which side opened each connection. No policy (standalone
   mode, an agent that sends none): nothing is tracked and nothing is enforced.
7. Bound: at most ``max_flows``; a new flow in a full table reaps dead flows, then evicts
   the closed TCP flow idle longest, else the flow idle longest (counted). Life times as
   core/flowstate.py, TCP open flows one day.
8. Counted: every allowed new flow by (direction, policy, rule), every denied packet by
   (direction, the isolating policies) and by peer (``denied_by_peer``, bounded): the
   metrics and ``tencrypt status`` show them.
Pure: buffers, ints and ``now`` in; nothing read from a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tencrypt.core.flowstate import (
    FIN_IN,
    FIN_OUT,
    ICMP_LIKE,
    ICMP_TIMEOUT,
    TCP_CLOSED_TIMEOUT,
    TCP_OPEN,
    UDP_LIKE,
    UDP_TIMEOUT,
    FlowState,
    IdleFlows,
    earliest,
    reopens,
)
from tencrypt.core.netpolicy import Decision, NetPolicy
from tencrypt.core.packet import (
    ECHO_REPLY,
    ECHO_REQUEST,
    ERRORS,
    ICMP_PROTO,
    IP_MF,
    TCP,
    V6,
    IPView,
    addr_key,
    parse_icmp_quote,
    parse_ident,
)
from tencrypt.core.stats import Counter, DropReason, Stats

OUT, IN = FIN_OUT, FIN_IN  # who opened a flow (rule 1), as core/flowstate.py's directions
Key = tuple[int, int, int, int, int]  # (proto, local, local port, remote, remote port)
FragKey = tuple[int, int, int, int]  # (proto, source, destination, IP id); addresses as keys
FRAG_TIMEOUT = 30.0  # seconds (Linux ipfrag_time), as core/conntrack.py
MAX_FRAG_DATAGRAMS = 1024
MAX_LABELS = 4096  # distinct (direction, policy, rule) counters kept; more count as "other"
MAX_PEERS = 4096  # peers with a denied count kept for status


@dataclass(slots=True)
class PolicyFlow(FlowState):
    opener: int = OUT
    decision: Decision | None = None  # what allowed it (None: blocked by a newer policy)


class PolicyFlows:
    """One proxy's policy flows, owned by its event loop (both paths)."""

    __slots__ = (
        "policy",
        "document",
        "tunnel_blocked",
        "allowed",
        "denied",
        "denied_by_peer",
        "_stats",
        "_max",
        "_idle",
        "_frags",
    )

    def __init__(
        self,
        stats: Stats,
        max_flows: int = 65536,
        tcp_idle: float = 86400.0,
        tcp_closed: float = TCP_CLOSED_TIMEOUT,
        udp_idle: float = UDP_TIMEOUT,
        icmp_idle: float = ICMP_TIMEOUT,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.policy: NetPolicy | None = None
        self.document: str | None = None  # the policy's text, as the membership carried it
        self.tunnel_blocked: tuple[tuple[str, str], ...] = ()  # the agent's report (status)
        self.allowed: dict[tuple[str, str, str], int] = {}  # (direction, policy, rule) -> flows
        self.denied: dict[tuple[str, str], int] = {}  # (direction, isolating policies) -> pkts
        self.denied_by_peer: OrderedDict[int, int] = OrderedDict()  # peer key -> packets
        self._stats, self._max = stats, max_flows
        self._idle: IdleFlows[Key, PolicyFlow] = IdleFlows(
            (tcp_idle, tcp_closed, udp_idle, icmp_idle)
        )
        self._frags: OrderedDict[FragKey, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._idle)

    @property
    def blocked(self) -> int:
        """Known flows a newer policy denies (rule 5)."""
        return sum(1 for f in self._idle.flows.values() if f.decision is None)

    # --- the two paths ----------------------------------------------------------------------

    def outbound(self, buf: bytes | bytearray | memoryview, ip: IPView, now: float) -> bool:
        """May this packet, about to be sealed, leave? (Counted when not.)"""
        v6 = ip.v6
        src, dst = addr_key(ip.src, v6), addr_key(ip.dst, v6)
        if ip.proto == ICMP_PROTO[v6] and not ip.frag and ip.info >> 8 in ERRORS[v6]:
            q = parse_icmp_quote(buf, ip)  # our stack reports on the peer's packet
            if q is not None and self._known(_quoted(q, OUT), now):
                return True
        return self._packet(buf, ip, OUT, (ip.proto, src, ip.sport, dst, ip.dport), now)

    def inbound(self, buf: bytes | bytearray | memoryview, ip: IPView, now: float) -> bool:
        """May this opened packet be injected? (Counted when not.)"""
        v6 = ip.v6
        src, dst = addr_key(ip.src, v6), addr_key(ip.dst, v6)
        if ip.proto == ICMP_PROTO[v6] and not ip.frag and ip.info >> 8 in ERRORS[v6]:
            q = parse_icmp_quote(buf, ip)  # the peer reports on our packet
            if q is not None and self._known(_quoted(q, IN), now):
                return True
        return self._packet(buf, ip, IN, (ip.proto, dst, ip.dport, src, ip.sport), now)

    def _packet(
        self, buf: bytes | bytearray | memoryview, ip: IPView, way: int, key: Key, now: float
    ) -> bool:
        policy = self.policy
        if policy is None:
            return True
        proto = ip.proto
        v6 = ip.v6
        if ip.frag:  # rule 4: a later fragment has no ports
            fkey = (proto, addr_key(ip.src, v6), addr_key(ip.dst, v6), parse_ident(buf, ip))
            seen = self._frags.get(fkey)
            if seen is not None and now - seen < FRAG_TIMEOUT:
                return True
            return self._decide_unkept(policy, way, key[3], proto, -1)
        icmp = proto == ICMP_PROTO[v6]
        if icmp:
            echo = ip.info >> 8 in (ECHO_REQUEST[v6], ECHO_REPLY[v6])
            key = (proto, key[1], ip.sport if echo else 0, key[3], 0)
        flow = self._live(key, now)
        if flow is not None and proto == TCP and reopens(flow, ip.info):
            self._idle.remove(key)  # rule 2: a new connection on a reused tuple
            flow = None
        if flow is None:
            port = 0 if icmp else key[4] if way == OUT else key[2]
            decision = self._decide(policy, way, key[3], proto, port)
            if not decision.allowed:
                self._count_denied(way, key[3], decision)
                return False
            flow = self._open(key, way, decision, now)
        elif flow.decision is None:  # rule 5: blocked by a newer policy (counted as its opener's)
            denied = self._decide(policy, flow.opener, *_opened(key, flow))
            self._count_denied(flow.opener, key[3], denied)
            return False
        if proto == TCP:
            self._idle.on_tcp(key, flow, ip.info, way, flow.opener, now)
        else:
            self._idle.touch(key, flow, flow.queue, now)
        if ip.flags & IP_MF:
            fkey = (proto, addr_key(ip.src, v6), addr_key(ip.dst, v6), parse_ident(buf, ip))
            self._remember(fkey, now)
        return True

    # --- policies ---------------------------------------------------------------------------

    def set_policy(self, policy: NetPolicy | None, now: float) -> int:
        """Rule 5 (rule 6 for None); returns how many known flows the new policy blocks."""
        self.policy = policy
        self._frags.clear()
        if policy is None:
            self._idle = IdleFlows(self._idle.timeouts)
            return 0
        blocked = 0
        for key, flow in self._idle.flows.items():
            decision = self._decide(policy, flow.opener, *_opened(key, flow))
            flow.decision = decision if decision.allowed else None
            blocked += not decision.allowed
        return blocked

    def expire(self, now: float) -> int:
        """Remove every flow past its time, and old fragment records."""
        reaped = len(self._idle.reap(now))
        frags = self._frags
        while frags and now - next(iter(frags.values())) >= FRAG_TIMEOUT:
            frags.popitem(last=False)
        return reaped

    def next_expiry(self) -> float | None:
        """When ``expire`` next has a flow or a fragment record to remove, or None."""
        frags = self._frags
        frag = next(iter(frags.values())) + FRAG_TIMEOUT if frags else None
        return earliest(self._idle.next_expiry(), frag)

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _decide(policy: NetPolicy, way: int, remote: int, proto: int, port: int) -> Decision:
        if way == OUT:
            return policy.egress(remote, proto, port)
        return policy.ingress(remote, proto, port)

    def _decide_unkept(
        self, policy: NetPolicy, way: int, remote: int, proto: int, port: int
    ) -> bool:
        decision = self._decide(policy, way, remote, proto, port)
        if not decision.allowed:
            self._count_denied(way, remote, decision)
        return decision.allowed

    def _known(self, key: Key, now: float) -> bool:
        flow = self._live(key, now)
        return flow is not None and flow.decision is not None

    def _live(self, key: Key, now: float) -> PolicyFlow | None:
        if self._idle.dead(key, now):
            self._idle.remove(key)
            return None
        return self._idle.flows.get(key)

    def _open(self, key: Key, way: int, decision: Decision, now: float) -> PolicyFlow:
        idle = self._idle
        if len(idle) >= self._max:
            self.expire(now)
            victim = idle.victim() if len(idle) >= self._max else None
            if victim is not None:
                idle.remove(victim)
                self._stats.inc(Counter.NETPOL_FLOWS_EVICTED)
        proto = key[0]
        queue = TCP_OPEN if proto == TCP else ICMP_LIKE if _is_icmp(key) else UDP_LIKE
        flow = PolicyFlow(now, queue, opener=way, decision=decision)
        idle.insert(key, flow)
        if decision.policy is not None:  # allowed by a rule, not by no isolation or self
            label = (_WAY[way], decision.policy, str(decision.rule))
            if label in self.allowed or len(self.allowed) < MAX_LABELS:
                self.allowed[label] = self.allowed.get(label, 0) + 1
        return flow

    def _count_denied(self, way: int, remote: int, decision: Decision) -> None:
        self._stats.drop(DropReason.NETWORK_POLICY)
        label = (_WAY[way], ",".join(decision.isolating))
        if label in self.denied or len(self.denied) < MAX_LABELS:
            self.denied[label] = self.denied.get(label, 0) + 1
        peers = self.denied_by_peer
        peers[remote] = peers.get(remote, 0) + 1
        peers.move_to_end(remote)
        if len(peers) > MAX_PEERS:
            peers.popitem(last=False)

    def _remember(self, key: FragKey, now: float) -> None:
        frags = self._frags
        frags[key] = now
        frags.move_to_end(key)
        if len(frags) > MAX_FRAG_DATAGRAMS:
            frags.popitem(last=False)


_WAY = {OUT: "egress", IN: "ingress"}


def _opened(key: Key, flow: PolicyFlow) -> tuple[int, int, int]:
    """(remote, proto, the port the opener's policy decides on) of a known flow."""
    proto, _, lport, remote, rport = key
    return remote, proto, 0 if _is_icmp(key) else rport if flow.opener == OUT else lport


def _is_icmp(key: Key) -> bool:
    """Is ``key`` an ICMP flow of its family (ICMP for IPv4, ICMPv6 for IPv6)?"""
    return key[0] == ICMP_PROTO[key[3] >= V6]


def _quoted(q: IPView, way: int) -> Key:
    """The key of the flow the quoted packet ``q`` belongs to: the peer's packet (OUT, our
    stack's error about it) or ours (IN, the peer's error)."""
    src, dst = addr_key(q.src, q.v6), addr_key(q.dst, q.v6)
    if way == OUT:
        return (q.proto, dst, q.dport, src, q.sport)
    return (q.proto, src, q.sport, dst, q.dport)
