"""Classification of DNS answers and other evidence (core.classify) and the routes it asks for."""

import ipaddress

import pytest
from dnslib import AAAA, CNAME, PTR, QTYPE, RR, A, DNSRecord

from tencrypt.core.classify import (
    MAX_CHAIN,
    MAX_CONFLICTS,
    MAX_TTL,
    AddrClass,
    Change,
    ClassTable,
    Conflict,
    Domains,
    RouteAction,
    labels_of,
    parse_answer_classes,
    plan_routes,
    ptr_address,
    route_action,
)
from tencrypt.core.stats import Stats

INTERNAL, EXTERNAL = AddrClass.INTERNAL, AddrClass.EXTERNAL
DOMAINS = Domains.of("myproject.svc.cluster.local", "cluster.local")
CIDR = "172.30.0.0/16"


def answer(qname, qtype, *records):
    """An answer to ``qname``/``qtype`` holding ``records`` = (name, type, rdata, ttl)."""
    reply = DNSRecord.question(qname, qtype).reply()
    for name, rtype, rdata, ttl in records:
        reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
    return DNSRecord.parse(reply.pack())  # through the wire format, as the proxy sees it


def a(name, ip, ttl=60):
    return (name, "A", A(ip), ttl)


def table(**kw):
    return ClassTable(DOMAINS, min_ttl=kw.pop("min_ttl", 1), **kw)


# -- names -> classes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("web.myproject.svc.cluster.local", INTERNAL),
        ("WEB.MyProject.SVC.cluster.LOCAL.", INTERNAL),  # DNS names are case-insensitive
        ("myproject.svc.cluster.local", INTERNAL),
        ("pod-1.web.myproject.svc.cluster.local", INTERNAL),
        ("web.project2.svc.cluster.local", EXTERNAL),
        ("web.notmyproject.svc.cluster.local", EXTERNAL),  # a label suffix, not a string suffix
        ("kubernetes.default.svc.cluster.local", EXTERNAL),
        ("example.com", None),
        ("cluster.local.example.com", None),
    ],
)
def test_name_class(name, cls):
    from tencrypt.core.classify import labels_of

    assert DOMAINS.name_class(labels_of(name)) is cls


def test_a_answer_in_own_project_is_internal():
    rec = answer(
        "web.myproject.svc.cluster.local",
        "A",
        a("web.myproject.svc.cluster.local", "172.30.1.10", 30),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.1.10": (INTERNAL, 30)}


def test_other_project_external_outside_cluster_untouched():
    t = table()
    ch = t.on_answer(
        answer(
            "db.project2.svc.cluster.local", "A", a("db.project2.svc.cluster.local", "172.30.2.20")
        ),
        now=0,
    )
    assert ch == [Change("172.30.2.20", None, EXTERNAL)]
    assert t.on_answer(answer("example.com", "A", a("example.com", "93.184.216.34")), now=0) == []
    assert t.lookup("93.184.216.34", 0) is None
    assert t.lookup("172.30.2.20", 0) is EXTERNAL
    assert len(t) == 1


def test_aaaa_answers_are_classified_too():
    rec = answer(
        "web.myproject.svc.cluster.local",
        "AAAA",
        ("web.myproject.svc.cluster.local", "AAAA", AAAA("fd00::10"), 60),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"fd00::10": (INTERNAL, 60)}


def test_cname_to_another_project_the_final_name_decides():
    rec = answer(
        "alias.myproject.svc.cluster.local",
        "A",
        ("alias.myproject.svc.cluster.local", "CNAME", CNAME("db.project2.svc.cluster.local"), 300),
        a("db.project2.svc.cluster.local", "172.30.2.20", 60),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.2.20": (EXTERNAL, 60)}


def test_cname_chain_into_own_project_takes_smallest_ttl():
    rec = answer(
        "x.project2.svc.cluster.local",
        "A",
        ("x.project2.svc.cluster.local", "CNAME", CNAME("y.other.svc.cluster.local"), 20),
        ("y.other.svc.cluster.local", "CNAME", CNAME("web.myproject.svc.cluster.local"), 90),
        a("web.myproject.svc.cluster.local", "172.30.1.10", 60),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.1.10": (INTERNAL, 20)}


def test_cname_out_of_cluster_classifies_nothing():
    rec = answer(
        "ext.myproject.svc.cluster.local",
        "A",
        ("ext.myproject.svc.cluster.local", "CNAME", CNAME("example.com"), 60),
        a("example.com", "93.184.216.34"),
    )
    assert parse_answer_classes(rec, DOMAINS) == {}


def test_records_off_the_chain_are_ignored():
    # An answer to a project2 name that also carries an A record for one of "our" names
    # (poisoning attempt or upstream bug) must not make that address internal.
    rec = answer(
        "db.project2.svc.cluster.local",
        "A",
        a("db.project2.svc.cluster.local", "172.30.2.20"),
        a("web.myproject.svc.cluster.local", "172.30.9.9"),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.2.20": (EXTERNAL, 60)}


def test_cname_loop_terminates():
    rec = answer(
        "a.myproject.svc.cluster.local",
        "A",
        ("a.myproject.svc.cluster.local", "CNAME", CNAME("b.myproject.svc.cluster.local"), 60),
        ("b.myproject.svc.cluster.local", "CNAME", CNAME("a.myproject.svc.cluster.local"), 60),
    )
    assert parse_answer_classes(rec, DOMAINS) == {}


def test_ptr_classifies_the_queried_address_by_target():
    rec = answer(
        "5.0.128.10.in-addr.arpa",
        "PTR",
        ("5.0.128.10.in-addr.arpa", "PTR", PTR("pod-a.web.myproject.svc.cluster.local"), 45),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"10.128.0.5": (INTERNAL, 45)}
    rec = answer(
        "20.2.30.172.in-addr.arpa",
        "PTR",
        ("20.2.30.172.in-addr.arpa", "PTR", PTR("db.project2.svc.cluster.local"), 45),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.2.20": (EXTERNAL, 45)}


def test_ptr_conflict_internal_wins():
    q = "7.0.128.10.in-addr.arpa"
    rec = answer(
        q,
        "PTR",
        (q, "PTR", PTR("p.x.project2.svc.cluster.local"), 10),
        (q, "PTR", PTR("p.web.myproject.svc.cluster.local"), 20),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"10.128.0.7": (INTERNAL, 20)}


@pytest.mark.parametrize(
    "name, ip",
    [
        ("4.3.2.1.in-addr.arpa", "1.2.3.4"),
        ("4.3.2.1.IN-ADDR.ARPA", "1.2.3.4"),
        ("3.2.1.in-addr.arpa", None),  # a /24 zone, not an address
        ("x.3.2.1.in-addr.arpa", None),
        ("256.3.2.1.in-addr.arpa", None),
        (ipaddress.ip_address("fd01::7").reverse_pointer, "fd01::7"),
        (".".join("0000000000000000000000000000fd01"[::-1]) + ".ip6.arpa", "::fd01"),
        ("example.com", None),
    ],
)
def test_ptr_address(name, ip):
    from tencrypt.core.classify import labels_of

    assert ptr_address(labels_of(name)) == ip


def test_empty_and_questionless_answers_classify_nothing():
    from dnslib import DNSHeader

    assert parse_answer_classes(DNSRecord(DNSHeader(qr=1)), DOMAINS) == {}
    assert parse_answer_classes(answer("web.myproject.svc.cluster.local", "A"), DOMAINS) == {}


# -- the table over time ------------------------------------------------------------------


def test_ttl_expiry_with_injected_clock():
    t = table()
    t.on_answer(
        answer(
            "web.myproject.svc.cluster.local",
            "A",
            a("web.myproject.svc.cluster.local", "172.30.1.10", 30),
        ),
        now=100,
    )
    assert t.lookup("172.30.1.10", 129.9) is INTERNAL
    assert t.expire(129.9) == []
    assert t.lookup("172.30.1.10", 130) is None  # expired, even before the sweep
    assert t.expire(130) == [Change("172.30.1.10", INTERNAL, None)]
    assert len(t) == 0 and t.expire(1000) == []


def test_min_ttl_floor_and_max_ttl_cap():
    t = ClassTable(DOMAINS, min_ttl=30, max_ttl=100)
    t.learn("172.30.1.1", INTERNAL, 0, now=0)
    t.learn("172.30.1.2", INTERNAL, 10**6, now=0)
    assert t.lookup("172.30.1.1", 29) is INTERNAL and t.lookup("172.30.1.1", 30) is None
    assert t.lookup("172.30.1.2", 99) is INTERNAL and t.lookup("172.30.1.2", 100) is None


def test_refresh_extends_without_a_change():
    t = table()
    assert t.learn("172.30.1.10", INTERNAL, 30, now=0) == [Change("172.30.1.10", None, INTERNAL)]
    assert t.learn("172.30.1.10", INTERNAL, 30, now=20) == []
    assert t.expire(31) == []  # the first expiry was superseded
    assert t.lookup("172.30.1.10", 49) is INTERNAL
    assert t.expire(50) == [Change("172.30.1.10", INTERNAL, None)]


def test_internal_is_sticky_against_another_projects_answer():
    """A tenant's alias for our VIP (or a forged answer) never downgrades it (DESIGN §1a)."""
    t = table()
    t.on_answer(
        answer(
            "web.myproject.svc.cluster.local",
            "A",
            a("web.myproject.svc.cluster.local", "172.30.1.10", 300),
        ),
        now=0,
    )
    ch = t.on_answer(
        answer(
            "alias.project2.svc.cluster.local",
            "A",
            a("alias.project2.svc.cluster.local", "172.30.1.10", 3000),
        ),
        now=10,
    )
    assert ch == []
    assert t.pop_conflicts() == [Conflict("172.30.1.10", INTERNAL, EXTERNAL)]
    assert t.pop_conflicts() == []
    assert t.lookup("172.30.1.10", 299) is INTERNAL
    # only when every piece of internal evidence ran out does the other answer count
    assert t.expire(300) == [Change("172.30.1.10", INTERNAL, EXTERNAL)]
    assert t.expire(3010) == [Change("172.30.1.10", EXTERNAL, None)]


def test_an_internal_answer_upgrades_an_external_one_and_is_a_conflict():
    t = table()
    t.learn("172.30.1.10", EXTERNAL, 60, now=0)
    assert t.learn("172.30.1.10", INTERNAL, 30, now=1) == [
        Change("172.30.1.10", EXTERNAL, INTERNAL)
    ]
    assert t.pop_conflicts() == [Conflict("172.30.1.10", EXTERNAL, INTERNAL)]
    assert t.expire(31) == [Change("172.30.1.10", INTERNAL, EXTERNAL)]


def test_membership_is_internal_until_removed_and_removal_is_authoritative():
    t = table()
    t.learn("172.30.1.10", INTERNAL, 300, now=0)
    assert set(t.set_members(frozenset({"172.30.1.10", "172.17.0.12", "fd00::12"}), now=1)) == {
        Change(ip, None, INTERNAL) for ip in ("172.17.0.12", "fd00::12")
    }
    t.learn("172.17.0.12", EXTERNAL, 60, now=2)  # a tenant's alias: no effect
    assert t.pop_conflicts() == [Conflict("172.17.0.12", INTERNAL, EXTERNAL)]
    assert t.expire(10**9) == []  # members outlive every TTL; the VIP's DNS evidence ran out
    assert t.lookup("172.17.0.12", 10**9) is INTERNAL and t.lookup("172.30.1.10", 10**9) is INTERNAL
    t2 = table()
    t2.set_members(frozenset({"172.17.0.12"}), now=0)
    t2.learn("172.17.0.12", INTERNAL, 300, now=0)
    t2.note_session("172.17.0.13", now=0, ttl=100)
    t2.set_members(frozenset({"172.17.0.13"}), now=1)
    # removed from the membership: its DNS evidence goes with it
    assert t2.lookup("172.17.0.12", 2) is None
    # a session's own evidence outlives a membership removal
    assert t2.set_members(frozenset(), now=3) == []
    assert t2.lookup("172.17.0.13", 99) is INTERNAL and t2.lookup("172.17.0.13", 100) is None


def test_members_never_expire_and_are_never_evicted():
    t = table(max_entries=2)
    t.set_members(frozenset({"10.0.0.1", "10.0.0.2"}), now=0)
    assert t.learn("10.0.0.3", EXTERNAL, 10, now=0) == [Change("10.0.0.3", None, EXTERNAL)]
    assert t.expire(10**12) == [Change("10.0.0.3", EXTERNAL, None)]
    assert t.lookup("10.0.0.1", 10**12) is INTERNAL and t.lookup("10.0.0.2", 10**12) is INTERNAL


def test_session_and_adopted_evidence_expire():
    t = table()
    assert t.note_session("172.17.0.12", now=0, ttl=50) == [Change("172.17.0.12", None, INTERNAL)]
    assert t.adopt(["172.17.0.13"], now=0, ttl=20) == [Change("172.17.0.13", None, INTERNAL)]
    assert t.expire(20) == [Change("172.17.0.13", INTERNAL, None)]
    assert t.note_session("172.17.0.12", now=40, ttl=50) == []  # refreshed
    assert t.expire(60) == []
    assert t.expire(90) == [Change("172.17.0.12", INTERNAL, None)]
    assert len(t) == 0


def test_synthesised_pod_names_are_no_evidence_in_any_namespace():
    """CoreDNS's ``pods insecure`` answers a-b-c-d.<any namespace>.pod.<domain> with a.b.c.d
    unchecked: such a name proves nothing, ours or another project's (#22 item 2)."""
    t = table()
    for name in (
        "172-17-0-12.myproject.pod.cluster.local",
        "172-30-0-2.shop.pod.cluster.local",
    ):
        ip = name.split(".")[0].replace("-", ".")
        assert t.on_answer(answer(name, "A", a(name, ip)), now=0) == []
        assert t.lookup(ip, 0) is None
    assert DOMAINS.name_class(labels_of("x.project2.pod.cluster.local")) is None
    assert DOMAINS.name_class(labels_of("x.project2.svc.cluster.local")) is EXTERNAL


def test_full_table_evicts_the_entry_closest_to_expiry():
    t = table(max_entries=2)
    t.learn("10.0.0.1", INTERNAL, 50, now=0)
    t.learn("10.0.0.2", EXTERNAL, 10, now=0)
    ch = t.learn("10.0.0.3", INTERNAL, 50, now=0)
    assert ch == [Change("10.0.0.2", EXTERNAL, None), Change("10.0.0.3", None, INTERNAL)]
    assert len(t) == 2 and t.lookup("10.0.0.2", 1) is None


def test_negative_cache():
    t = table(negative_ttl=30)
    t.note_unknown("10.9.9.9", now=0)
    assert t.known_unknown("10.9.9.9", 29) and not t.known_unknown("10.9.9.9", 30)
    t.note_unknown("10.9.9.8", now=0, ttl=5)
    assert not t.known_unknown("10.9.9.8", 5)
    t.note_unknown("10.9.9.7", now=0)
    t.learn("10.9.9.7", INTERNAL, 60, now=1)  # an answer ends "unknown" at once
    assert not t.known_unknown("10.9.9.7", 2)
    t.expire(100)
    assert not t._unknown


def test_heap_is_compacted_under_churn():
    t = table()
    for i in range(1000):
        t.learn("10.0.0.1", INTERNAL, 60, now=i)
        t.expire(i)
    assert len(t._heap) <= 4 * len(t) + 64 + 1


# -- bounds (issue 22, item 4) ----------------------------------------------------------------


def test_the_schedule_stays_bounded_between_sweeps():
    """Rule 7: a burst of answers refreshing one address (a resolver answering in a loop)
    between two calls of ``expire`` does not grow the schedule without bound."""
    t = table()
    for i in range(5000):
        t.learn("10.0.0.1", EXTERNAL, 60 + i, now=0)
    assert len(t) == 1 and len(t._heap) <= 4 * len(t) + 64
    assert t.expire(60 + 4999) == [Change("10.0.0.1", EXTERNAL, None)]


def test_eviction_judges_an_entry_by_its_evidence_now_not_by_an_old_schedule():
    """Rule 7, members are never evicted: a DNS-learned address that became a member keeps
    its old schedule item (expiry 10); eviction must skip it and take the next entry."""
    stats = Stats()
    t = table(max_entries=2, stats=stats)
    t.learn("10.0.0.1", INTERNAL, 10, now=0)  # scheduled to expire at 10
    t.learn("10.0.0.2", EXTERNAL, 50, now=0)
    t.set_members(frozenset({"10.0.0.1"}), now=1)  # now a member: never expires
    t.learn("10.0.0.3", EXTERNAL, 60, now=2)
    t.learn("10.0.0.4", EXTERNAL, 70, now=2)  # full (2 non-members): evict one
    assert t.lookup("10.0.0.1", 3) is INTERNAL
    assert t.lookup("10.0.0.2", 3) is None and t.lookup("10.0.0.3", 3) is EXTERNAL
    assert t.expire(10**6) == [
        Change("10.0.0.3", EXTERNAL, None),
        Change("10.0.0.4", EXTERNAL, None),
    ]
    assert t.lookup("10.0.0.1", 10**6) is INTERNAL
    assert stats.get("classification_evictions") == 1


def test_members_do_not_count_against_the_bound():
    """A project larger than the table (the membership file allows 2**20 addresses) still
    learns other projects' addresses from DNS, within the bound for them."""
    t = table(max_entries=2)
    t.set_members(frozenset({"10.0.0.1", "10.0.0.2", "10.0.0.3"}), now=0)
    t.learn("172.30.9.1", EXTERNAL, 10, now=0)
    t.learn("172.30.9.2", EXTERNAL, 20, now=0)
    assert len(t) == 5
    ch = t.learn("172.30.9.3", EXTERNAL, 30, now=0)
    assert ch == [Change("172.30.9.1", EXTERNAL, None), Change("172.30.9.3", None, EXTERNAL)]
    assert len(t) == 5 and all(t.lookup(f"10.0.0.{i}", 1) is INTERNAL for i in (1, 2, 3))


def test_a_removed_member_is_still_scheduled_to_expire():
    """Found while bounding the table: an address with a session that was a member while an
    eviction discarded its (then outdated) schedule item had no item left once removed from
    the membership: its session's end was never reported (its /32 and firewall element
    stayed) and it could never be evicted."""
    t = table(max_entries=2)
    t.note_session("10.0.0.1", now=0, ttl=50)  # scheduled at 50
    t.set_members(frozenset({"10.0.0.1"}), now=0)
    t.learn("10.0.0.2", EXTERNAL, 100, now=0)
    t.learn("10.0.0.3", EXTERNAL, 100, now=0)
    t.learn("10.0.0.4", EXTERNAL, 100, now=0)  # full: an eviction pops the item at 50
    t.set_members(frozenset(), now=1)
    assert t.lookup("10.0.0.1", 1) is INTERNAL  # the session still vouches for it
    assert Change("10.0.0.1", INTERNAL, None) in t.expire(60)
    assert t.lookup("10.0.0.1", 60) is None and "10.0.0.1" not in [ip for ip, _ in t.items(60)]


def test_the_unknown_list_is_bounded_and_counted():
    stats = Stats()
    t = table(max_entries=3, stats=stats)
    for i in range(5):
        t.note_unknown(f"10.9.9.{i}", now=0)
    t.note_unknown("10.9.9.4", now=0)  # already listed: refreshed, nothing evicted
    assert [t.known_unknown(f"10.9.9.{i}", 1) for i in range(5)] == [False, False, True, True, True]
    assert stats.get("classification_unknown_evictions") == 2


def test_conflicts_waiting_to_be_logged_are_bounded_and_the_rest_counted():
    """Rule 5: a conflicting answer that changes no class calls nobody; a stream of them
    between two pops keeps MAX_CONFLICTS and counts the others."""
    stats = Stats()
    t = table(stats=stats)
    t.set_members(frozenset({"172.30.1.10"}), now=0)
    for _ in range(MAX_CONFLICTS + 10):
        assert t.learn("172.30.1.10", EXTERNAL, 30, now=1) == []
    assert len(t.pop_conflicts()) == MAX_CONFLICTS
    assert stats.get("classification_conflicts_unlogged") == 10
    t.learn("172.30.1.10", EXTERNAL, 30, now=2)
    assert len(t.pop_conflicts()) == 1


def test_dns_evidence_never_outlives_a_day():
    """Issue 22, item 6: a forged TTL of 2**31 - 1 classifies for MAX_TTL (a day) at most; a
    TTL with its top bit set counts as 0 (RFC 2181 §8), i.e. min_ttl."""
    t = table(min_ttl=30)
    forged = answer(
        "web.myproject.svc.cluster.local",
        "A",
        a("web.myproject.svc.cluster.local", "172.30.1.10", 2**31 - 1),
    )
    t.on_answer(forged, now=0)
    assert t.lookup("172.30.1.10", MAX_TTL - 1) is INTERNAL
    assert t.lookup("172.30.1.10", MAX_TTL) is None
    top = answer(
        "db.myproject.svc.cluster.local",
        "A",
        a("db.myproject.svc.cluster.local", "172.30.1.11", 2**31),
    )
    t.on_answer(top, now=0)
    assert t.lookup("172.30.1.11", 29) is INTERNAL and t.lookup("172.30.1.11", 30) is None
    assert ClassTable(DOMAINS).max_ttl == MAX_TTL == 86400


# -- routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip, cls, action",
    [
        ("172.30.1.10", INTERNAL, RouteAction.NONE),  # the CIDR already goes to tenc0
        ("10.128.0.5", INTERNAL, RouteAction.VIA_TUN),  # a peer pod
        ("172.30.2.20", EXTERNAL, RouteAction.VIA_UPLINK),  # another project's VIP: bypass
        ("10.128.1.9", EXTERNAL, RouteAction.NONE),  # another project's pod: uplink anyway
        ("172.30.1.10", None, RouteAction.NONE),
        ("fd00::1", INTERNAL, RouteAction.NONE),  # no IPv6 Service CIDR: IPv6 not routed
        ("not-an-ip", INTERNAL, RouteAction.NONE),
    ],
)
def test_route_action_table(ip, cls, action):
    assert route_action(ip, cls, CIDR) is action


@pytest.mark.parametrize(
    ("ip", "cls", "action"),
    [
        ("fd00:10:128::5", INTERNAL, RouteAction.VIA_TUN),  # a dual-stack peer pod: /128
        ("fd00:30::9", INTERNAL, RouteAction.NONE),  # a project VIP: the CIDR route has it
        ("fd00:30::9", EXTERNAL, RouteAction.VIA_UPLINK),  # another project's VIP: bypass
        ("fd00:10:129::5", EXTERNAL, RouteAction.NONE),
        ("10.128.0.5", INTERNAL, RouteAction.VIA_TUN),  # IPv4 as before
        ("172.30.2.20", EXTERNAL, RouteAction.VIA_UPLINK),
        ("fd00:30::9", None, RouteAction.NONE),
    ],
)
def test_route_action_of_a_dual_stack_pod_routes_both_families(ip, cls, action):
    assert route_action(ip, cls, (CIDR, "fd00:30::/108")) is action


def test_plan_routes_reroutes_removes_and_keeps():
    changes = [
        Change("10.128.0.5", None, INTERNAL),  # new peer → /32 tenc0
        Change("172.30.2.20", None, EXTERNAL),  # new external VIP → /32 uplink
        Change("172.30.1.10", None, INTERNAL),  # internal VIP → nothing
        Change("172.30.3.3", INTERNAL, EXTERNAL),  # VIP changed owner → /32 uplink
        Change("172.30.4.4", EXTERNAL, INTERNAL),  # back to us → remove its /32
        Change("10.128.0.6", INTERNAL, None),  # expired peer → remove
        Change("172.30.0.2", None, EXTERNAL),  # the DNS server: setup owns it
    ]
    assert plan_routes(changes, CIDR, keep=frozenset({"172.30.0.2"})) == [
        ("10.128.0.5", RouteAction.VIA_TUN),
        ("172.30.2.20", RouteAction.VIA_UPLINK),
        ("172.30.3.3", RouteAction.VIA_UPLINK),
        ("172.30.4.4", RouteAction.NONE),
        ("10.128.0.6", RouteAction.NONE),
    ]


# -- rules the mutation run found unheld ----------------------------------------------------------

P = "myproject.svc.cluster.local"


def test_domains_of_names_the_pod_root_of_the_cluster_domain():
    """Rule 1: every name under pod.<cluster domain> is no evidence, whatever its namespace."""
    assert DOMAINS.pods == labels_of("pod.cluster.local")
    assert Domains.of("shop.svc", "example").pods == (b"pod", b"example")
    assert Domains.of("shop.svc", "").pods == ()  # no cluster domain: no pod root
    plain = Domains(labels_of(P), labels_of("cluster.local"))  # no pod root given
    assert plain.pods == () and plain.name_class(labels_of(f"x.{P}")) is INTERNAL
    assert plain.name_class(labels_of("1-2-3-4.x.pod.cluster.local")) is EXTERNAL


def test_one_answer_naming_an_address_twice_keeps_the_strongest_and_longest():
    """Rule 3 and _merge: the same class twice keeps the longer TTL; INTERNAL wins over
    EXTERNAL in either order, with its own TTL."""
    for ttls in ((10, 90), (90, 10)):
        twice = answer(f"web.{P}", "A", *(a(f"web.{P}", "172.30.1.10", ttl) for ttl in ttls))
        assert parse_answer_classes(twice, DOMAINS) == {"172.30.1.10": (INTERNAL, 90)}
        other = "web.other.svc.cluster.local"
        twice = answer(other, "A", *(a(other, "172.30.2.10", ttl) for ttl in ttls))
        assert parse_answer_classes(twice, DOMAINS) == {"172.30.2.10": (EXTERNAL, 90)}
    for order in ((("o", 500), ("i", 50)), (("i", 50), ("o", 500))):
        records = [
            (
                "1.1.30.172.in-addr.arpa",
                "PTR",
                PTR(f"x.{P}" if k == "i" else "y.other.svc.cluster.local"),
                ttl,
            )
            for k, ttl in order
        ]
        rec = answer("1.1.30.172.in-addr.arpa", "PTR", *records)
        assert parse_answer_classes(rec, DOMAINS) == {"172.30.1.1": (INTERNAL, 50)}


def test_a_cname_loop_does_not_shorten_the_ttls_it_already_found():
    """The walk stops at the first name seen twice: b's record is reached with the TTL of the
    path a -> b (100), not with the loop's way back to a (5)."""
    rec = answer(
        f"a.{P}",
        "A",
        (f"a.{P}", "CNAME", CNAME(f"b.{P}"), 100),
        (f"b.{P}", "CNAME", CNAME(f"a.{P}"), 5),
        a(f"b.{P}", "172.30.1.20", 60),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.1.20": (INTERNAL, 60)}


def test_cname_chains_are_followed_for_max_chain_hops():
    hops = [f"h{i}.{P}" for i in range(MAX_CHAIN + 2)]
    records = [(hops[i], "CNAME", CNAME(hops[i + 1]), 60) for i in range(MAX_CHAIN + 1)]
    last_followed = answer(hops[0], "A", *records, a(hops[MAX_CHAIN], "172.30.1.30"))
    assert parse_answer_classes(last_followed, DOMAINS) == {"172.30.1.30": (INTERNAL, 60)}
    one_more = answer(hops[0], "A", *records, a(hops[MAX_CHAIN + 1], "172.30.1.31"))
    assert parse_answer_classes(one_more, DOMAINS) == {}


@pytest.mark.parametrize(
    "name",
    ["1.2.3.4.example.com", ".".join("0" * 32) + ".example.com"],
    ids=["six labels, not in-addr.arpa", "34 labels, not ip6.arpa"],
)
def test_a_name_of_the_right_length_outside_the_reverse_zones_is_no_address(name):
    assert ptr_address(labels_of(name)) is None


def test_other_records_in_a_ptr_answer_are_ignored_without_raising():
    """Rule 3 reads PTR records only; a TXT (no target name) or CNAME owned by the queried
    name is not a PTR (and a TXT record has no name to read at all)."""
    from dnslib import TXT

    q = "1.1.30.172.in-addr.arpa"
    rec = answer(
        q,
        "PTR",
        (q, "TXT", TXT("hello"), 60),
        (q, "CNAME", CNAME("y.other.svc.cluster.local"), 60),
        (q, "PTR", PTR(f"x.{P}"), 60),
    )
    assert parse_answer_classes(rec, DOMAINS) == {"172.30.1.1": (INTERNAL, 60)}


def test_a_session_or_the_membership_ends_unknown_at_once():
    t = table()
    t.note_unknown("10.1.1.1", now=0)
    t.note_unknown("10.1.1.2", now=0)
    t.note_session("10.1.1.1", now=1, ttl=60)
    t.set_members(frozenset({"10.1.1.2"}), now=1)
    assert not t.known_unknown("10.1.1.1", 2) and not t.known_unknown("10.1.1.2", 2)
    assert not t._unknown  # nothing left to forget later


def test_new_members_evict_nobody():
    t = table(max_entries=2)
    t.learn("172.30.9.1", EXTERNAL, 10, now=0)
    t.learn("172.30.9.2", EXTERNAL, 20, now=0)
    assert t.set_members(frozenset({"10.0.0.1"}), now=0) == [Change("10.0.0.1", None, INTERNAL)]
    assert t.lookup("172.30.9.1", 1) is EXTERNAL and t.lookup("172.30.9.2", 1) is EXTERNAL


def test_items_and_next_expiry():
    t = table()
    assert t.next_expiry() is None and t.items(0) == []
    t.learn("172.30.9.1", EXTERNAL, 20, now=0)
    t.learn("172.30.9.2", INTERNAL, 10, now=0)
    t.note_session("172.30.9.3", 0, 10)
    t.set_members(frozenset({"10.0.0.1"}), now=0)  # DNS "internal" counts for members only
    assert t.next_expiry() == 10
    assert sorted(t.items(0)) == [
        ("10.0.0.1", INTERNAL),
        ("172.30.9.1", EXTERNAL),
        ("172.30.9.3", INTERNAL),
    ]
    assert t.hinted("172.30.9.2", 0)
    assert sorted(t.items(15)) == [("10.0.0.1", INTERNAL), ("172.30.9.1", EXTERNAL)]


def test_compaction_keeps_every_address_scheduled_in_order():
    """Rule 7's compaction rebuilds the schedule from the entries: after it, every address
    still expires, each at its own time."""
    t = table()
    for i in reversed(range(40)):  # learned latest expiry first: insertion order is no heap
        t.learn(f"172.30.9.{i}", EXTERNAL, 100 + i, now=0)
    for k in range(400):  # churn on one address: the schedule is compacted on the way
        t.learn("172.30.8.1", EXTERNAL, 1000 + k, now=0)
    assert len(t._heap) <= 4 * len(t) + 64
    for i in range(40):
        assert t.expire(100 + i) == [Change(f"172.30.9.{i}", EXTERNAL, None)]
    assert t.expire(1399) == [Change("172.30.8.1", EXTERNAL, None)] and len(t) == 0


def test_route_action_takes_a_service_cidr_with_host_bits():
    assert route_action("172.30.1.1", EXTERNAL, "172.30.0.1/16") is RouteAction.VIA_UPLINK
