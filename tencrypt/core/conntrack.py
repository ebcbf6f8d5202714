"""The sender's Service translation: kube-proxy's per-connection DNAT, done in the pod.

A packet the application sends to a Service cluster IP gets the chosen endpoint's pod IP and
target port before it is sealed; the endpoint's replies get the cluster IP and Service port
back before the application sees them (DESIGN §1). core/services.py says which endpoints a
Service port has; this table remembers which one each flow got.

Rules:
1. Out (``translate``; a packet read from tenc0 whose destination is a cluster IP of the
   table): its flow, keyed (proto, source, source port, cluster IP, Service port) — an ICMP
   echo by (ICMP, source, id, cluster IP, 0), an ICMPv6 echo by (ICMPV6, ...) — names its
   endpoint. Addresses in keys are ``packet.addr_key``s, so an IPv4 and an IPv6 flow never
   share one; a cluster IP leads to endpoints of its own family only (core/services.py rule
   2), so a translation never changes a packet's family. A packet without a live
   flow opens one: the ClientIP affinity's endpoint while it is still a candidate, else a
   random candidate (core/services.py rules 4-6). Destination address and port (not for
   ICMP) are rewritten and the checksums updated (RFC 1624; over IPv6 the ICMPv6 checksum too,
   whose pseudo-header holds the addresses). No such Service port, or no
   candidate: REJECT (``service_no_endpoint``). SCTP: REJECT (its CRC32c is not rewritten).
   Malformed: DROP (``malformed_packet``).
2. In (``translate_reply``; a packet opened from the tunnel): one whose (proto, source,
   source port, destination, destination port) is the reply tuple of a live flow gets the
   cluster IP and Service port back as its source. Anything else passes untouched (a flow
   to a pod IP, which needs no translation).
3. ICMP errors travel with their flow: ours about an endpoint's reply (out: the outer
   destination and the quoted source), and an endpoint's about our packet (in: the quoted
   destination, and the outer source, which is the endpoint) — addresses, ports, the quoted
   and the ICMP checksums. An outbound ICMP error to a cluster IP without a flow is dropped.
4. A TCP SYN without ACK on a closed flow is a new connection on a reused tuple: it chooses
   again. Life times as core/flowstate.py; ``tcp_idle`` is long, since an idle connection
   must keep its endpoint.
5. Endpoint changes (``set_table``): a flow whose (endpoint, target port) is no longer in its
   Service port's ``keep`` set is removed, unless it is an open TCP connection: that one
   ends as it would through kube-proxy (the endpoint answers or resets it) and never moves
   to another pod mid-stream. UDP and ICMP flows choose again at their next packet.
   Affinities to an endpoint that is no longer a candidate end.
6. Fragments: a first fragment (MF) records its endpoint under (proto, source, cluster IP,
   IP id; IPv6: the Fragment header's 32-bit id) for FRAG_TIMEOUT, and later fragments of that datagram get the same destination
   address (they carry no ports); a later fragment of a datagram not seen is dropped. The
   replies' later fragments get the cluster IP back by the same rule in reverse.
7. Bound: at most ``max_flows``. A new flow in a full table reaps dead flows, then evicts the
   closed TCP flow idle longest, else the flow idle longest. All flows are this pod's own,
   so no quota per source is needed.
8. A connection the application opens straight to an endpoint's pod IP (no translation)
   can reuse the wire tuple of a Service flow: the kernel picks source ports per
   destination, so port P may go to the cluster IP and then to the pod IP. ``direct_syn``
   sees its SYN: a closed Service flow on that tuple ends there (``service_flows_reused``;
   its replies would otherwise be given the cluster IP and the new connection would never
   complete); an open one cannot be told apart on the wire and is counted
   (``service_tuple_conflicts``), as the rare clash Linux's NAT would resolve by remapping
   the source port.
Pure: buffers, ints and ``now`` in; nothing read from a clock; randomness is ``rng``
(``random.randrange`` in the proxy, a fixed sequence in tests).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
    opens,
    reopens,
)
from tencrypt.core.packet import (
    ADDR_MASK,
    DST,
    ECHO_REPLY,
    ECHO_REQUEST,
    ERRORS,
    ICMP,
    ICMP_PROTO,
    ICMPV6,
    IP_MF,
    SRC,
    TCP,
    UDP,
    IPView,
    addr_key,
    parse_icmp_quote,
    parse_ident,
    parse_ip,
    rewrite_addr,
    rewrite_icmp_quote,
    rewrite_port,
)
from tencrypt.core.services import Backends, ServiceTable
from tencrypt.core.stats import Counter, DropReason, Stats

Key = tuple[int, int, int, int, int]  # (proto, source, source port, cluster IP, Service port)
FragKey = tuple[int, int, int, int]  # (proto, sender, receiver, IP id); addresses as keys

TRANSLATED, REJECT, DROP = 0, -1, -2  # what ``translate`` did
FRAG_TIMEOUT = 30.0  # seconds a datagram's fragments may trail its first (Linux ipfrag_time)
MAX_FRAG_DATAGRAMS = 1024


@dataclass(slots=True)
class ServiceFlow(FlowState):
    endpoint: int = 0  # its key (packet.addr_key)
    target: int = 0  # target port (the echo id for ICMP)


class ServiceFlows:
    """The sending proxy's Service flows. One per proxy, owned by the tenc0 -> seal path and
    the open -> inject path of one event loop."""

    __slots__ = (
        "table",
        "_stats",
        "_rng",
        "_max",
        "_idle",
        "_replies",
        "_endpoints",
        "_affinity",
        "_frags_out",
        "_frags_in",
    )

    def __init__(
        self,
        stats: Stats,
        rng: Callable[[int], int],
        table: ServiceTable | None = None,
        max_flows: int = 65536,
        tcp_idle: float = 86400.0,
        tcp_closed: float = TCP_CLOSED_TIMEOUT,
        udp_idle: float = UDP_TIMEOUT,
        icmp_idle: float = ICMP_TIMEOUT,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.table = table if table is not None else ServiceTable()
        self._stats, self._rng, self._max = stats, rng, max_flows
        self._idle: IdleFlows[Key, ServiceFlow] = IdleFlows(
            (tcp_idle, tcp_closed, udp_idle, icmp_idle)
        )
        self._replies: dict[Key, Key] = {}  # reply tuple -> flow key
        self._endpoints: dict[int, int] = {}  # endpoint -> its flows (translate_reply's filter)
        self._affinity: dict[tuple[int, int, int, int], tuple[int, int, float]] = {}
        self._frags_out: OrderedDict[FragKey, tuple[int, float]] = OrderedDict()
        self._frags_in: OrderedDict[FragKey, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._idle)

    def endpoint_of(self, key: Key, now: float) -> tuple[int, int] | None:
        """(endpoint, target port) of the live flow ``key``, or None (tests, status)."""
        flow = self._live(key, now)
        return None if flow is None else (flow.endpoint, flow.target)

    # --- out: tenc0 -> seal -----------------------------------------------------------------

    def translate(self, buf: bytearray | memoryview, ip: IPView, now: float) -> int:
        """Rule 1: rewrite a packet to a cluster IP for its endpoint. TRANSLATED, REJECT or
        DROP (each counted); on TRANSLATED the new destination is in ``buf``."""
        proto = ip.proto
        if ip.frag:
            return self._later_fragment_out(buf, ip, now)
        v6 = ip.v6
        src, dst = addr_key(ip.src, v6), addr_key(ip.dst, v6)
        if proto == ICMP_PROTO[v6]:
            kind = ip.info >> 8
            if kind in ERRORS[v6]:
                return self._error_out(buf, ip, now)
            if kind != ECHO_REQUEST[v6]:
                return self._reject()
            key: Key = (proto, src, ip.sport, dst, 0)
            backends = self.table.lookup(dst, proto, 0)
        elif proto in (TCP, UDP):
            key = (proto, src, ip.sport, dst, ip.dport)
            backends = self.table.lookup(dst, proto, ip.dport)
        else:  # SCTP (services rule 8) and protocols without ports
            return self._reject()
        flow = self._live(key, now)
        if flow is not None and proto == TCP and reopens(flow, ip.info):
            self._drop_flow(key)  # rule 4: a new connection on a reused tuple
            flow = None
        if flow is None:
            if backends is None:
                return self._reject()
            flow = self._open(key, backends, now)
            if flow is None:
                return self._reject()
        if proto == TCP:
            self._idle.on_tcp(key, flow, ip.info, FIN_OUT, FIN_OUT, now)
        else:
            self._idle.touch(key, flow, flow.queue, now)
        rewrite_addr(buf, ip, DST, flow.endpoint & ADDR_MASK)
        if proto in (TCP, UDP):
            rewrite_port(buf, ip, DST, flow.target)
        if ip.flags & IP_MF:
            self._remember(
                self._frags_out, (proto, src, dst, parse_ident(buf, ip)), flow.endpoint, now
            )
        return TRANSLATED

    def direct_syn(self, buf: bytearray | memoryview, now: float) -> None:
        """Rule 8 for a packet to a pod IP that is an endpoint (the caller checked it is a
        TCP packet to one): only a SYN without ACK is looked at."""
        if buf[0] >> 4 == 4:  # cheap reject first, as for every TCP packet to an endpoint
            ihl = (buf[0] & 0x0F) * 4
            if len(buf) < ihl + 14 or not opens(buf[ihl + 13]):
                return
        ip = parse_ip(buf)
        if ip is None or ip.frag or ip.proto != TCP or not opens(ip.info):
            return
        src, dst = addr_key(ip.src, ip.v6), addr_key(ip.dst, ip.v6)
        key = self._replies.get((TCP, dst, ip.dport, src, ip.sport))
        flow = None if key is None else self._live(key, now)
        if key is None or flow is None:
            return
        if flow.queue == TCP_CLOSED:
            self._drop_flow(key)
            self._stats.inc(Counter.SERVICE_FLOWS_REUSED)
        else:
            self._stats.inc(Counter.SERVICE_TUPLE_CONFLICTS)

    def restore(self, buf: bytearray | memoryview, ip: IPView) -> None:
        """Undo ``translate`` on a packet (``ip``: its view before the translation): the
        cluster IP and Service port back, checksums with them (``--no-strict``'s clear, which
        must go to the node's DNAT, since the proxy never sees the clear reply)."""
        now_ip = parse_ip(buf)
        if now_ip is None:  # cannot happen: translate rewrote a parsed packet in place
            return
        rewrite_addr(buf, now_ip, DST, ip.dst)
        if ip.proto in (TCP, UDP) and not ip.frag:
            rewrite_port(buf, now_ip, DST, ip.dport)

    def _open(self, key: Key, backends: Backends, now: float) -> ServiceFlow | None:
        choice = self._choose(key, backends, now)
        if choice is None:
            return None
        if len(self._idle) >= self._max:
            self.expire(now)
            if len(self._idle) >= self._max:
                self._evict()
        proto = key[0]
        queue = TCP_OPEN if proto == TCP else UDP_LIKE if proto == UDP else ICMP_LIKE
        flow = ServiceFlow(now, queue, endpoint=choice[0], target=choice[1])
        self._idle.insert(key, flow)
        self._replies[_reply_key(key, flow)] = key
        self._endpoints[flow.endpoint] = self._endpoints.get(flow.endpoint, 0) + 1
        self._stats.inc(Counter.SERVICE_FLOWS_CREATED)
        return flow

    def _choose(self, key: Key, backends: Backends, now: float) -> tuple[int, int] | None:
        """Services rules 4-6: the affinity's endpoint while it is a candidate, else random."""
        choose = backends.choose
        if not choose:
            return None
        if backends.affinity:
            akey = (key[0], key[1], key[3], key[4])
            held = self._affinity.get(akey)
            if held is not None and held[2] > now and (held[0], held[1]) in choose:
                self._affinity[akey] = (held[0], held[1], now + backends.affinity)
                return held[0], held[1]
            choice = choose[self._rng(len(choose))]
            self._affinity[akey] = (choice[0], choice[1], now + backends.affinity)
            return choice
        return choose[self._rng(len(choose))]

    def _error_out(self, buf: bytearray | memoryview, ip: IPView, now: float) -> int:
        """Rule 3, out: our stack reports on a reply it got from the cluster IP."""
        q = parse_icmp_quote(buf, ip)
        if q is None or q.proto not in (TCP, UDP) or q.frag:
            return self._drop()
        qsrc, qdst = addr_key(q.src, q.v6), addr_key(q.dst, q.v6)
        flow = self._live((q.proto, qdst, q.dport, qsrc, q.sport), now)
        if flow is None:
            return self._drop()
        endpoint = flow.endpoint & ADDR_MASK
        rewrite_icmp_quote(buf, ip, q, SRC, endpoint, flow.target)
        rewrite_addr(buf, ip, DST, endpoint)
        return TRANSLATED

    def _later_fragment_out(self, buf: bytearray | memoryview, ip: IPView, now: float) -> int:
        src, dst = addr_key(ip.src, ip.v6), addr_key(ip.dst, ip.v6)
        entry = self._frags_out.get((ip.proto, src, dst, parse_ident(buf, ip)))
        if entry is None or now - entry[1] >= FRAG_TIMEOUT:
            return self._drop()
        rewrite_addr(buf, ip, DST, entry[0] & ADDR_MASK)
        return TRANSLATED

    # --- in: open -> inject -----------------------------------------------------------------

    def translate_reply(self, buf: bytearray | memoryview, ip: IPView, now: float) -> None:
        """Rules 2-3 and 6, in: give an endpoint's reply the cluster IP and port back. The
        caller checked the source's key is in ``self.endpoints`` (the cheap filter), or that
        the packet is an ICMP(v6) error, and parsed ``ip``."""
        v6 = ip.v6
        src, dst = addr_key(ip.src, v6), addr_key(ip.dst, v6)
        if ip.frag:
            entry = self._frags_in.get((ip.proto, src, dst, parse_ident(buf, ip)))
            if entry is not None and now - entry[1] < FRAG_TIMEOUT:
                rewrite_addr(buf, ip, SRC, entry[0] & ADDR_MASK)
            return
        proto = ip.proto
        if proto == ICMP_PROTO[v6]:
            kind = ip.info >> 8
            if kind in ERRORS[v6]:
                self._error_in(buf, ip, now)
                return
            if kind != ECHO_REPLY[v6]:
                return
            reply: Key = (proto, src, ip.sport, dst, 0)
        else:
            reply = (proto, src, ip.sport, dst, ip.dport)
        key = self._replies.get(reply)
        if key is None:
            return
        flow = self._live(key, now)
        if flow is None:
            return
        if proto == TCP:
            self._idle.on_tcp(key, flow, ip.info, FIN_IN, FIN_OUT, now)
        else:
            self._idle.touch(key, flow, flow.queue, now)
        vip = key[3] & ADDR_MASK
        rewrite_addr(buf, ip, SRC, vip)
        if proto in (TCP, UDP):
            rewrite_port(buf, ip, SRC, key[4])
        if ip.flags & IP_MF:
            self._remember(self._frags_in, (proto, src, dst, parse_ident(buf, ip)), key[3], now)

    def _error_in(self, buf: bytearray | memoryview, ip: IPView, now: float) -> None:
        """Rule 3, in: the endpoint reports on a packet we translated for it."""
        q = parse_icmp_quote(buf, ip)
        if q is None or q.proto not in (TCP, UDP) or q.frag:
            return
        qsrc, qdst = addr_key(q.src, q.v6), addr_key(q.dst, q.v6)
        key = self._replies.get((q.proto, qdst, q.dport, qsrc, q.sport))
        if key is None or self._live(key, now) is None:
            return
        vip = key[3] & ADDR_MASK
        rewrite_icmp_quote(buf, ip, q, DST, vip, key[4])
        if ip.src == q.dst:
            rewrite_addr(buf, ip, SRC, vip)

    @property
    def endpoints(self) -> dict[int, int]:
        """Endpoint (its key) -> how many flows it has: a reply from anyone else needs no
        look-up."""
        return self._endpoints

    # --- the table ----------------------------------------------------------------------------

    def set_table(self, table: ServiceTable, now: float) -> int:
        """Rule 5: a new Service table; returns how many flows were removed."""
        self.table = table
        removed = 0
        for key, flow in list(self._idle.flows.items()):
            backends = table.lookup(key[3], key[0], key[4])
            if backends is not None and (flow.endpoint, flow.target) in backends.keep:
                continue
            if key[0] == TCP and flow.queue == TCP_OPEN:
                continue  # ends where it is (rule 5)
            self._drop_flow(key)
            removed += 1
        for akey, (ep, target, _) in list(self._affinity.items()):
            backends = table.lookup(akey[2], akey[0], akey[3])
            if backends is None or (ep, target) not in backends.choose:
                del self._affinity[akey]
        if removed:
            self._stats.inc(Counter.SERVICE_FLOWS_REPICKED, removed)
        return removed

    def expire(self, now: float) -> int:
        """Remove every flow past its time, stale affinities and fragment records."""
        reaped = self._idle.reap(now)
        for key, flow in reaped:
            self._unindex(key, flow)
        for akey in [k for k, v in self._affinity.items() if v[2] <= now]:
            del self._affinity[akey]
        for frags in (self._frags_out, self._frags_in):
            while frags and now - next(iter(frags.values()))[1] >= FRAG_TIMEOUT:
                frags.popitem(last=False)
        if reaped:
            self._stats.inc(Counter.SERVICE_FLOWS_EXPIRED, len(reaped))
        return len(reaped)

    def next_expiry(self) -> float | None:
        """When ``expire`` next has something to remove (a flow, an affinity, a fragment
        record), or None. Memory only: lookups already treat each of them as gone."""
        frags = [
            next(iter(f.values()))[1] + FRAG_TIMEOUT for f in (self._frags_out, self._frags_in) if f
        ]
        affinity = min((v[2] for v in self._affinity.values()), default=None)
        return earliest(self._idle.next_expiry(), affinity, *frags)

    def _evict(self) -> None:
        """Rule 7: the closed TCP flow idle longest, else the flow idle longest of any class."""
        key = self._idle.victim()
        assert key is not None  # called on a full table
        self._drop_flow(key)
        self._stats.inc(Counter.SERVICE_FLOWS_EVICTED)

    def _drop_flow(self, key: Key) -> None:
        self._unindex(key, self._idle.remove(key))

    def _live(self, key: Key, now: float) -> ServiceFlow | None:
        """The live flow under ``key``; a dead one (core/flowstate.py rule 2) goes now."""
        if self._idle.dead(key, now):
            self._drop_flow(key)
            self._stats.inc(Counter.SERVICE_FLOWS_EXPIRED)
            return None
        return self._idle.flows.get(key)

    def _unindex(self, key: Key, flow: ServiceFlow) -> None:
        self._replies.pop(_reply_key(key, flow), None)
        left = self._endpoints.get(flow.endpoint, 0) - 1
        if left > 0:
            self._endpoints[flow.endpoint] = left
        else:
            self._endpoints.pop(flow.endpoint, None)

    def _remember(
        self, frags: OrderedDict[FragKey, tuple[int, float]], key: FragKey, addr: int, now: float
    ) -> None:
        frags[key] = (addr, now)
        frags.move_to_end(key)
        if len(frags) > MAX_FRAG_DATAGRAMS:
            frags.popitem(last=False)

    def _reject(self) -> int:
        self._stats.drop(DropReason.SERVICE_NO_ENDPOINT)
        return REJECT

    def _drop(self) -> int:
        self._stats.drop(DropReason.MALFORMED_PACKET)
        return DROP


def _reply_key(key: Key, flow: ServiceFlow) -> Key:
    """The tuple the endpoint's replies to flow ``key`` carry (rule 2)."""
    proto, src, sport, _, _ = key
    if proto in (ICMP, ICMPV6):  # only echoes of their own family have flows
        return (proto, flow.endpoint, sport, src, 0)
    return (proto, flow.endpoint, flow.target, src, sport)
