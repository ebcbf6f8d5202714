"""core/dispatch.py stage 4 and rule 6: NetworkPolicy on the tunnel's flows. ``route`` denies a
new flow the pod's egress policies deny before it is sealed, after the Service translation
(the decision sees the endpoint pod and its target port, as a CNI does after kube-proxy's
DNAT); packets to the clear are the CNI's and never checked. ``admit`` drops an opened packet
the ingress policies deny, and translates the replies it lets through.

Cast: this pod A (10.128.0.5); P1, P2 pods of the project; web (VIP 172.30.5.9:80) in front
of P1:8080."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP

from tencrypt.core.classify import AddrClass
from tencrypt.core.dispatch import Dispatcher, Out
from tencrypt.core.netpolicy import from_doc
from tencrypt.core.stats import DropReason
from tests.unit.test_dispatch import P1, P2, VIP, A, cluster, dispatcher, route, to, web
from tests.unit.test_policyflows import doc, n


def tcp_to(dst: str, port: int) -> dict:
    """A rule admitting ``dst`` on TCP ``port``."""
    return {
        "peers": {"ips": [dst], "blocks": []},
        "ports": [{"protocol": "TCP", "port": port, "end": port}],
    }


def enforce(d: Dispatcher, ingress: list | None = None, egress: list | None = None) -> None:
    """Load A's policy: a direction given as None is not isolated, [] denies everything."""
    policy = doc(ingress, egress)
    policy["ips"] = [A]
    d.netpol.set_policy(from_doc(policy), 0.0)


def denied(d: Dispatcher) -> int:
    return d.stats.dropped(DropReason.NETWORK_POLICY)


def reply(src: str = P1, sport: int = 8080, dport: int = 40000, flags: str = "SA") -> bytearray:
    return bytearray(bytes(IP(src=src, dst=A) / TCP(sport=sport, dport=dport, flags=flags) / b"y"))


# -- route: egress ------------------------------------------------------------------------------


def test_a_new_flow_the_egress_policy_denies_is_deny_and_counted():
    d = dispatcher(peers={P1, P2})
    enforce(d, egress=[tcp_to(P2, 443)])
    assert route(d, to(P1, 443)) == (Out.DENY, P1)
    assert route(d, to(P2, 80)) == (Out.DENY, P2)
    assert route(d, to(P2, 443)) == (Out.SEAL, P2)
    assert denied(d) == 2
    assert d.netpol.denied == {("egress", "db-out"): 2}
    assert dict(d.netpol.denied_by_peer) == {n(P1): 1, n(P2): 1}
    assert d.netpol.allowed == {("egress", "db-out", "0"): 1} and len(d.netpol) == 1


def test_the_decision_after_a_service_sees_the_endpoint_and_its_target_port():
    for rule, verdict in (
        (tcp_to(P1, 8080), (Out.SEAL, P1)),  # the pod and the target port: what a CNI sees
        (tcp_to(P1, 80), (Out.DENY, P1)),  # the Service port is not what is decided on
        (tcp_to(VIP, 8080), (Out.DENY, P1)),  # nor the cluster IP
        (tcp_to(VIP, 80), (Out.DENY, P1)),
    ):
        d = dispatcher()
        cluster(d, web(P1))
        enforce(d, egress=[rule])
        buf = to(VIP)
        assert route(d, buf) == verdict, rule
        assert bytes(buf[16:20]) == bytes(IP(dst=P1))[16:20]  # translated either way
        assert denied(d) == (1 if verdict[0] is Out.DENY else 0)


def test_a_flow_allowed_once_is_kept_and_its_later_packets_are_not_decided_again():
    d = dispatcher(peers={P1})
    enforce(d, egress=[tcp_to(P1, 443)])
    assert route(d, to(P1, 443, sport=40000)) == (Out.SEAL, P1)
    assert route(d, to(P1, 443, sport=40000, flags="A")) == (Out.SEAL, P1)
    assert d.netpol.allowed == {("egress", "db-out", "0"): 1} and len(d.netpol) == 1
    enforce(d, egress=[])  # the rule is removed under the connection: it ends
    assert d.netpol.blocked == 1
    assert route(d, to(P1, 443, sport=40000, flags="A")) == (Out.DENY, P1)


def test_clear_hold_and_refuse_are_not_the_tunnels_so_no_policy_is_asked():
    d = dispatcher()
    enforce(d, ingress=[], egress=[])  # deny everything both ways
    d.table.learn("172.30.2.2", AddrClass.EXTERNAL, 300, 0.0)
    assert route(d, to("192.0.2.1")) == (Out.CLEAR, "192.0.2.1")
    assert route(d, to("172.30.2.2")) == (Out.CLEAR, "172.30.2.2")
    assert route(d, to("172.30.3.3")) == (Out.HOLD, "172.30.3.3")
    assert route(d, to("172.30.3.3"), looked_up=True) == (Out.REFUSE, "172.30.3.3")
    assert denied(d) == 0 and len(d.netpol) == 0 and d.netpol.denied == {}


def test_no_policy_enforces_and_tracks_nothing():
    d = dispatcher(peers={P1})
    assert route(d, to(P1, 443)) == (Out.SEAL, P1)
    assert denied(d) == 0 and len(d.netpol) == 0


def test_a_sealed_packet_that_does_not_parse_is_dropped_and_counted_under_a_policy():
    bad = bytearray(bytes(IP(src=A, dst=P1) / TCP(dport=443)))
    bad[0] = 0x4F  # IHL 60, longer than the packet
    d = dispatcher(peers={P1})
    assert route(d, bytearray(bad)) == (Out.SEAL, P1)  # no policy: the seal path's business
    enforce(d, egress=None)  # a policy that isolates nothing still tracks: it parses the packet
    assert route(d, bytearray(bad)) == (Out.DROP, P1)
    assert d.stats.dropped(DropReason.MALFORMED_PACKET) == 1 and denied(d) == 0


# -- admit: ingress -----------------------------------------------------------------------------


def test_admit_drops_what_the_ingress_policy_denies_and_counts_it():
    d = dispatcher()
    enforce(d, ingress=[tcp_to(P1, 6379)])
    inbound = bytearray(bytes(IP(src=P2, dst=A) / TCP(sport=1000, dport=6379, flags="S")))
    before = bytes(inbound)
    assert d.admit(inbound, 1.0) is False
    assert bytes(inbound) == before
    assert denied(d) == 1 and d.netpol.denied == {("ingress", "db-in"): 1}
    assert dict(d.netpol.denied_by_peer) == {n(P2): 1}
    allowed = bytearray(bytes(IP(src=P1, dst=A) / TCP(sport=1000, dport=6379, flags="S")))
    assert d.admit(allowed, 1.0) is True
    assert d.netpol.allowed == {("ingress", "db-in", "0"): 1} and denied(d) == 1


def test_an_admitted_reply_still_gets_the_cluster_ip_back():
    d = dispatcher()
    cluster(d, web(P1))
    enforce(d, ingress=[], egress=[tcp_to(P1, 8080)])  # ingress isolated, nothing admitted
    assert route(d, to(VIP)) == (Out.SEAL, P1)
    back = reply()
    assert d.admit(back, 1.0) is True  # the reply of a connection A opened
    assert back == bytearray(
        bytes(IP(src=VIP, dst=A) / TCP(sport=80, dport=40000, flags="SA") / b"y")
    )
    assert denied(d) == 0


def test_a_denied_packet_is_not_translated():
    d = dispatcher()
    cluster(d, web(P1))
    assert route(d, to(VIP)) == (Out.SEAL, P1)  # opened before any policy: not tracked
    enforce(d, ingress=[])
    back = reply()
    before = bytes(back)
    assert d.admit(back, 1.0) is False
    assert bytes(back) == before and denied(d) == 1


def test_without_a_policy_admit_is_on_reply_and_true():
    d = dispatcher()
    cluster(d, web(P1))
    route(d, to(VIP))
    back = reply()
    assert d.admit(back, 1.0) is True
    assert bytes(back[12:16]) == bytes(IP(src=VIP))[12:16]
    stranger = bytearray(bytes(IP(src=P2, dst=A) / UDP(sport=1, dport=2) / b"z"))
    before = bytes(stranger)
    assert d.admit(stranger, 1.0) is True and bytes(stranger) == before
    bad = bytearray(stranger)
    bad[0] = 0x4F
    assert d.admit(bad, 1.0) is True  # nothing to enforce: injected as it came
    assert d.stats.dropped(DropReason.MALFORMED_PACKET) == 0 and len(d.netpol) == 0


def test_an_opened_packet_that_does_not_parse_is_dropped_under_a_policy():
    d = dispatcher()
    enforce(d, ingress=None)
    bad = bytearray(bytes(IP(src=P2, dst=A) / UDP(sport=1, dport=2) / b"z"))
    bad[0] = 0x4F
    assert d.admit(bad, 1.0) is False
    assert d.stats.dropped(DropReason.MALFORMED_PACKET) == 1 and denied(d) == 0
