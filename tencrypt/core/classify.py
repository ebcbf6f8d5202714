"""Which destination addresses belong to this pod's project, learned from DNS answers.

Rules (DESIGN §1 "Classification"):
1. A name under the pod's own project domain (the first resolv.conf ``search`` entry, e.g.
   ``myproject.svc.cluster.local``) is INTERNAL; any other name under the cluster domain
   (``cluster.local``) is EXTERNAL; a name outside the cluster leaves its addresses alone.
2. A/AAAA answers: only records reached from the question by the answer's own CNAME chain
   count (records about unrelated names are ignored), and the *final* name of the chain - the
   owner of the A/AAAA record - decides. So ``a.myproject...`` CNAME ``b.other...`` is
   EXTERNAL (the address is another project's), and an ExternalName service of ours that
   points outside the cluster classifies nothing.
3. PTR answers classify the queried address by the PTR target name. When one answer names an
   address both INTERNAL and EXTERNAL, INTERNAL wins: sealing to a pod that cannot open the
   packet loses it, but sending a peer's traffic in the clear leaks it.
4. Entries live for the record's TTL (the smallest along the chain), clamped to
   [``min_ttl``, ``max_ttl``] so that TTL-0 answers do not make routes flap. A newer answer
   replaces an older one (a VIP that changed owner is re-classified at once).
5. Every change of an address's class - new, changed, expired, evicted - is reported as a
   ``Change(ip, old, new)``; the caller turns changes into routes (``route_action``).
6. The table is bounded; when full, the entry closest to expiry is evicted (and reported).
7. Addresses a reverse lookup could not classify are remembered as unknown for a while
   (``note_unknown``) so that a packet flood to one literal IP costs one PTR query, not many.

Everything here is pure: ``now`` is a monotonic time in seconds passed in by the caller.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from dnslib import QTYPE, DNSLabel, DNSRecord

MAX_CHAIN = 16  # CNAME hops followed from the question; real chains are 1-3 long


class AddrClass(enum.Enum):
    INTERNAL = "internal"  # a pod or Service of this project: seal it
    EXTERNAL = "external"  # another project's pod or Service: leave it in the clear


class RouteAction(enum.Enum):
    NONE = "none"  # the address needs no route of its own
    VIA_TUN = "via_tun"  # a /32 into tenc0 (a peer pod outside the Service CIDR)
    VIA_UPLINK = "via_uplink"  # a /32 out of the uplink (another project's Service VIP)


@dataclass(frozen=True, slots=True)
class Change:
    ip: str
    old: AddrClass | None
    new: AddrClass | None


Labels = tuple[bytes, ...]


def labels_of(name: DNSLabel | str) -> Labels:
    """Lower-cased labels of a name: DNS names compare case-insensitively (RFC 4343)."""
    label = name if isinstance(name, DNSLabel) else DNSLabel(name)
    return tuple(part.lower() for part in label.label)


def _under(name: Labels, domain: Labels) -> bool:
    return len(name) >= len(domain) and name[len(name) - len(domain):] == domain


@dataclass(frozen=True, slots=True)
class Domains:
    """The two domains that decide a name's class."""

    project: Labels  # e.g. (b"myproject", b"svc", b"cluster", b"local")
    cluster: Labels  # e.g. (b"cluster", b"local")

    @classmethod
    def of(cls, project: str, cluster: str) -> Domains:
        return cls(labels_of(project), labels_of(cluster))

    def name_class(self, name: Labels) -> AddrClass | None:
        if self.project and _under(name, self.project):
            return AddrClass.INTERNAL
        if self.cluster and _under(name, self.cluster):
            return AddrClass.EXTERNAL
        return None


@dataclass(slots=True)
class _Entry:
    cls: AddrClass
    expires: float


def _merge(a: tuple[AddrClass, int] | None, b: tuple[AddrClass, int]) -> tuple[AddrClass, int]:
    """Rule 3: INTERNAL wins a conflict; the TTL of the winning class is kept (the longest)."""
    if a is None or (b[0] is AddrClass.INTERNAL and a[0] is AddrClass.EXTERNAL):
        return b
    if a[0] is b[0]:
        return a[0], max(a[1], b[1])
    return a


def _chain(record: DNSRecord, qname: Labels) -> dict[Labels, int]:
    """Names reachable from ``qname`` through the answer's CNAMEs, with the smallest TTL to each."""
    cnames = {labels_of(rr.rname): (labels_of(rr.rdata.label), rr.ttl)
              for rr in record.rr if rr.rtype == QTYPE.CNAME}
    chain = {qname: 1 << 31}
    name, ttl = qname, 1 << 31
    for _ in range(MAX_CHAIN):
        if name not in cnames:
            break
        name, hop_ttl = cnames[name]
        ttl = min(ttl, hop_ttl)
        if name in chain:  # a loop: stop
            break
        chain[name] = ttl
    return chain


def ptr_address(qname: Labels) -> str | None:
    """The address a reverse name (``4.3.2.1.in-addr.arpa``, ``…ip6.arpa``) stands for."""
    try:
        if qname[-2:] == (b"in-addr", b"arpa") and len(qname) == 6:
            return str(ipaddress.IPv4Address(".".join(p.decode() for p in reversed(qname[:4]))))
        if qname[-2:] == (b"ip6", b"arpa") and len(qname) == 34:
            nibbles = "".join(p.decode() for p in reversed(qname[:32]))
            return str(ipaddress.IPv6Address(int(nibbles, 16)))
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def parse_answer_classes(record: DNSRecord, domains: Domains) -> dict[str, tuple[AddrClass, int]]:
    """Rules 1-3: the class and TTL that one answer gives each address it covers."""
    if not record.questions:
        return {}
    q = record.questions[0]
    qname = labels_of(q.qname)
    chain = _chain(record, qname)
    found: dict[str, tuple[AddrClass, int]] = {}
    ptr_ip = ptr_address(qname) if q.qtype == QTYPE.PTR else None
    for rr in record.rr:
        owner = labels_of(rr.rname)
        if owner not in chain:
            continue
        if rr.rtype in (QTYPE.A, QTYPE.AAAA):
            ip, cls = _address(rr.rdata), domains.name_class(owner)
        elif rr.rtype == QTYPE.PTR and ptr_ip is not None:
            ip, cls = ptr_ip, domains.name_class(labels_of(rr.rdata.label))
        else:
            continue
        if ip is not None and cls is not None:
            found[ip] = _merge(found.get(ip), (cls, min(rr.ttl, chain[owner])))
    return found


def _address(rdata: object) -> str | None:
    try:
        return str(ipaddress.ip_address(str(rdata)))
    except ValueError:
        return None


@dataclass(slots=True)
class ClassTable:
    """Address → class with TTL expiry. Owner of the classification state (one per proxy)."""

    domains: Domains
    min_ttl: float = 30.0
    max_ttl: float = 86400.0
    max_entries: int = 65536
    negative_ttl: float = 30.0
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _heap: list[tuple[float, str]] = field(default_factory=list)
    _unknown: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ip: str, now: float) -> AddrClass | None:
        entry = self._entries.get(ip)
        return entry.cls if entry is not None and entry.expires > now else None

    def on_answer(self, record: DNSRecord, now: float) -> list[Change]:
        """Learn from one parsed answer; return the changes it causes."""
        changes: list[Change] = []
        for ip, (cls, ttl) in parse_answer_classes(record, self.domains).items():
            changes += self.learn(ip, cls, ttl, now)
        return changes

    def learn(self, ip: str, cls: AddrClass, ttl: float, now: float) -> list[Change]:
        """Record ``ip`` as ``cls`` for ``ttl`` seconds (rule 4); changes include an eviction."""
        expires = now + min(max(ttl, self.min_ttl), self.max_ttl)
        self._unknown.pop(ip, None)
        entry = self._entries.get(ip)
        if entry is None:
            changes = self._evict() if len(self._entries) >= self.max_entries else []
            self._entries[ip] = _Entry(cls, expires)
            heapq.heappush(self._heap, (expires, ip))
            return [*changes, Change(ip, None, cls)]
        old = entry.cls
        entry.cls = cls
        if expires > entry.expires or old is not cls:
            entry.expires = expires
            heapq.heappush(self._heap, (expires, ip))
        return [] if old is cls else [Change(ip, old, cls)]

    def expire(self, now: float) -> list[Change]:
        """Drop entries whose TTL ran out; return their changes."""
        changes = []
        while self._heap and self._heap[0][0] <= now:
            when, ip = heapq.heappop(self._heap)
            entry = self._entries.get(ip)
            if entry is not None and entry.expires == when:
                del self._entries[ip]
                changes.append(Change(ip, entry.cls, None))
        for ip in [ip for ip, until in self._unknown.items() if until <= now]:
            del self._unknown[ip]
        if len(self._heap) > 4 * len(self._entries) + 64:  # mostly superseded heap items
            self._heap = [(e.expires, ip) for ip, e in self._entries.items()]
            heapq.heapify(self._heap)
        return changes

    def next_expiry(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def note_unknown(self, ip: str, now: float, ttl: float | None = None) -> None:
        """Rule 7: a reverse lookup found no class for ``ip``; do not ask again for a while."""
        if len(self._unknown) >= self.max_entries:
            del self._unknown[next(iter(self._unknown))]
        self._unknown[ip] = now + (self.negative_ttl if ttl is None else ttl)

    def known_unknown(self, ip: str, now: float) -> bool:
        until = self._unknown.get(ip)
        return until is not None and until > now

    def items(self) -> list[tuple[str, AddrClass]]:
        return [(ip, e.cls) for ip, e in self._entries.items()]

    def _evict(self) -> list[Change]:
        """Rule 6: make room by dropping the live entry that expires first."""
        while self._heap:
            when, ip = heapq.heappop(self._heap)
            entry = self._entries.get(ip)
            if entry is not None and entry.expires == when:
                del self._entries[ip]
                return [Change(ip, entry.cls, None)]
        return []


def route_action(ip: str, cls: AddrClass | None, service_cidr: str) -> RouteAction:
    """The route an address of this class needs (DESIGN §1 "Routing").

    The Service CIDR already goes into tenc0, so an INTERNAL VIP needs nothing and an EXTERNAL
    VIP needs a /32 out of the uplink; outside the CIDR (pod IPs) traffic leaves by the uplink
    unless an INTERNAL peer gets a /32 into tenc0. Non-IPv4 addresses need nothing: the tunnel
    carries IPv4 only.
    """
    try:
        addr = ipaddress.ip_address(ip)
        net = ipaddress.ip_network(service_cidr, strict=False)
    except ValueError:
        return RouteAction.NONE
    if cls is None or addr.version != 4 or net.version != 4:
        return RouteAction.NONE
    inside = addr in net
    if cls is AddrClass.INTERNAL:
        return RouteAction.NONE if inside else RouteAction.VIA_TUN
    return RouteAction.VIA_UPLINK if inside else RouteAction.NONE


def plan_routes(changes: Sequence[Change], service_cidr: str,
                keep: frozenset[str] = frozenset()) -> list[tuple[str, RouteAction]]:
    """What to do per changed address: ``(ip, VIA_TUN|VIA_UPLINK)`` = ensure that /32,
    ``(ip, NONE)`` = remove the /32 it had. Addresses in ``keep`` (the pod's own IP, its
    gateway, the cluster DNS server, whose routes setup owns) are never touched."""
    plan = []
    for ch in changes:
        if ch.ip in keep:
            continue
        before = route_action(ch.ip, ch.old, service_cidr)
        after = route_action(ch.ip, ch.new, service_cidr)
        if before is not after:
            plan.append((ch.ip, after))
    return plan
