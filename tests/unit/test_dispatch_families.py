"""core/dispatch.py with both families: every scenario runs once over IPv4 and once over IPv6,
on one dual-stack dispatcher (both Service CIDRs and both pod networks guarded), and must come
out the same (dispatch rule 7). A final Hypothesis sequence mixes the families in one run.

Cast per family: this pod A; project pods P1, P2; Service web (VIP:80 -> :8080 on P1) with one
cluster IP per family; NEW_VIP a Service DNS named before the file listed it; OTHER_VIP
another project's; UNKNOWN a guarded address nobody classified; OUTSIDE an address outside the
guarded ranges.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from tencrypt.core import packet as pk
from tencrypt.core.classify import AddrClass, ClassTable, Domains
from tencrypt.core.conntrack import ServiceFlows
from tencrypt.core.dispatch import HOLD_PER_DESTINATION, Dispatcher, Out
from tencrypt.core.netpolicy import from_doc
from tencrypt.core.policy import Guard
from tencrypt.core.services import Endpoint, Port, Service, ServiceTable
from tencrypt.core.stats import DropReason, Stats
from tests.unit.test_policyflows import doc


@dataclass(frozen=True)
class Fam:
    name: str
    A: str
    P1: str
    P2: str
    VIP: str
    NEW_VIP: str
    OTHER_VIP: str
    UNKNOWN: str
    OUTSIDE: str

    @property
    def v6(self) -> bool:
        return self.name == "ipv6"

    def ip(self, src: str, dst: str):
        return IPv6(src=src, dst=dst) if self.v6 else IP(src=src, dst=dst)

    def admin_prohibited(self):
        return ICMPv6DestUnreach(code=1) if self.v6 else ICMP(type=3, code=13)

    def echo(self, reply: bool = False, ident: int = 9):
        if self.v6:
            return (ICMPv6EchoReply if reply else ICMPv6EchoRequest)(id=ident)
        return ICMP(type=0 if reply else 8, id=ident)

    def dst_of(self, buf: bytearray) -> str:
        return str(ipaddress.ip_address(bytes(buf[24:40] if self.v6 else buf[16:20])))


V4 = Fam(
    "ipv4",
    "10.128.0.5",
    "10.128.0.11",
    "10.128.0.12",
    "172.30.5.9",
    "172.30.5.10",
    "172.30.9.9",
    "172.30.3.3",
    "192.0.2.1",
)
V6 = Fam(
    "ipv6",
    "fd00:10:128::5",
    "fd00:10:128::11",
    "fd00:10:128::12",
    "fd00:30::5:9",
    "fd00:30::5:a",
    "fd00:30::9:9",
    "fd00:30::3:3",
    "2001:db8::1",
)
FAMILIES = pytest.mark.parametrize("f", [V4, V6], ids=["ipv4", "ipv6"])
PODS = frozenset({V4.A, V4.P1, V4.P2, V6.A, V6.P1, V6.P2})


def dispatcher(strict: bool = True, peers: set[str] | None = None, rng=None) -> Dispatcher:
    stats = Stats()
    return Dispatcher(
        ClassTable(Domains.of("shop.svc.cluster.local", "cluster.local")),
        Guard.of(("172.30.0.0/16", "fd00:30::/108"), ("10.128.0.0/14", "fd00:10::/32")),
        strict,
        stats,
        peers if peers is not None else set(),
        ServiceFlows(stats, rng or (lambda bound: 0)),
    )


def web(*endpoints: str, ips: tuple[str, ...] = (V4.VIP, V6.VIP), ready: bool = True) -> Service:
    return Service(
        "web" if V4.VIP in ips else f"svc-{ips[0]}",
        ips,
        (Port("http", pk.TCP, 80),),
        tuple(Endpoint(ip, (Port("http", pk.TCP, 8080),), ready=ready) for ip in endpoints),
    )


def cluster(d: Dispatcher, *services: Service, now: float = 0.0) -> None:
    d.table.set_members(PODS | {ip for s in services for ip in s.ips}, now)
    d.set_services(ServiceTable.build(services, PODS), now)


def to(f: Fam, dst: str, port: int = 80, sport: int = 40000, flags: str = "S") -> bytearray:
    return bytearray(bytes(f.ip(f.A, dst) / TCP(sport=sport, dport=port, flags=flags) / b"x"))


def route(d: Dispatcher, f: Fam, buf: bytearray, now: float = 0.0, looked_up: bool = False):
    return d.route(buf, f.dst_of(buf), now, looked_up)


# --- standalone (no Services) -------------------------------------------------------------------


@FAMILIES
def test_standalone_verdicts_are_the_policy_table(f: Fam):
    d = dispatcher()
    d.table.learn(f.VIP, AddrClass.INTERNAL, 300, 0.0)
    d.table.learn(f.OTHER_VIP, AddrClass.EXTERNAL, 300, 0.0)
    assert route(d, f, to(f, f.VIP)) == (Out.SEAL, f.VIP)
    assert route(d, f, to(f, f.OTHER_VIP)) == (Out.CLEAR, f.OTHER_VIP)
    assert route(d, f, to(f, f.UNKNOWN)) == (Out.HOLD, f.UNKNOWN)
    assert route(d, f, to(f, f.UNKNOWN), looked_up=True) == (Out.REFUSE, f.UNKNOWN)
    assert route(d, f, to(f, f.OUTSIDE)) == (Out.CLEAR, f.OUTSIDE)
    d.locked = True  # rule 5: a broken feed refuses the guarded unknown at once
    assert route(d, f, to(f, f.UNKNOWN)) == (Out.REFUSE, f.UNKNOWN)


@FAMILIES
def test_a_peer_is_sealed_and_no_strict_falls_back_only_for_the_given_up(f: Fam):
    d = dispatcher(strict=False, peers={f.P1})
    assert route(d, f, to(f, f.P1)) == (Out.SEAL, f.P1)
    d.table.learn(f.P2, AddrClass.INTERNAL, 300, 0.0)
    d.give_up(f.P2, 60.0)
    assert route(d, f, to(f, f.P2), 10.0) == (Out.FALLBACK, f.P2)
    d.expire(61.0)
    assert route(d, f, to(f, f.P2), 61.0) == (Out.SEAL, f.P2)


# --- cluster mode -------------------------------------------------------------------------------


@FAMILIES
def test_a_cluster_ip_is_translated_to_its_endpoint_and_sealed(f: Fam):
    d = dispatcher()
    cluster(d, web(V4.P1, V6.P1))
    buf = to(f, f.VIP)
    assert route(d, f, buf) == (Out.SEAL, f.P1)  # a member: internal, sealed to it
    ip = pk.parse_ip(buf)
    assert ip is not None and ip.v6 == f.v6 and ip.dport == 8080
    assert f.dst_of(buf) == f.P1 and d.cluster


@FAMILIES
def test_no_endpoint_of_the_family_is_rejected_and_a_malformed_packet_dropped(f: Fam):
    d = dispatcher()
    cluster(d, web(V4.P1 if f.v6 else V6.P1))  # only the other family has an endpoint
    assert route(d, f, to(f, f.VIP)) == (Out.REJECT, f.VIP)
    assert route(d, f, to(f, f.VIP, port=81)) == (Out.REJECT, f.VIP)
    bad = to(f, f.VIP)
    if f.v6:
        bad[4:6] = (len(bad) - 40 + 1).to_bytes(2, "big")  # payload length beyond the bytes
    else:
        bad[0] = 0x4F
    assert route(d, f, bad) == (Out.DROP, f.VIP)
    assert d.stats.dropped(DropReason.MALFORMED_PACKET) == 1
    reject = pk.build_icmp_port_unreachable(to(f, f.VIP), f.VIP)  # what the shell sends
    assert reject is not None and f.dst_of(bytearray(reject)) == f.A
    assert bytes(reject)[0] >> 4 == (6 if f.v6 else 4)


@FAMILIES
def test_a_new_services_ip_waits_for_the_membership_then_goes_or_is_refused(f: Fam):
    d = dispatcher()
    cluster(d, web(V4.P1, V6.P1))
    d.table.learn(f.NEW_VIP, AddrClass.INTERNAL, 300, 0.0)
    out, dst = route(d, f, to(f, f.NEW_VIP))
    assert (out, dst) == (Out.WAIT, f.NEW_VIP)
    assert d.hold(out, dst, [to(f, f.NEW_VIP)], 0.0) is False
    cluster(d, web(V4.P1, V6.P1), web(f.P2, ips=(f.NEW_VIP,)), now=1.0)
    [(waited, packets)] = d.listed()
    assert waited == f.NEW_VIP and route(d, f, packets[0], 1.0) == (Out.SEAL, f.P2)
    d.table.learn(f.OTHER_VIP, AddrClass.INTERNAL, 300, 1.0)
    d.hold(Out.WAIT, f.OTHER_VIP, [to(f, f.OTHER_VIP)], 1.0)
    [(late, _)] = d.overdue(1.0 + d.wait_for_members)
    assert late == f.OTHER_VIP and d.stats.dropped(DropReason.SERVICE_UNKNOWN) == 1


@FAMILIES
def test_holds_are_bounded_and_only_the_first_asks_a_lookup(f: Fam):
    d = dispatcher()
    packets = [to(f, f.UNKNOWN, sport=i) for i in range(HOLD_PER_DESTINATION + 5)]
    assert d.hold(Out.HOLD, f.UNKNOWN, packets[:1], 0.0) is True
    assert d.hold(Out.HOLD, f.UNKNOWN, packets[1:], 0.0) is False
    assert d.stats.dropped(DropReason.QUEUE_FULL) == 5
    released = d.release(f.UNKNOWN)
    assert len(released) == HOLD_PER_DESTINATION and released[0] == packets[0]


@FAMILIES
def test_replies_get_the_cluster_ip_back_and_a_refusal_quotes_what_the_app_sent(f: Fam):
    d = dispatcher()
    cluster(d, web(V4.P1, V6.P1))
    sent = to(f, f.VIP)
    route(d, f, sent)
    reply = bytearray(bytes(f.ip(f.P1, f.A) / TCP(sport=8080, dport=40000, flags="SA") / b"y"))
    d.on_reply(reply, 1.0)
    assert reply == bytearray(
        bytes(f.ip(f.VIP, f.A) / TCP(sport=80, dport=40000, flags="SA") / b"y")
    )
    refusal = pk.build_icmp_admin_prohibited(sent, V4.A)  # as the shell builds it
    assert refusal is not None
    quote = bytearray(refusal)
    d.on_reply(quote, 1.0)
    seen = bytes(to(f, f.VIP))
    src = V4.A if not f.v6 else f.VIP  # IPv6: from the address the app sent to
    outer = IPv6(src=src, dst=f.A) if f.v6 else IP(src=src, dst=f.A, id=0)
    want = outer / f.admin_prohibited() / Raw(seen[: len(seen) if f.v6 else 28])
    assert bytes(quote) == bytes(want)
    unrelated = bytearray(bytes(f.ip(f.P2, f.A) / UDP(sport=1, dport=2) / b"z"))
    before = bytes(unrelated)
    d.on_reply(unrelated, 1.0)
    assert bytes(unrelated) == before


@FAMILIES
def test_an_echo_to_a_cluster_ip_pings_an_endpoint_and_answers_as_the_cluster_ip(f: Fam):
    d = dispatcher()
    cluster(d, web(V4.P1, V6.P1))
    buf = bytearray(bytes(f.ip(f.A, f.VIP) / f.echo()))
    assert route(d, f, buf) == (Out.SEAL, f.P1)
    assert buf == bytearray(bytes(f.ip(f.A, f.P1) / f.echo()))
    pong = bytearray(bytes(f.ip(f.P1, f.A) / f.echo(reply=True)))
    d.on_reply(pong, 1.0)
    assert pong == bytearray(bytes(f.ip(f.VIP, f.A) / f.echo(reply=True)))


@FAMILIES
def test_no_strict_fallback_sends_what_the_app_sent_untranslated(f: Fam):
    d = dispatcher(strict=False)
    cluster(d, web(V4.P1, V6.P1))
    d.give_up(f.P1, 60.0)
    buf, original = to(f, f.VIP), bytes(to(f, f.VIP))
    assert route(d, f, buf, 1.0) == (Out.FALLBACK, f.VIP)
    assert bytes(buf) == original


@FAMILIES
def test_a_direct_connection_reusing_a_closed_service_flows_tuple_gets_its_own_replies(f: Fam):
    d = dispatcher(peers={f.P1})
    cluster(d, web(V4.P1, V6.P1))
    assert route(d, f, to(f, f.VIP))[0] is Out.SEAL
    assert route(d, f, to(f, f.VIP, flags="R"), 1.0)[0] is Out.SEAL
    assert route(d, f, to(f, f.P1, port=8080), 2.0) == (Out.SEAL, f.P1)
    answer = bytearray(bytes(f.ip(f.P1, f.A) / TCP(sport=8080, dport=40000, flags="SA")))
    before = bytes(answer)
    d.on_reply(answer, 2.0)
    assert bytes(answer) == before and d.stats.get("service_flows_reused") == 1


# --- NetworkPolicy --------------------------------------------------------------------------------


@FAMILIES
def test_egress_and_ingress_policies_decide_new_flows_of_both_families(f: Fam):
    d = dispatcher(peers={f.P1, f.P2})
    rule = {
        "peers": {"ips": [f.P2], "blocks": []},
        "ports": [{"protocol": "TCP", "port": 443, "end": 443}],
    }
    policy = doc([], [rule])  # ingress: default deny; egress: P2:443 only
    policy["ips"] = [V4.A, V6.A]
    d.netpol.set_policy(from_doc(policy), 0.0)
    assert route(d, f, to(f, f.P1, 443)) == (Out.DENY, f.P1)
    assert route(d, f, to(f, f.P2, 443)) == (Out.SEAL, f.P2)
    assert d.stats.dropped(DropReason.NETWORK_POLICY) == 1
    assert list(d.netpol.denied_by_peer) == [pk.ip_key(f.P1)]
    answer = bytearray(bytes(f.ip(f.P2, f.A) / TCP(sport=443, dport=40000, flags="SA")))
    assert d.admit(answer, 1.0)  # the reply of an allowed flow
    stranger = bytearray(bytes(f.ip(f.P1, f.A) / TCP(sport=5, dport=22, flags="S")))
    assert not d.admit(stranger, 1.0)  # ingress default deny
    garbage = bytearray(b"\x60" + bytes(39)) if f.v6 else bytearray(b"\x45" + bytes(19))
    assert not d.admit(garbage, 1.0)


def test_the_same_peer_int_in_both_families_is_two_policy_peers():
    """::10.128.0.11 and 10.128.0.11 share an int: a rule for one never allows the other."""
    twin_text = str(ipaddress.ip_address("::" + V4.P1))
    d = dispatcher(peers={V4.P1, twin_text})
    rule = {"peers": {"ips": [V4.P1], "blocks": []}, "ports": "any"}
    policy = doc(None, [rule])
    policy["ips"] = [V4.A]
    d.netpol.set_policy(from_doc(policy), 0.0)
    assert route(d, V4, to(V4, V4.P1))[0] is Out.SEAL
    twin = bytearray(bytes(IPv6(src=V6.A, dst=twin_text) / TCP(sport=40000, dport=80)))
    assert d.route(twin, twin_text, 0.0)[0] is Out.DENY


# --- the sequence property, both families in one run ------------------------------------------

DESTINATIONS = [
    (fam, dst)
    for fam in (V4, V6)
    for dst in (fam.VIP, fam.NEW_VIP, fam.OTHER_VIP, fam.P1, fam.P2, fam.UNKNOWN)
]
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("members"),
            st.lists(st.sampled_from([V4.P1, V4.P2, V6.P1, V6.P2]), max_size=4, unique=True),
            st.booleans(),  # ready
        ),
        st.tuples(
            st.just("packet"),
            st.sampled_from(range(len(DESTINATIONS))),
            st.integers(40000, 40003),
            st.sampled_from(["S", "A", "R"]),
            st.sampled_from([80, 81]),
        ),
        st.tuples(st.just("time"), st.floats(0.0, 400.0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_no_project_address_in_the_clear_and_translations_never_change_family(steps, rnd):
    d = dispatcher(rng=rnd.randrange)
    for fam in (V4, V6):
        d.table.learn(fam.NEW_VIP, AddrClass.INTERNAL, 10**6, 0.0)
        d.table.learn(fam.OTHER_VIP, AddrClass.EXTERNAL, 10**6, 0.0)
    now = 0.0
    for step in steps:
        if step[0] == "members":
            cluster(d, web(*step[1], ready=step[2]), now=now)
        elif step[0] == "time":
            now += step[1]
            d.expire(now)
            d.overdue(now)
        else:
            _, which, sport, flags, port = step
            fam, dst = DESTINATIONS[which]
            buf = to(fam, dst, port, sport, flags)
            out, after = d.route(buf, dst, now)
            if dst != fam.OTHER_VIP:  # every other one is the project's, or guarded
                assert out not in (Out.CLEAR, Out.FALLBACK), (dst, out)
            ip = pk.parse_ip(buf)
            assert ip is not None and ip.v6 == fam.v6
            assert ipaddress.ip_address(after).version == (6 if fam.v6 else 4)
            if d.cluster and dst == fam.VIP and out is Out.SEAL:
                assert after in PODS and fam.dst_of(buf) == after and ip.dport == 8080
            if out in (Out.HOLD, Out.WAIT):
                d.hold(out, after, [buf], now)
