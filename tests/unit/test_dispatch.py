"""core/dispatch.py: the outbound decision as a pure table, and a Hypothesis sequence of flows,
endpoint changes, affinity and holds that checks what must never happen: a packet to a
project address in the clear, or a new connection to an endpoint that may not take one."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from tencrypt.core.classify import AddrClass, ClassTable, Domains
from tencrypt.core.conntrack import ServiceFlows
from tencrypt.core.dispatch import HOLD_PER_DESTINATION, Dispatcher, Out
from tencrypt.core.holdqueue import HoldQueue
from tencrypt.core.packet import TCP as TCP_PROTO
from tencrypt.core.packet import parse_ipv4
from tencrypt.core.policy import Guard
from tencrypt.core.services import Endpoint, Port, Service, ServiceTable
from tencrypt.core.stats import DropReason, Stats

A = "10.128.0.5"
P1, P2, P3 = "10.128.0.11", "10.128.0.12", "10.128.0.13"
VIP, NEW_VIP, OTHER_VIP = "172.30.5.9", "172.30.5.10", "172.30.9.9"
PODS = frozenset({A, P1, P2, P3})


def table() -> ClassTable:
    return ClassTable(Domains.of("shop.svc.cluster.local", "cluster.local"))


def dispatcher(strict: bool = True, peers: set[str] | None = None, rng=None) -> Dispatcher:
    stats = Stats()
    return Dispatcher(
        table(),
        Guard.of("172.30.0.0/16", ("10.128.0.0/14",)),
        strict,
        stats,
        peers if peers is not None else set(),
        ServiceFlows(stats, rng or (lambda bound: 0)),
    )


def web(*endpoints: str, vip: str = VIP, ready: bool = True) -> Service:
    return Service(
        "web" if vip == VIP else f"svc-{vip}",
        (vip,),
        (Port("http", TCP_PROTO, 80),),
        tuple(Endpoint(ip, (Port("http", TCP_PROTO, 8080),), ready=ready) for ip in endpoints),
    )


def cluster(d: Dispatcher, *services: Service, now: float = 0.0) -> None:
    members = PODS | {ip for s in services for ip in s.ips}
    d.table.set_members(frozenset(members), now)
    d.set_services(ServiceTable.build(services, PODS), now)


def to(dst: str, port: int = 80, sport: int = 40000, flags: str = "S") -> bytearray:
    return bytearray(bytes(IP(src=A, dst=dst) / TCP(sport=sport, dport=port, flags=flags) / b"x"))


def route(d: Dispatcher, buf: bytearray, now: float = 0.0, looked_up: bool = False):
    dst = str(ipaddress.IPv4Address(bytes(buf[16:20])))
    return d.route(buf, dst, now, looked_up)


# --- the table, standalone (no Services) ------------------------------------------------------


def test_standalone_verdicts_are_the_policy_table():
    d = dispatcher()
    d.table.learn("172.30.1.1", AddrClass.INTERNAL, 300, 0.0)
    d.table.learn("172.30.2.2", AddrClass.EXTERNAL, 300, 0.0)
    assert route(d, to("172.30.1.1")) == (Out.SEAL, "172.30.1.1")  # the VIP path
    assert route(d, to("172.30.2.2")) == (Out.CLEAR, "172.30.2.2")
    assert route(d, to("172.30.3.3")) == (Out.HOLD, "172.30.3.3")
    assert route(d, to("172.30.3.3"), looked_up=True) == (Out.REFUSE, "172.30.3.3")
    assert route(d, to("192.0.2.1")) == (Out.CLEAR, "192.0.2.1")  # outside the guarded ranges
    assert not d.cluster


def test_a_peer_is_sealed_at_once_and_no_strict_falls_back_only_for_the_given_up():
    d = dispatcher(strict=False, peers={P1})
    assert route(d, to(P1)) == (Out.SEAL, P1)
    d.table.learn(P2, AddrClass.INTERNAL, 300, 0.0)
    assert route(d, to(P2)) == (Out.SEAL, P2)
    d.give_up(P2, 60.0)
    assert route(d, to(P2), 10.0) == (Out.FALLBACK, P2)
    d.expire(61.0)
    assert route(d, to(P2), 61.0) == (Out.SEAL, P2)
    strict = dispatcher(strict=True)
    strict.table.learn(P2, AddrClass.INTERNAL, 300, 0.0)
    strict.give_up(P2, 60.0)
    assert route(strict, to(P2), 10.0) == (Out.SEAL, P2)  # strict mode ignores a give-up


# --- cluster mode -----------------------------------------------------------------------------


def test_cluster_mode_translates_a_cluster_ip_to_its_endpoint_and_seals_to_it():
    d = dispatcher()
    cluster(d, web(P1))
    buf = to(VIP)
    assert route(d, buf) == (Out.SEAL, P1)  # a member: internal, sealed
    ip = parse_ipv4(buf)
    assert ip is not None and ip.dport == 8080 and d.cluster


def test_a_direct_connection_reusing_a_closed_service_flows_tuple_gets_its_own_replies():
    """conntrack rule 8 through the dispatcher: port 40000 went to the VIP and closed; the
    app's next SYN from 40000 goes to P1:8080 straight; P1's answer must reach the app as
    P1's, not as the VIP's."""
    d = dispatcher(peers={P1})
    cluster(d, web(P1))
    assert route(d, to(VIP))[0] is Out.SEAL
    assert route(d, to(VIP, flags="R"), 1.0)[0] is Out.SEAL
    assert route(d, to(P1, port=8080), 2.0) == (Out.SEAL, P1)
    answer = bytearray(bytes(IP(src=P1, dst=A) / TCP(sport=8080, dport=40000, flags="SA")))
    before = bytes(answer)
    d.on_reply(answer, 2.0)
    assert bytes(answer) == before and d.stats.get("service_flows_reused") == 1


def test_no_endpoint_is_rejected_and_a_malformed_packet_dropped():
    d = dispatcher()
    cluster(d, web(P1, ready=False))
    assert route(d, to(VIP)) == (Out.REJECT, VIP)
    assert route(d, to(VIP, port=81)) == (Out.REJECT, VIP)
    bad = bytearray(bytes(IP(src=A, dst=VIP) / TCP(dport=80)))
    bad[0] = 0x4F  # IHL 60 > the packet: not a well-formed IPv4 packet
    assert route(d, bad) == (Out.DROP, VIP)
    assert d.stats.dropped(DropReason.MALFORMED_PACKET) >= 1


def test_a_new_services_ip_waits_for_the_membership_then_goes_or_is_refused():
    d = dispatcher()
    cluster(d, web(P1))
    d.table.learn(NEW_VIP, AddrClass.INTERNAL, 300, 0.0)  # DNS named it before the file came
    out, dst = route(d, to(NEW_VIP))
    assert (out, dst) == (Out.WAIT, NEW_VIP)
    assert d.hold(out, dst, [to(NEW_VIP)], 0.0) is False  # a WAIT asks no reverse lookup
    cluster(d, web(P1), web(P2, vip=NEW_VIP), now=1.0)
    [(waited, packets)] = d.listed()
    assert waited == NEW_VIP and len(packets) == 1
    assert route(d, packets[0], 1.0) == (Out.SEAL, P2)
    # another one whose Service never comes: refused at its deadline, counted
    d.table.learn(OTHER_VIP, AddrClass.INTERNAL, 300, 1.0)
    d.hold(Out.WAIT, OTHER_VIP, [to(OTHER_VIP)], 1.0)
    assert d.overdue(2.0) == []
    [(late, refused)] = d.overdue(1.0 + d.wait_for_members)
    assert late == OTHER_VIP and d.stats.dropped(DropReason.SERVICE_UNKNOWN) == 1


def test_another_projects_vip_is_not_waited_for():
    d = dispatcher()
    cluster(d, web(P1))
    d.table.learn(OTHER_VIP, AddrClass.EXTERNAL, 300, 0.0)
    assert route(d, to(OTHER_VIP)) == (Out.CLEAR, OTHER_VIP)


def test_holds_are_bounded_per_destination_and_only_the_first_asks_a_lookup():
    d = dispatcher()
    packets = [to("172.30.3.3", sport=i) for i in range(HOLD_PER_DESTINATION + 5)]
    assert d.hold(Out.HOLD, "172.30.3.3", packets[:1], 0.0) is True
    assert d.hold(Out.HOLD, "172.30.3.3", packets[1:], 0.0) is False
    assert d.stats.dropped(DropReason.QUEUE_FULL) == 5
    released = d.release("172.30.3.3")
    assert len(released) == HOLD_PER_DESTINATION and released[0] == packets[0]
    assert d.release("172.30.3.3") == []


def test_replies_get_the_cluster_ip_back_and_a_refusal_quotes_what_the_app_sent():
    d = dispatcher()
    cluster(d, web(P1))
    route(d, to(VIP))
    reply = bytearray(bytes(IP(src=P1, dst=A) / TCP(sport=8080, dport=40000, flags="SA") / b"y"))
    d.on_reply(reply, 1.0)
    assert reply == bytearray(
        bytes(IP(src=VIP, dst=A) / TCP(sport=80, dport=40000, flags="SA") / b"y")
    )
    translated = bytearray(
        bytes(IP(src=A, dst=P1) / TCP(sport=40000, dport=8080, flags="S") / b"x")
    )
    seen = bytearray(bytes(IP(src=A, dst=VIP) / TCP(sport=40000, dport=80, flags="S") / b"x"))
    icmp = bytearray(bytes(IP(src=A, dst=A) / ICMP(type=3, code=13) / Raw(bytes(translated[:28]))))
    d.on_reply(icmp, 1.0)
    assert icmp == bytearray(
        bytes(IP(src=A, dst=A) / ICMP(type=3, code=13) / Raw(bytes(seen[:28])))
    )
    unrelated = bytearray(bytes(IP(src=P2, dst=A) / UDP(sport=1, dport=2) / b"z"))
    before = bytes(unrelated)
    d.on_reply(unrelated, 1.0)
    assert bytes(unrelated) == before


def test_the_hold_queue_bounds_total_and_expires_by_deadline():
    q: HoldQueue[str, int] = HoldQueue(per_key=3, limit=4)
    assert q.add("a", [1, 2, 3, 4]) == (True, 1)
    assert q.add("b", [5, 6], deadline=10.0) == (True, 1)
    assert q.add("c", [7]) == (False, 1)  # nothing fits: "c" does not start waiting
    assert "c" not in q and len(q) == 2 and q.total == 4 and q.count("a") == 3
    assert q.expired(9.0) == [] and q.expired(10.0) == [("b", [5])]
    assert q.pop("a") == [1, 2, 3] and q.total == 0 and list(q) == []


# --- the sequence property ----------------------------------------------------------------------

CANDIDATES = (P1, P2, P3)
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("members"),
            st.lists(
                st.tuples(st.sampled_from(CANDIDATES), st.booleans(), st.booleans()),
                max_size=3,
                unique_by=lambda e: e[0],
            ),
            st.booleans(),  # with ClientIP affinity
        ),
        st.tuples(
            st.just("packet"),
            st.sampled_from([VIP, NEW_VIP, OTHER_VIP, P1, P2, "172.30.7.7", "10.130.0.9"]),
            st.integers(40000, 40004),  # few source ports: flows repeat
            st.sampled_from(["S", "A", "R", "FA"]),
            st.sampled_from([80, 81]),
        ),
        st.tuples(st.just("time"), st.floats(0.0, 400.0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_no_project_address_in_the_clear_and_no_new_flow_to_an_endpoint_that_may_not_take_it(
    steps, rnd
):
    d = dispatcher(rng=rnd.randrange)
    d.table.learn(NEW_VIP, AddrClass.INTERNAL, 10**6, 0.0)  # named by DNS, never in a file
    d.table.learn(OTHER_VIP, AddrClass.EXTERNAL, 10**6, 0.0)
    now, candidates = 0.0, set[tuple[int, int]]()
    for step in steps:
        if step[0] == "members":
            endpoints = [
                Endpoint(
                    ip,
                    (Port("http", TCP_PROTO, 8080),),
                    ready=ready,
                    serving=ready or term,
                    terminating=term,
                )
                for ip, ready, term in step[1]
            ]
            svc = Service(
                "web",
                (VIP,),
                (Port("http", TCP_PROTO, 80),),
                tuple(endpoints),
                600.0 if step[2] else 0.0,
            )
            cluster(d, svc, now=now)
            b = d.flows.table.lookup(int(ipaddress.IPv4Address(VIP)), TCP_PROTO, 80)
            candidates = set(b.choose) if b else set()
        elif step[0] == "time":
            now += step[1]
            d.expire(now)
            d.overdue(now)
        else:
            _, dst, sport, flags, port = step
            buf = to(dst, port, sport, flags)
            key = (
                TCP_PROTO,
                int(ipaddress.IPv4Address(A)),
                sport,
                int(ipaddress.IPv4Address(dst)),
                port,
            )
            existed = d.flows.endpoint_of(key, now) is not None
            out, after = d.route(buf, dst, now)
            if dst in (VIP, NEW_VIP, P1, P2, "172.30.7.7", "10.130.0.9"):  # project or guarded
                assert out not in (Out.CLEAR, Out.FALLBACK), (dst, out)
            if d.cluster and dst == VIP and out is Out.SEAL:
                ip = parse_ipv4(buf)
                assert ip is not None and after in PODS
                if not existed:  # a new connection: only to an endpoint that may take one
                    assert (int(ipaddress.IPv4Address(after)), ip.dport) in candidates
            if out in (Out.HOLD, Out.WAIT):
                d.hold(out, after, [buf], now)


def test_no_strict_fallback_sends_what_the_app_sent_to_the_node_untranslated():
    d = dispatcher(strict=False)
    cluster(d, web(P1))
    d.give_up(P1, 60.0)  # no proxy answered at P1
    buf, original = to(VIP), bytes(to(VIP))
    assert route(d, buf, 1.0) == (Out.FALLBACK, VIP)
    assert bytes(buf) == original  # the node's DNAT picks, and un-DNATs the clear reply
