"""Which destination addresses belong to this pod's project: the evidence, and the class it gives.

Rules (DESIGN §1 "Classification", §1a "Fail closed"):
1. A name under the pod's own project domain (the first resolv.conf ``search`` entry, e.g.
   ``myproject.svc.cluster.local``) is INTERNAL; any other name under the cluster domain
   (``cluster.local``) is EXTERNAL; a name outside the cluster leaves its addresses alone. A
   name under ``pod.<cluster domain>`` is no evidence at all, whatever its namespace: CoreDNS
   (``pods insecure``, its default) synthesises ``a-b-c-d.<any namespace>.pod...`` for any
   address, unchecked.
2. A/AAAA answers: only records reached from the question by the answer's own CNAME chain
   count (records about unrelated names are ignored), and the *final* name of the chain - the
   owner of the A/AAAA record - decides. So ``a.myproject...`` CNAME ``b.other...`` is
   EXTERNAL (the address is another project's), and an ExternalName service of ours that
   points outside the cluster classifies nothing.
3. PTR answers classify the queried address by the PTR target name. When one answer names an
   address both INTERNAL and EXTERNAL, INTERNAL wins: sealing to a pod that cannot open the
   packet loses it, but sending a peer's traffic in the clear leaks it.
4. Evidence that an address is INTERNAL, strongest first: the project's membership (from the
   node agent: no expiry while listed), an authenticated tunnel session (``note_session``), a
   DNS answer under the project's domains, and what a previous run of the proxy had put in the
   firewall (``adopt``, so a restart opens no window). Evidence that it is EXTERNAL: only a DNS
   answer naming it under another project. DNS evidence lives for the record's TTL (the
   smallest along the chain), clamped to [``min_ttl``, ``max_ttl``] (``MAX_TTL``, a day, as
   resolvers cap it; a TTL with its top bit set counts as 0, RFC 2181 §8). The DNS proxy's
   answer cache is capped at the same ``max_ttl`` (core/dnscache.py rule 2), so no cached
   answer outlives the classification it made.
5. **Internal is sticky.** An address with any live INTERNAL evidence is INTERNAL, whatever
   EXTERNAL evidence says; a later answer naming it under another project, a failed lookup or
   an expired session never downgrades it. Only the membership removing it (which also ends
   its DNS and adopted evidence: the cluster API is authoritative) or every piece of INTERNAL
   evidence expiring does. An answer that contradicts live evidence is a ``Conflict``
   (``pop_conflicts``): an attack or a misconfiguration the operator must see. At most
   ``MAX_CONFLICTS`` wait to be popped; more are counted, not kept
   (``classification_conflicts_unlogged``). ``has_conflicts`` tells the shell one waits, so
   it reports it with the answer that made it, even when no class changed.
6. Every change of an address's effective class - new, changed, expired, evicted - is reported
   as a ``Change(ip, old, new)``; the caller turns changes into routes (``route_action``) and
   firewall set elements.
7. The table holds at most ``max_entries`` addresses besides the members (the membership
   file is bounded on its own, and members are never evicted). When full, the entry whose
   evidence runs out first is evicted (reported, and counted:
   ``classification_evictions``), judged by its evidence as it is now, never by an outdated
   item of the expiry schedule; every entry but a member's has its expiry scheduled, also
   after a membership removal shortened it. The schedule (a heap) holds at most about four
   items per entry: it is compacted as it grows, not only by ``expire``.
8. Addresses a reverse lookup could not classify are remembered as unknown for a while
   (``note_unknown``) so that a packet flood to one literal IP costs one PTR query, not many;
   at most ``max_entries`` of them, the oldest forgotten first (counted:
   ``classification_unknown_evictions``).
9. The pod's boundary is not DNS's to move (``reserved``: its own addresses, gateway,
   cluster DNS server, loopback, link-local, multicast, unspecified): no evidence of any
   source ever makes such an address a class (counted ``classification_reserved_refused``).
10. Forward answers (A/AAAA) are hints, never proof, for addresses in the guarded ranges
   (``guarded``: the Service CIDR and the pod network): one naming such an address under
   another project records nothing (but a ``Conflict`` against live internal evidence) and
   asks for a reverse lookup (``pop_lookups``); a PTR answer naming another project is the
   external evidence there. With a membership loaded (``set_members``), DNS "internal"
   evidence counts for members only; for another address it is a hint (``hinted``: a
   Service created a moment ago, which the dispatcher lets wait for the membership), never
   a class. Session evidence of an address the membership no longer lists ends with its
   session (``end_session``), not a day later.
11. Expiry is driven by deadlines, not ticks: ``next_expiry`` is the earliest scheduled
   expiry, and ``on_sooner`` (if set) hears every expiry scheduled before all the others,
   so that the shell's sweep, asleep until the earliest one, is re-armed (linux/dns.py).
   Unknown marks and hints (rules 8, 10) are checked against ``now`` where they are read;
   ``expire`` only frees their memory, so they schedule nothing.

Everything here is pure: ``now`` is a monotonic time in seconds passed in by the caller.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dnslib import QTYPE, DNSLabel, DNSRecord

from tencrypt.core.stats import Counter, Stats

MAX_CHAIN = 16  # CNAME hops followed from the question; real chains are 1-3 long
MAX_TTL = 86400  # seconds: the longest any DNS evidence lives (Unbound's cache-max-ttl default)
MAX_CONFLICTS = 256  # conflicts waiting for pop_conflicts (rule 5)
MAX_HINTS = 4096  # rule 10's internal hints kept (the oldest forgotten first)
MAX_LOOKUPS = 256  # rule 10's reverse lookups waiting for pop_lookups


def _nothing(_ip: str) -> bool:
    return False


def ttl_seconds(ttl: int) -> int:
    """A record's TTL as a resolver reads it: one with its top bit set is 0 (RFC 2181 §8)."""
    return 0 if ttl & 0x80000000 else ttl


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
    return len(name) >= len(domain) and name[len(name) - len(domain) :] == domain


@dataclass(frozen=True, slots=True)
class Domains:
    """The domains that decide a name's class (rule 1)."""

    project: Labels  # e.g. (b"myproject", b"svc", b"cluster", b"local")
    cluster: Labels  # e.g. (b"cluster", b"local")
    pods: Labels = ()  # (b"pod", b"cluster", b"local"): synthesised names, no evidence

    @classmethod
    def of(cls, project: str, cluster: str) -> Domains:
        labels = labels_of(cluster)
        return cls(labels_of(project), labels, (b"pod", *labels) if labels else ())

    def name_class(self, name: Labels) -> AddrClass | None:
        if self.pods and _under(name, self.pods):
            return None  # rule 1: CoreDNS answers these for any address, unchecked
        if self.project and _under(name, self.project):
            return AddrClass.INTERNAL
        if self.cluster and _under(name, self.cluster):
            return AddrClass.EXTERNAL
        return None


NEVER = float("inf")


@dataclass(frozen=True, slots=True)
class Conflict:
    """An answer that contradicts live evidence (rule 5): counted and logged by the shell."""

    ip: str
    held: AddrClass  # the class the evidence gives
    claimed: AddrClass  # what the contradicting answer said


@dataclass(slots=True)
class _Evidence:
    """Expiry times (monotonic seconds; 0 = none) of each kind of evidence for one address."""

    member: bool = False
    session: float = 0.0
    dns_internal: float = 0.0
    adopted: float = 0.0
    dns_external: float = 0.0
    reported: AddrClass | None = None  # the class last reported in a Change

    def cls(self, now: float) -> AddrClass | None:
        if self.member or max(self.session, self.dns_internal, self.adopted) > now:
            return AddrClass.INTERNAL
        if self.dns_external > now:
            return AddrClass.EXTERNAL
        return None

    def expires(self) -> float:
        if self.member:
            return NEVER
        return max(self.session, self.dns_internal, self.adopted, self.dns_external)


def _merge(a: tuple[AddrClass, int] | None, b: tuple[AddrClass, int]) -> tuple[AddrClass, int]:
    """Rule 3: INTERNAL wins a conflict; the TTL of the winning class is kept (the longest)."""
    if a is None or (b[0] is AddrClass.INTERNAL and a[0] is AddrClass.EXTERNAL):
        return b
    if a[0] is b[0]:
        return a[0], max(a[1], b[1])
    return a


def _chain(record: DNSRecord, qname: Labels) -> dict[Labels, int]:
    """Names reachable from ``qname`` through the answer's CNAMEs, with the smallest TTL to each."""
    cnames = {
        labels_of(rr.rname): (labels_of(rr.rdata.label), rr.ttl)
        for rr in record.rr
        if rr.rtype == QTYPE.CNAME
    }
    chain = {qname: 1 << 31}
    name, ttl = qname, 1 << 31
    for _ in range(MAX_CHAIN):
        if name not in cnames:
            break
        name, hop_ttl = cnames[name]
        ttl = min(ttl, ttl_seconds(hop_ttl))
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
            found[ip] = _merge(found.get(ip), (cls, min(ttl_seconds(rr.ttl), chain[owner])))
    return found


def _address(rdata: object) -> str | None:
    try:
        return str(ipaddress.ip_address(str(rdata)))
    except ValueError:
        return None


@dataclass(slots=True)
class ClassTable:
    """Address → evidence → class (rules 4-8). Owner of the classification state (one per proxy)."""

    domains: Domains
    min_ttl: float = 30.0
    max_ttl: float = float(MAX_TTL)
    max_entries: int = 65536
    negative_ttl: float = 30.0
    stats: Stats | None = None  # rule 7's and 8's counters (none: not counted)
    reserved: Callable[[str], bool] = _nothing  # rule 9: never a class (the pod's boundary)
    guarded: Callable[[str], bool] = _nothing  # rule 10: forward answers only hint here
    members_known: bool = False  # rule 10: a membership was loaded (set_members)
    # rule 11: hears an expiry scheduled before every other (the shell re-arms its sweep)
    on_sooner: Callable[[float], None] | None = None
    _hints: dict[str, float] = field(default_factory=dict)  # rule 10: internal hints
    _lookups: set[str] = field(default_factory=set)  # rule 10: reverse lookups to ask
    _entries: dict[str, _Evidence] = field(default_factory=dict)
    _heap: list[tuple[float, str]] = field(default_factory=list)
    _unknown: dict[str, float] = field(default_factory=dict)
    _members: frozenset[str] = frozenset()
    _conflicts: list[Conflict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ip: str, now: float) -> AddrClass | None:
        entry = self._entries.get(ip)
        return entry.cls(now) if entry is not None else None

    def on_answer(self, record: DNSRecord, now: float) -> list[Change]:
        """Learn from one parsed answer; return the changes it causes. A PTR answer is proof,
        a forward one only where rule 10 lets it be."""
        changes: list[Change] = []
        ptr = bool(record.questions) and record.questions[0].qtype == QTYPE.PTR
        for ip, (cls, ttl) in parse_answer_classes(record, self.domains).items():
            changes += self.learn(ip, cls, ttl, now, proof=ptr)
        return changes

    def learn(
        self, ip: str, cls: AddrClass, ttl: float, now: float, proof: bool = True
    ) -> list[Change]:
        """DNS evidence: ``ip`` is ``cls`` for ``ttl`` seconds (rules 4, 5, 9, 10); ``proof``
        False for a forward answer."""
        if self.reserved(ip):
            self._count(Counter.CLASSIFICATION_RESERVED_REFUSED)
            return []
        expires = now + min(max(ttl, self.min_ttl), self.max_ttl)
        entry = self._entries.get(ip)
        held = entry.cls(now) if entry is not None else None
        if held is not None and held is not cls:
            if len(self._conflicts) < MAX_CONFLICTS:
                self._conflicts.append(Conflict(ip, held, cls))
            else:
                self._count(Counter.CLASSIFICATION_CONFLICTS_UNLOGGED)
        if cls is AddrClass.INTERNAL and self.members_known and ip not in self._members:
            self._hint(ip, expires)  # rule 10: a member's evidence only
            return []
        if cls is AddrClass.EXTERNAL and not proof and self.guarded(ip):
            if held is None and len(self._lookups) < MAX_LOOKUPS:
                self._lookups.add(ip)  # rule 10: a reverse lookup decides, not this answer
            return []
        self._unknown.pop(ip, None)
        changes, entry = self._entry(ip, now)
        if cls is AddrClass.INTERNAL:
            entry.dns_internal = max(entry.dns_internal, expires)
        else:
            entry.dns_external = max(entry.dns_external, expires)
        return changes + self._settle(ip, entry, expires, now)

    def note_session(self, ip: str, now: float, ttl: float) -> list[Change]:
        """An authenticated session with a peer at ``ip``: INTERNAL for ``ttl`` seconds."""
        if self.reserved(ip):
            self._count(Counter.CLASSIFICATION_RESERVED_REFUSED)
            return []
        self._unknown.pop(ip, None)
        changes, entry = self._entry(ip, now)
        entry.session = max(entry.session, now + ttl)
        return changes + self._settle(ip, entry, entry.session, now)

    def adopt(self, ips: Sequence[str], now: float, ttl: float) -> list[Change]:
        """Addresses a previous run put in the firewall: INTERNAL for ``ttl`` seconds."""
        changes: list[Change] = []
        for ip in ips:
            if self.reserved(ip):  # a previous run's element the boundary now refuses
                continue
            more, entry = self._entry(ip, now)
            entry.adopted = max(entry.adopted, now + ttl)
            changes += more + self._settle(ip, entry, entry.adopted, now)
        return changes

    def set_members(self, members: frozenset[str], now: float) -> list[Change]:
        """The membership as the cluster API knows it now (rule 4, 5): added addresses become
        INTERNAL for as long as they are listed; removed ones lose their DNS and adopted
        evidence too (a live session keeps its own)."""
        members = frozenset(ip for ip in members if not self.reserved(ip))
        changes: list[Change] = []
        if not self.members_known:  # rule 10: DNS "internal" from before counts no more
            self.members_known = True
            for ip, evidence in list(self._entries.items()):
                if evidence.dns_internal and ip not in members:
                    self._hint(ip, evidence.dns_internal)
                    evidence.dns_internal = 0.0
                    changes += self._settle(ip, evidence, evidence.expires(), now)
        for ip in self._members - members:
            entry = self._entries.get(ip)
            if entry is not None:
                entry.member, entry.dns_internal, entry.adopted = False, 0.0, 0.0
                # Its expiry falls back to what evidence is left (a session's), whose heap
                # item an eviction may have discarded while the member never expired:
                # schedule it again, or it would never be reported expired nor evicted.
                changes += self._settle(ip, entry, entry.expires(), now)
        for ip in members - self._members:
            more, entry = self._entry(ip, now, member=True)
            entry.member = True
            self._unknown.pop(ip, None)
            changes += more + self._settle(ip, entry, NEVER, now)
        self._members = members
        return changes

    @property
    def members(self) -> frozenset[str]:
        """The membership as last set (without the boundary's addresses: rule 9)."""
        return self._members

    def end_session(self, ip: str, now: float) -> list[Change]:
        """Rule 10: the session with ``ip`` ended and the membership does not list it: its
        session evidence ends now."""
        entry = self._entries.get(ip)
        if entry is None or entry.session <= now:
            return []
        entry.session = 0.0
        return self._settle(ip, entry, entry.expires(), now)

    def hinted(self, ip: str, now: float) -> bool:
        """Rule 10: a DNS answer under the project's domain named ``ip``, which the
        membership does not list (yet)."""
        until = self._hints.get(ip)
        return until is not None and until > now

    def pop_lookups(self) -> list[str]:
        """Rule 10: addresses whose forward answers want a reverse lookup."""
        out = sorted(self._lookups)
        self._lookups.clear()
        return out

    def _hint(self, ip: str, until: float) -> None:
        if ip not in self._hints and len(self._hints) >= MAX_HINTS:
            del self._hints[next(iter(self._hints))]  # the oldest goes: a hint is no evidence
        self._hints[ip] = max(until, self._hints.get(ip, 0.0))

    def has_conflicts(self) -> bool:
        """Rule 5: does a conflict wait for ``pop_conflicts``?"""
        return bool(self._conflicts)

    def pop_conflicts(self) -> list[Conflict]:
        conflicts, self._conflicts = self._conflicts, []
        return conflicts

    def expire(self, now: float) -> list[Change]:
        """Re-evaluate entries whose evidence ran out; return their changes."""
        changes = []
        while self._heap and self._heap[0][0] <= now:
            _, ip = heapq.heappop(self._heap)
            entry = self._entries.get(ip)
            if entry is not None:
                changes += self._settle(ip, entry, 0.0, now)
        for ip in [ip for ip, until in self._unknown.items() if until <= now]:
            del self._unknown[ip]
        for ip in [ip for ip, until in self._hints.items() if until <= now]:
            del self._hints[ip]
        return changes

    def next_expiry(self) -> float | None:
        """Rule 11: when ``expire`` next may have a change to report (the schedule's earliest
        item; an outdated one only makes a sweep that finds nothing), or None."""
        return self._heap[0][0] if self._heap else None

    def note_unknown(self, ip: str, now: float, ttl: float | None = None) -> None:
        """Rule 8: a reverse lookup found no class for ``ip``; do not ask again for a while."""
        if ip not in self._unknown and len(self._unknown) >= self.max_entries:
            del self._unknown[next(iter(self._unknown))]
            self._count(Counter.CLASSIFICATION_UNKNOWN_EVICTIONS)
        self._unknown[ip] = now + (self.negative_ttl if ttl is None else ttl)

    def known_unknown(self, ip: str, now: float) -> bool:
        until = self._unknown.get(ip)
        return until is not None and until > now

    def items(self, now: float) -> list[tuple[str, AddrClass]]:
        return [(ip, cls) for ip, e in self._entries.items() if (cls := e.cls(now)) is not None]

    def _entry(self, ip: str, now: float, member: bool = False) -> tuple[list[Change], _Evidence]:
        """The entry of ``ip``, made if it had none; room for a non-member made first by
        evicting (rule 7) until the non-members are below ``max_entries`` again."""
        entry = self._entries.get(ip)
        if entry is not None:
            return [], entry
        changes: list[Change] = []
        while not member and len(self._entries) - len(self._members) >= self.max_entries:
            evicted = self._evict(now)
            if evicted is None:  # nothing but members: cannot happen (rule 7)
                break
            changes += evicted
        entry = self._entries[ip] = _Evidence()
        return changes, entry

    def _count(self, counter: Counter) -> None:
        if self.stats is not None:
            self.stats.inc(counter)

    def _settle(self, ip: str, entry: _Evidence, expires: float, now: float) -> list[Change]:
        """After evidence changed: schedule its expiry, forget an empty entry, report a change."""
        if now < expires < NEVER:
            sooner = not self._heap or expires < self._heap[0][0]
            heapq.heappush(self._heap, (expires, ip))
            if sooner and self.on_sooner is not None:
                self.on_sooner(expires)  # rule 11
            if len(self._heap) > 4 * len(self._entries) + 64:  # mostly superseded items
                self._heap = [
                    (e.expires(), a) for a, e in self._entries.items() if e.expires() < NEVER
                ]
                heapq.heapify(self._heap)
        cls = entry.cls(now)
        old, entry.reported = entry.reported, cls
        if entry.expires() <= now:
            del self._entries[ip]
        return [] if old is cls else [Change(ip, old, cls)]

    def _evict(self, now: float) -> list[Change] | None:
        """Rule 7: make room by dropping the entry whose evidence runs out first (its change),
        skipping outdated schedule items; None if no entry is scheduled at all."""
        while self._heap:
            when, ip = heapq.heappop(self._heap)
            entry = self._entries.get(ip)
            if entry is not None and entry.expires() == when:
                del self._entries[ip]
                self._count(Counter.CLASSIFICATION_EVICTIONS)
                return [] if entry.reported is None else [Change(ip, entry.reported, None)]
        return None


def route_action(ip: str, cls: AddrClass | None, service_cidr: str | Sequence[str]) -> RouteAction:
    """The route an address of this class needs (DESIGN §1 "Routing").

    The Service CIDR already goes into tenc0, so an INTERNAL VIP needs nothing and an EXTERNAL
    VIP needs a host route out of the uplink; outside the CIDR (pod IPs) traffic leaves by the
    uplink unless an INTERNAL peer gets a host route into tenc0. ``service_cidr`` is the one
    Service CIDR or those routed into tenc0 (a dual-stack pod's IPv4 and IPv6 ones): an address
    of a family without one needs nothing, the pod does not route that family into the tunnel
    (its firewall refuses the project's addresses of it instead).
    """
    cidrs = (service_cidr,) if isinstance(service_cidr, str) else tuple(service_cidr)
    try:
        addr = ipaddress.ip_address(ip)
        nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    except ValueError:
        return RouteAction.NONE
    same = [n for n in nets if n.version == addr.version]
    if cls is None or not same:
        return RouteAction.NONE
    inside = any(addr in n for n in same)
    if cls is AddrClass.INTERNAL:
        return RouteAction.NONE if inside else RouteAction.VIA_TUN
    return RouteAction.VIA_UPLINK if inside else RouteAction.NONE


def plan_routes(
    changes: Sequence[Change],
    service_cidr: str | Sequence[str],
    keep: frozenset[str] = frozenset(),
) -> list[tuple[str, RouteAction]]:
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
