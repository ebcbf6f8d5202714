"""core/policyflows.py: NetworkPolicy verdicts cached per flow on the tunnel's two paths.

Cast: this pod DB (10.128.0.7) whose ingress admits FRONT (10.128.0.9) on TCP 6379 only, and
whose egress (when isolated) admits API (10.129.0.5) on TCP 443 only. OTHER (10.128.0.8) is a
pod of the project that no rule names.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from tencrypt.core import packet as pk
from tencrypt.core.netpolicy import FORMAT, from_doc
from tencrypt.core.policyflows import MAX_PEERS, PolicyFlows
from tencrypt.core.stats import Counter, DropReason, Stats

DB, FRONT, OTHER, API = "10.128.0.7", "10.128.0.9", "10.128.0.8", "10.129.0.5"


def n(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def doc(ingress: list | None = None, egress: list | None = None) -> dict:
    def direction(rules: list | None, name: str) -> dict:
        if rules is None:
            return {"isolated": False, "policies": [], "rules": []}
        return {
            "isolated": True,
            "policies": [name],
            "rules": [dict(r, policy=name, rule=i) for i, r in enumerate(rules)],
        }

    return {
        "format": FORMAT,
        "project": "shop",
        "pod": "db",
        "generation": 1,
        "ips": [DB],
        "ingress": direction(ingress, "db-in"),
        "egress": direction(egress, "db-out"),
    }


FRONT_6379 = {
    "peers": {"ips": [FRONT], "blocks": []},
    "ports": [{"protocol": "TCP", "port": 6379, "end": 6379}],
}
API_443 = {
    "peers": {"ips": [API], "blocks": []},
    "ports": [{"protocol": "TCP", "port": 443, "end": 443}],
}


def flows(ingress: list | None = None, egress: list | None = None) -> tuple[PolicyFlows, Stats]:
    stats = Stats()
    table = PolicyFlows(stats, max_flows=8)
    table.set_policy(from_doc(doc(ingress, egress)), 0.0)
    return table, stats


def raw(pkt) -> bytearray:
    return bytearray(bytes(pkt))


def check(table: PolicyFlows, way: str, pkt, now: float = 1.0) -> bool:
    buf = raw(pkt)
    ip = pk.parse_ipv4(buf)
    assert ip is not None
    return (table.inbound if way == "in" else table.outbound)(buf, ip, now)


def syn(src: str, dst: str, sport: int, dport: int, flags: str = "S"):
    return IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)


def test_no_policy_tracks_and_enforces_nothing() -> None:
    table = PolicyFlows(Stats())
    assert check(table, "in", syn(OTHER, DB, 1000, 22))
    assert len(table) == 0


def test_ingress_admits_the_named_peer_and_port_only() -> None:
    table, stats = flows(ingress=[FRONT_6379])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert not check(table, "in", syn(OTHER, DB, 40001, 6379))
    assert not check(table, "in", syn(FRONT, DB, 40002, 6380))
    assert not check(table, "in", IP(src=FRONT, dst=DB) / UDP(sport=1, dport=6379))
    assert stats.drops[DropReason.NETWORK_POLICY] == 3
    assert table.allowed == {("ingress", "db-in", "0"): 1}
    assert table.denied == {("ingress", "db-in"): 3}
    assert dict(table.denied_by_peer) == {n(OTHER): 1, n(FRONT): 2}
    assert len(table) == 1  # denied flows are never kept


def test_replies_of_an_allowed_connection_pass_both_ways() -> None:
    table, _ = flows(ingress=[FRONT_6379], egress=[API_443])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    # DB's egress is isolated and FRONT is not an egress peer: the reply passes all the same
    assert check(table, "out", syn(DB, FRONT, 6379, 40000, "SA"))
    assert check(table, "in", syn(FRONT, DB, 40000, 6379, "A"))
    # and the other way: DB opens to API, API's answers pass its isolated ingress
    assert check(table, "out", syn(DB, API, 50000, 443))
    assert check(table, "in", syn(API, DB, 443, 50000, "SA"))
    # a new connection from API to DB is still a new ingress flow: denied
    assert not check(table, "in", syn(API, DB, 443, 50001))


def test_egress_denies_a_new_flow_before_sealing() -> None:
    table, stats = flows(egress=[API_443])
    assert not check(table, "out", syn(DB, OTHER, 50000, 443))
    assert not check(table, "out", syn(DB, API, 50000, 80))
    assert check(table, "out", syn(DB, API, 50000, 443))
    assert table.denied == {("egress", "db-out"): 2}
    assert stats.drops[DropReason.NETWORK_POLICY] == 2


def test_the_pod_reaching_itself_is_allowed() -> None:
    table, _ = flows(ingress=[], egress=[])
    assert check(table, "in", syn(DB, DB, 1, 2))
    assert not check(table, "in", syn(FRONT, DB, 1, 2))


def test_icmp_echo_is_a_flow_and_errors_follow_their_flow() -> None:
    table, _ = flows(ingress=[FRONT_6379], egress=[])
    # egress isolated with no rule: our ping to FRONT is denied, FRONT's ping to us too
    # (a rule that lists ports never matches ICMP)
    assert not check(table, "out", IP(src=DB, dst=FRONT) / ICMP(type=8, id=7))
    assert not check(table, "in", IP(src=FRONT, dst=DB) / ICMP(type=8, id=7))
    # an allowed connection: FRONT's port unreachable about our reply's flow passes
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    quote = IP(src=DB, dst=FRONT) / TCP(sport=6379, dport=40000, flags="A")
    error = IP(src=FRONT, dst=DB) / ICMP(type=3, code=3) / Raw(bytes(quote)[:28])
    assert check(table, "in", error)
    # an error about a flow nobody opened is a new ICMP flow: denied in the isolated way
    stray = IP(src=DB, dst=FRONT) / TCP(sport=1, dport=2)
    assert not check(
        table, "in", IP(src=FRONT, dst=DB) / ICMP(type=3, code=3) / Raw(bytes(stray)[:28])
    )
    # our stack's error about FRONT's packet of the allowed flow leaves (egress isolated)
    quote_in = IP(src=FRONT, dst=DB) / TCP(sport=40000, dport=6379, flags="A")
    assert check(
        table, "out", IP(src=DB, dst=FRONT) / ICMP(type=3, code=3) / Raw(bytes(quote_in)[:28])
    )


def test_echo_allowed_by_a_rule_without_ports_and_its_reply() -> None:
    anyport = {"peers": {"ips": [FRONT], "blocks": []}, "ports": "any"}
    table, _ = flows(ingress=[], egress=[anyport])
    assert check(table, "out", IP(src=DB, dst=FRONT) / ICMP(type=8, id=9))
    assert check(table, "in", IP(src=FRONT, dst=DB) / ICMP(type=0, id=9))
    assert not check(table, "in", IP(src=FRONT, dst=DB) / ICMP(type=0, id=10))


def test_fragments_follow_their_first() -> None:
    table, _ = flows(
        ingress=[
            {
                "peers": {"ips": [FRONT], "blocks": []},
                "ports": [{"protocol": "UDP", "port": 53, "end": 53}],
            }
        ]
    )
    first = IP(src=FRONT, dst=DB, id=77, flags="MF") / UDP(sport=5000, dport=53) / Raw(b"x" * 64)
    later = IP(src=FRONT, dst=DB, id=77, frag=9, proto=17) / Raw(b"y" * 32)
    stray = IP(src=FRONT, dst=DB, id=78, frag=9, proto=17) / Raw(b"y" * 32)
    assert check(table, "in", first)
    assert check(table, "in", later)
    assert not check(table, "in", stray)  # no first seen: no port, no rule without ports


def test_a_new_policy_blocks_known_flows_and_allows_them_again() -> None:
    table, stats = flows(ingress=[FRONT_6379])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert check(table, "out", syn(DB, OTHER, 50000, 80))  # egress not isolated
    assert table.set_policy(from_doc(doc(ingress=[], egress=[])), 2.0) == 2
    assert table.blocked == 2
    assert not check(table, "in", syn(FRONT, DB, 40000, 6379, "A"), 3.0)
    assert not check(table, "out", syn(DB, FRONT, 6379, 40000, "A"), 3.0)
    assert not check(table, "in", syn(OTHER, DB, 80, 50000, "A"), 3.0)
    assert stats.drops[DropReason.NETWORK_POLICY] == 3
    assert table.denied == {("ingress", "db-in"): 2, ("egress", "db-out"): 1}
    assert table.set_policy(from_doc(doc(ingress=[FRONT_6379])), 4.0) == 0
    assert check(table, "in", syn(FRONT, DB, 40000, 6379, "A"), 5.0)
    assert check(table, "out", syn(DB, OTHER, 50000, 80, "A"), 5.0)


def test_a_policy_added_during_traffic_knows_who_opened() -> None:
    table, _ = flows()  # a policy document that isolates nothing: tracking is on
    assert check(table, "in", syn(OTHER, DB, 40000, 6379))
    assert check(table, "out", syn(DB, OTHER, 6379, 40000, "SA"))
    table.set_policy(from_doc(doc(ingress=[FRONT_6379])), 2.0)
    # OTHER opened it: its packets and DB's replies stop, whichever comes first
    assert not check(table, "out", syn(DB, OTHER, 6379, 40000, "A"), 3.0)
    assert not check(table, "in", syn(OTHER, DB, 40000, 6379, "A"), 3.0)


def test_no_policy_again_forgets_every_flow() -> None:
    table, _ = flows(ingress=[FRONT_6379])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert table.set_policy(None, 2.0) == 0
    assert len(table) == 0
    assert check(table, "in", syn(OTHER, DB, 1, 2))


def test_a_reused_tcp_tuple_is_decided_again() -> None:
    table, _ = flows(ingress=[FRONT_6379])
    assert check(table, "out", syn(DB, FRONT, 6379, 40000))  # DB opened it (egress open)
    for flags in ("R",):
        assert check(table, "out", syn(DB, FRONT, 6379, 40000, flags))
    # closed; FRONT now opens a connection on the same tuple: a new ingress flow, allowed
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert table.allowed == {("ingress", "db-in", "0"): 1}


def test_flows_idle_out() -> None:
    table, _ = flows(ingress=[FRONT_6379])
    assert check(table, "in", IP(src=FRONT, dst=DB) / UDP(sport=1, dport=2)) is False
    assert check(table, "out", IP(src=DB, dst=FRONT) / UDP(sport=2, dport=1), 1.0)
    assert check(table, "in", IP(src=FRONT, dst=DB) / UDP(sport=1, dport=2), 100.0)
    assert table.expire(1000.0) == 1
    assert not check(table, "in", IP(src=FRONT, dst=DB) / UDP(sport=1, dport=2), 1000.0)


def test_the_table_is_bounded_and_evicts_the_idlest() -> None:
    table, stats = flows()
    for i in range(12):
        assert check(table, "out", IP(src=DB, dst=OTHER) / UDP(sport=1000 + i, dport=53), float(i))
    assert len(table) == 8
    assert stats.counters[Counter.NETPOL_FLOWS_EVICTED] == 4


def test_denied_peers_are_bounded() -> None:
    table, _ = flows(ingress=[])
    base = n("10.200.0.0")
    for i in range(MAX_PEERS + 5):
        ip = str(ipaddress.IPv4Address(base + i))
        assert not check(table, "in", IP(src=ip, dst=DB) / UDP(sport=1, dport=2))
    assert len(table.denied_by_peer) == MAX_PEERS
    assert base not in table.denied_by_peer


def test_max_flows_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PolicyFlows(Stats(), max_flows=0)
