"""What a DNS answer may and may not do (#22 items 1, 2, 5; core/classify.py rules 9-10):
forward answers are hints for guarded addresses, synthesised pod names are no evidence, the
pod's boundary is never an address's class, internal DNS evidence counts for members only
once a membership is loaded, and session evidence ends with the API's word."""

from __future__ import annotations

import ipaddress

from dnslib import PTR, QTYPE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.classify import AddrClass, ClassTable, Domains, route_action
from tencrypt.core.classify import RouteAction as R
from tencrypt.core.effects import Desired
from tencrypt.core.policy import Guard, Verdict, decide
from tencrypt.core.stats import Stats
from tests.unit.fakes import pod_config

INTERNAL, EXTERNAL = AddrClass.INTERNAL, AddrClass.EXTERNAL
POD = pod_config("10.128.0.11")  # gateway 10.128.0.1, DNS 172.30.0.2, Service CIDR 172.30/16
GUARD = Guard.of(POD.service_cidr, POD.pod_cidrs)
VIP, PEER = "172.30.5.9", "10.129.0.7"


def table() -> ClassTable:
    t = ClassTable(Domains.of(POD.domain, "cluster.local"), min_ttl=1, stats=Stats())
    t.reserved, t.guarded = POD.is_boundary, GUARD.__contains__
    return t


def forward(name: str, ip: str, ttl: int = 60) -> DNSRecord:
    reply = DNSRecord.question(name, "A").reply()
    reply.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=ttl))
    return DNSRecord.parse(reply.pack())


def reverse(ip: str, name: str, ttl: int = 60) -> DNSRecord:
    qname = ipaddress.ip_address(ip).reverse_pointer
    reply = DNSRecord.question(qname, "PTR").reply()
    reply.add_answer(RR(qname, QTYPE.PTR, rdata=PTR(name), ttl=ttl))
    return DNSRecord.parse(reply.pack())


def test_a_foreign_forward_answer_for_a_guarded_address_is_a_hint_that_asks_a_ptr():
    t = table()
    assert t.on_answer(forward("alias.project2.svc.cluster.local", VIP), 0) == []
    assert t.lookup(VIP, 0) is None and t.pop_lookups() == [VIP]
    # the verdict stays HOLD (a reverse lookup decides), never CLEAR
    assert decide(t.lookup(VIP, 0), guarded=True, looked_up=False, strict=True) is Verdict.HOLD
    # the PTR answer is the proof
    t.on_answer(reverse(VIP, "web.project2.svc.cluster.local"), 1)
    assert t.lookup(VIP, 1) is EXTERNAL and t.pop_lookups() == []
    # outside the guarded ranges, a forward answer decides as before
    t.on_answer(forward("api.project2.svc.cluster.local", "192.0.2.7"), 2)
    assert t.lookup("192.0.2.7", 2) is EXTERNAL


def test_a_foreign_forward_answer_for_an_internal_address_is_still_a_conflict():
    t = table()
    t.set_members(frozenset({VIP}), 0)
    t.on_answer(forward("alias.project2.svc.cluster.local", VIP), 0)
    assert [c.ip for c in t.pop_conflicts()] == [VIP] and t.lookup(VIP, 0) is INTERNAL


def test_the_pods_boundary_never_becomes_a_class_whatever_names_it():
    t = table()
    for ip in (POD.pod_ip, POD.gateway, "172.30.0.2", "127.0.0.1", "169.254.169.254", "224.0.0.1"):
        for record in (
            forward(f"x.{POD.domain}", ip),
            reverse(ip, f"x.{POD.domain}"),
        ):
            assert t.on_answer(record, 0) == []
        assert t.note_session(ip, 0, 100) == [] and t.adopt([ip], 0, 100) == []
        assert t.lookup(ip, 0) is None, ip
    t.set_members(frozenset({POD.gateway, PEER}), 0)
    assert t.lookup(POD.gateway, 0) is None and t.lookup(PEER, 0) is INTERNAL
    assert t.stats is not None and t.stats.get("classification_reserved_refused") == 18
    d = Desired(POD.service_cidr, POD.own_addresses)
    from tencrypt.core.classify import Change

    d.on_changes([Change(POD.gateway, None, INTERNAL)])  # even if something said so
    assert not d.plan()


def test_with_a_membership_internal_dns_counts_for_members_only():
    t = table()
    t.set_members(frozenset({PEER}), 0)
    assert t.on_answer(forward(f"new.{POD.domain}", VIP), 0) == []
    assert t.lookup(VIP, 0) is None and t.hinted(VIP, 0)  # a hint: a new Service may wait
    assert t.on_answer(forward(f"peer.{POD.domain}", PEER), 0) == []  # a member: unchanged
    t.expire(1000)
    assert not t.hinted(VIP, 1000)


def test_session_evidence_of_an_address_the_api_removed_ends_with_its_session():
    t = table()
    t.set_members(frozenset({PEER}), 0)
    t.note_session(PEER, 0, 86400)
    t.set_members(frozenset(), 10)
    assert t.lookup(PEER, 10) is INTERNAL  # its session still lives
    changes = t.end_session(PEER, 20)
    assert t.lookup(PEER, 20) is None and changes and changes[0].new is None
    assert t.end_session(PEER, 21) == []


NAMES = st.sampled_from(
    [
        "web.myproject.svc.cluster.local",
        "web.project2.svc.cluster.local",
        "x.kube-system.svc.cluster.local",
        "172-30-0-2.myproject.pod.cluster.local",
        "1-2-3-4.project2.pod.cluster.local",
        "example.com",
    ]
)
ADDRESSES = st.sampled_from(
    [
        POD.pod_ip,
        POD.gateway,
        "172.30.0.2",
        "169.254.169.254",
        "127.0.0.1",
        "224.0.0.251",
        "0.0.0.0",
        VIP,
        "172.30.7.7",
        PEER,
        "10.128.9.9",
        "192.0.2.1",
    ]
)
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("forward"), NAMES, ADDRESSES, st.integers(0, 2**31)),
        st.tuples(st.just("ptr"), ADDRESSES, NAMES, st.integers(0, 2**31)),
        st.tuples(st.just("members"), st.frozensets(ADDRESSES, max_size=3)),
        st.tuples(st.just("time"), st.floats(0, 200)),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(EVENTS)
def test_no_answer_ever_makes_the_boundary_an_element_or_a_guarded_address_clear_without_proof(
    events,
):
    """Strict mode (--no-strict opens the unknown on purpose)."""
    t = table()
    d = Desired(POD.service_cidr, POD.own_addresses)
    proven: dict[str, float] = {}  # guarded address -> external by a PTR until
    members: frozenset[str] | None = None
    now = 0.0
    for event in events:
        if event[0] == "forward":
            d.on_changes(t.on_answer(forward(event[1], event[2], event[3]), now))
        elif event[0] == "ptr":
            _, ip, name, ttl = event
            before = t.lookup(ip, now)
            d.on_changes(t.on_answer(reverse(ip, name, ttl), now))
            if t.lookup(ip, now) is EXTERNAL and before is not EXTERNAL:
                proven[ip] = now
        elif event[0] == "members":
            members = event[1]
            d.on_changes(t.set_members(members, now))
        else:
            now += event[1]
            d.on_changes(t.expire(now))
        plan = d.plan()
        for ip in list(d.want_elements) + [ip for ip, _ in plan.routes]:
            assert not POD.is_boundary(ip), ip  # never an element, never a route of ours
        for ip in ("172.30.5.9", "172.30.7.7", PEER, "10.128.9.9"):
            cls = t.lookup(ip, now)
            verdict = decide(cls, guarded=ip in GUARD, looked_up=True, strict=True)
            if verdict is Verdict.CLEAR and (members is None or ip in members):
                assert ip in proven, (ip, cls)  # a PTR said another project's
            if cls is INTERNAL and members is not None:
                assert ip in members, ip  # DNS evidence counts for members only
        assert route_action(POD.gateway, t.lookup(POD.gateway, now), POD.service_cidr) is R.NONE
