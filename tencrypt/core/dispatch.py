"""The outbound decision, in one place: what happens to a packet the application wrote to tenc0
(DESIGN §1, §1a; boringtun's ``TunnResult`` is the idea: one result tells the shell what to do).

Stages of ``route`` for one packet (or one super-packet's header), read top to bottom:
1. Service translation (cluster mode: a format-2 membership is loaded): a destination that is
   a cluster IP of the project's Services gets its flow's endpoint and target port
   (core/conntrack.py); REJECT when the Service port has no endpoint, DROP when malformed. A
   cluster IP of the project that the Service table does not list yet (a Service created a
   moment ago, named by DNS before the agent's file arrived) WAITs for the membership.
2. A destination that already has a tunnel peer: SEAL (the common case, one dict look-up).
3. The verdict table (core/policy.py) from the destination's class (core/classify.py):
   SEAL, CLEAR, HOLD (a reverse lookup decides) or REFUSE.
4. NetworkPolicy (a policy document is loaded, core/policyflows.py): a SEAL is its flow's; a
   new flow the pod's egress policies deny (after stage 1: pod IP and target port, as a CNI
   sees them after kube-proxy's DNAT) is DENY. Packets to the clear are the CNI's to police.
The shell executes the result: SEAL → the tunnel; CLEAR (and FALLBACK, ``--no-strict``'s
clear for an internal peer without a proxy) → the uplink; HOLD/WAIT → ``hold``
(which says whether a lookup must start); REFUSE and DENY → ICMP "administratively
prohibited" (strict mode's immediate refusal; DENY is counted here); REJECT → ICMP "port
unreachable" from the cluster IP (kube-proxy's REJECT); DROP → nothing (counted here).

Rules:
1. Nothing leaves in the clear unless the verdict table says CLEAR (DESIGN §1a); a packet to
   a project cluster IP is never sent anywhere untranslated in cluster mode: it is
   translated to a project pod, rejected, or waits.
2. Held packets are bounded per destination and in total (core/holdqueue.py); what does not
   fit is dropped (``queue_full``). A WAIT lasts at most ``wait_for_members`` seconds, then
   its packets are refused; a HOLD lasts until its lookup ends (the resolver's time-out).
3. ``on_reply`` undoes the translation on packets coming back (opened from the tunnel, or an
   ICMP error the proxy builds about a translated packet), so the application only ever
   sees the cluster IP and Service port it used.
4. The state here (Service flows, holds, the ``--no-strict`` fallbacks) has this one owner;
   the classification table is the resolver's, read here and written by the shell.
5. ``locked`` (a membership file is there but none could ever be loaded: a broken agent
   feed): strict mode does not fall back to standalone's weaker evidence; a destination in
   the guarded ranges that is not internal is refused at once, never held for a reverse
   lookup that could open the clear.
6. ``admit``: an opened packet passes the pod's ingress policies (or is a reply of an
   allowed flow, core/policyflows.py) before rule 3 and the injection; else it is dropped,
   counted.
7. Both families, one path: an IPv6 packet goes through the same stages as an IPv4 one (an
   IPv6 cluster IP to one of its IPv6 endpoints, the same verdicts, holds, refusals). Text
   addresses (``dst``, what ``route`` returns, hold keys) are ``str(ipaddress.ip_address(..))``:
   IPv6 in its compressed form; the Service table's ints are ``packet.addr_key``s.
Pure: no I/O, ``now`` an argument.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Sequence

from tencrypt.core.classify import AddrClass, ClassTable
from tencrypt.core.conntrack import DROP, REJECT, ServiceFlows
from tencrypt.core.flowstate import earliest
from tencrypt.core.holdqueue import HoldQueue
from tencrypt.core.packet import EXT_WALKED, ICMP, ICMPV6, TCP, V6, int_to_ip, parse_ip
from tencrypt.core.policy import Guard, Verdict, decide
from tencrypt.core.policyflows import PolicyFlows
from tencrypt.core.services import ServiceTable
from tencrypt.core.stats import DropReason, Stats

HOLD_PER_DESTINATION = 64  # packets held per destination (a lookup's or the membership's wait)
HOLD_TOTAL = 4096  # and over all destinations (memory bound)
WAIT_FOR_MEMBERS = 3.0  # seconds a new project cluster IP waits for the agent's next file


class Out(enum.Enum):
    SEAL = "seal"  # to the tunnel peer at ``dst``
    CLEAR = "clear"  # out of the uplink, untouched: positively not the project's
    FALLBACK = "fallback"  # the same, for an internal peer without a proxy (--no-strict only)
    HOLD = "hold"  # until a reverse lookup of ``dst`` decides
    WAIT = "wait"  # until the membership lists ``dst`` (a new Service)
    REFUSE = "refuse"  # ICMP administratively prohibited to the sender
    REJECT = "reject"  # ICMP port unreachable from the cluster IP (no endpoint)
    DENY = "deny"  # a NetworkPolicy denies the new flow: refused as REFUSE; counted
    DROP = "drop"  # malformed; counted


_VERDICTS = {
    Verdict.SEAL: Out.SEAL,
    Verdict.CLEAR: Out.CLEAR,
    Verdict.HOLD: Out.HOLD,
    Verdict.REFUSE: Out.REFUSE,
}


class Dispatcher:
    """The outbound decision of one proxy (see the module stages and rules)."""

    __slots__ = (
        "table",
        "guard",
        "strict",
        "stats",
        "peers",
        "flows",
        "holds",
        "plaintext_until",
        "wait_for_members",
        "locked",
        "netpol",
        "_cluster",
        "_vips",
        "_texts",
    )

    def __init__(
        self,
        table: ClassTable,
        guard: Guard,
        strict: bool,
        stats: Stats,
        peers: Container[str],
        flows: ServiceFlows,
        wait_for_members: float = WAIT_FOR_MEMBERS,
    ) -> None:
        self.table, self.guard, self.strict, self.stats = table, guard, strict, stats
        table.guarded = self._guarded  # forward answers only hint in the guarded ranges
        self.peers = peers  # addresses the tunnel has a peer for (Sessions.by_addr)
        self.flows = flows
        self.holds: HoldQueue[str, bytes] = HoldQueue(HOLD_PER_DESTINATION, HOLD_TOTAL)
        self.plaintext_until: dict[str, float] = {}  # --no-strict: peer -> clear until
        self.wait_for_members = wait_for_members
        self.locked = False  # rule 5: a membership file exists but none could ever be loaded
        self.netpol = PolicyFlows(stats)  # stage 4 and rule 6 (no policy: nothing enforced)
        self._cluster = False
        self._vips: frozenset[str] = frozenset()  # the Service table's cluster IPs, as text
        self._texts: dict[int, str] = {}  # endpoint -> its text (the tunnel names peers so)

    # ---- configuration ----------------------------------------------------------------------

    @property
    def cluster(self) -> bool:
        """Cluster mode: a Service table from a format-2 membership is in force."""
        return self._cluster

    def set_services(self, table: ServiceTable | None, now: float) -> None:
        """A new membership: its Service table (None: format 1 or none, standalone's path)."""
        self._cluster = table is not None
        table = table or ServiceTable()
        self.flows.set_table(table, now)
        self._vips = frozenset(int_to_ip(vip) for vip in table.by_vip)
        self._texts = {
            ep: int_to_ip(ep)
            for ports in table.by_vip.values()
            for b in ports.values()
            for ep, _ in b.choose
        }

    def _guarded(self, ip: str) -> bool:
        return ip in self.guard

    # ---- the decision -----------------------------------------------------------------------

    def route(
        self, buf: bytearray | memoryview, dst: str, now: float, looked_up: bool = False
    ) -> tuple[Out, str]:
        """Stages 1-4 for a packet to ``dst`` (its destination, as text: rule 7). Returns what
        to do and the destination after translation (``buf`` rewritten in place)."""
        out, to = self._route(buf, dst, now, looked_up)
        if out is Out.SEAL and self.netpol.policy is not None:  # stage 4
            ip = parse_ip(buf)
            if ip is None:
                self.stats.drop(DropReason.MALFORMED_PACKET)
                return Out.DROP, to
            if not self.netpol.outbound(buf, ip, now):
                return Out.DENY, to
        return out, to

    def _route(
        self, buf: bytearray | memoryview, dst: str, now: float, looked_up: bool
    ) -> tuple[Out, str]:
        if self._cluster:
            if dst in self._vips:
                ip = parse_ip(buf)
                if ip is None:
                    self.stats.drop(DropReason.MALFORMED_PACKET)
                    return Out.DROP, dst
                done = self.flows.translate(buf, ip, now)
                if done == REJECT:
                    return Out.REJECT, dst
                if done == DROP:
                    return Out.DROP, dst
                endpoint = self._text(_dst_key(buf))
                if endpoint in self.peers:
                    return Out.SEAL, endpoint
                out, _ = self._verdict(endpoint, now, looked_up)
                if out is Out.FALLBACK:  # --no-strict, no proxy there: the node's DNAT decides
                    self.flows.restore(buf, ip)
                    return out, dst
                return out, endpoint
            if self._unlisted_service(dst, now):
                return Out.WAIT, dst
            if _maybe_tcp(buf) and _dst_key(buf) in self.flows.endpoints:
                self.flows.direct_syn(buf, now)  # conntrack rule 8: a reused wire tuple
        if dst in self.peers:
            return Out.SEAL, dst
        return self._verdict(dst, now, looked_up)

    def _verdict(self, dst: str, now: float, looked_up: bool) -> tuple[Out, str]:
        """Stage 3: the verdict table from ``dst``'s class (rule 5: ``locked``)."""
        if self.locked and self.strict and dst in self.guard:
            cls = self.table.lookup(dst, now)
            return (Out.SEAL if cls is AddrClass.INTERNAL else Out.REFUSE), dst
        cls = self.table.lookup(dst, now)
        verdict = decide(
            cls,
            guarded=dst in self.guard,
            strict=self.strict,
            looked_up=looked_up or self.table.known_unknown(dst, now),
            fallback=self.plaintext_until.get(dst, 0.0) > now,
        )
        if verdict is Verdict.CLEAR and cls is AddrClass.INTERNAL:
            return Out.FALLBACK, dst
        return _VERDICTS[verdict], dst

    def _unlisted_service(self, dst: str, now: float) -> bool:
        """Stage 1's WAIT: an internal address inside the Service CIDR that the table does
        not list (a VIP is never a pod, so only a Service can be internal there)."""
        return self.guard.in_services(dst) and (
            self.table.lookup(dst, now) is AddrClass.INTERNAL or self.table.hinted(dst, now)
        )

    def _text(self, addr: int) -> str:
        text = self._texts.get(addr)
        if text is None:  # an endpoint a kept TCP flow still uses after it left the table
            text = self._texts[addr] = int_to_ip(addr)
        return text

    # ---- held packets ------------------------------------------------------------------------

    def hold(
        self, out: Out, dst: str, packets: Sequence[bytes | bytearray | memoryview], now: float
    ) -> bool:
        """Keep ``packets`` for ``dst`` (rule 2); True when the shell must start the reverse
        lookup (the first HOLD of ``dst``). Copies: the shell reuses its buffers."""
        deadline = now + self.wait_for_members if out is Out.WAIT else float("inf")
        new, refused = self.holds.add(dst, [bytes(p) for p in packets], deadline)
        if refused:
            self.stats.drop(DropReason.QUEUE_FULL, refused)
        return new and out is Out.HOLD

    def release(self, dst: str) -> list[bytearray]:
        """What waited for ``dst``, to route again (its lookup ended)."""
        return [bytearray(p) for p in self.holds.pop(dst)]

    def listed(self) -> list[tuple[str, list[bytearray]]]:
        """What waited for Services the table now lists (after a new membership)."""
        return [(dst, self.release(dst)) for dst in self.holds if dst in self._vips]

    def overdue(self, now: float) -> list[tuple[str, list[bytes]]]:
        """WAITs past their deadline: the shell refuses them (rule 2)."""
        due = self.holds.expired(now)
        for _, packets in due:
            self.stats.drop(DropReason.SERVICE_UNKNOWN, len(packets))
        return due

    # ---- replies -----------------------------------------------------------------------------

    def admit(self, buf: bytearray | memoryview, now: float) -> bool:
        """Rule 6, then rule 3: may an opened packet be injected (False: dropped, counted)?"""
        netpol = self.netpol
        if netpol.policy is not None:
            ip = parse_ip(buf)
            if ip is None:
                self.stats.drop(DropReason.MALFORMED_PACKET)
                return False
            if not netpol.inbound(buf, ip, now):
                return False
        self.on_reply(buf, now)
        return True

    def on_reply(self, buf: bytearray | memoryview, now: float) -> None:
        """Rule 3: an endpoint's reply (or an ICMP error about a translated packet) gets the
        cluster IP and Service port back. A cheap filter first: most packets need nothing."""
        flows = self.flows
        if not flows.endpoints or len(buf) < 20:
            return
        if buf[0] >> 4 == 6:
            if len(buf) < 40 or (
                int.from_bytes(buf[8:24], "big") | V6 not in flows.endpoints
                and buf[6] != ICMPV6
                and buf[6] not in EXT_WALKED  # an ICMPv6 error behind extension headers
            ):
                return
        elif int.from_bytes(buf[12:16], "big") not in flows.endpoints and buf[9] != ICMP:
            return
        ip = parse_ip(buf)
        if ip is not None:
            flows.translate_reply(buf, ip, now)

    def give_up(self, address: str, until: float) -> None:
        """--no-strict: ``address`` went unanswered; the clear is used until ``until``."""
        self.plaintext_until[address] = until

    def next_expiry(self) -> float | None:
        """When ``expire`` or ``overdue`` next has something to do, or None: the earliest WAIT
        deadline (then refused, exactly: rule 2), Service and policy flow expiry and the end
        of a --no-strict clear period (memory only: each is checked against ``now`` where
        it is used)."""
        clear = min(self.plaintext_until.values(), default=None)
        return earliest(
            self.holds.next_deadline(), self.flows.next_expiry(), self.netpol.next_expiry(), clear
        )

    def expire(self, now: float) -> None:
        self.flows.expire(now)
        self.netpol.expire(now)
        for address in [a for a, t in self.plaintext_until.items() if t <= now]:
            del self.plaintext_until[address]


def _dst_key(buf: bytearray | memoryview) -> int:
    """The destination address's key (``packet.addr_key``) of a parsed packet."""
    if buf[0] >> 4 == 6:
        return int.from_bytes(buf[24:40], "big") | V6
    return int.from_bytes(buf[16:20], "big")


def _maybe_tcp(buf: bytearray | memoryview) -> bool:
    """Could it be TCP (conntrack rule 8's filter)? IPv4's protocol byte; IPv6's Next Header,
    or an extension header that may lead to TCP (direct_syn parses it)."""
    if buf[0] >> 4 == 6:
        return len(buf) >= 40 and (buf[6] == TCP or buf[6] in EXT_WALKED)
    return buf[9] == TCP
