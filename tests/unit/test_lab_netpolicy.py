"""lab/netpolicy.py ``build_ruleset``, the lab's CNI emulation as nft text (pure): a chain per
isolated direction of each pod, its own address first, one ``return`` per (peer, port) match
of each rule, IPv4 only, named egress ports per destination, then a counted drop.

Cast (lab "lab", one node): web 172.17.0.11, db 172.17.0.12 (container ports sql 5432 and
admin 9000, role=db), client 172.17.0.13 (role=client), all of project shop."""

from __future__ import annotations

from typing import Any

from tencrypt.agent.netpol import World
from tencrypt.lab.netpolicy import TABLE, build_ruleset, pod_object
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.nodesync.kubeobjects import build_namespace
from tests.unit.test_netpolicy import policy

TOPOLOGY = Topology(
    pods=[
        PodSpec("web", "shop"),
        PodSpec("db", "shop", ports={"sql": 5432, "admin": 9000}, labels={"role": "db"}),
        PodSpec("client", "shop", labels={"role": "client"}),
    ]
)
_, PODS = TOPOLOGY.plan("lab", 1)
WEB, DB, CLIENT = PODS["web"].ip, PODS["db"].ip, PODS["client"].ip
OPEN = {"isolated": False, "policies": [], "rules": []}
HEAD = [
    f"table inet {TABLE} {{}}",
    f"delete table inet {TABLE}",
    f"table inet {TABLE} {{",
    "  chain forward {",
    "    type filter hook forward priority filter + 10; policy accept;",
    "    ct direction reply accept",
    "    ct state related accept",
]


def isolated(*rules: dict[str, Any], policies=("p",)) -> dict[str, Any]:
    """A direction the policies isolate, with ``rules`` (peers, ports) numbered as policy p's."""
    return {
        "isolated": True,
        "policies": list(policies),
        "rules": [{"policy": policies[0], "rule": i, **r} for i, r in enumerate(rules)],
    }


def document(name: str, ingress=OPEN, egress=OPEN, named_ports=None) -> dict[str, Any]:
    return {
        "format": "tencrypt-netpol/1",
        "project": "shop",
        "pod": name,
        "generation": 0,
        "ips": [PODS[name].ip],
        "ingress": ingress,
        "egress": egress,
        "named_ports": named_ports or {},
        "malformed": [],
    }


def peers(*ips: str, blocks=()) -> dict[str, Any]:
    return {"ips": list(ips), "blocks": list(blocks)}


def tcp(port: int, end: int | None = None, protocol: str = "TCP") -> dict[str, Any]:
    return {"protocol": protocol, "port": port, "end": port if end is None else end}


def chain(ruleset: str, name: str) -> list[str]:
    """The lines inside ``chain name { ... }``."""
    lines = ruleset.splitlines()
    start = lines.index(f"  chain {name} {{") + 1
    return lines[start : lines.index("  }", start)]


def test_one_isolated_direction_is_one_chain_jumped_to_from_forward():
    docs = {"db": document("db", ingress=isolated({"peers": peers(CLIENT), "ports": [tcp(5432)]}))}
    assert build_ruleset(PODS.values(), docs) == "\n".join(
        [
            *HEAD,
            f"    ip daddr {DB} jump ingress_db",
            "  }",
            "  chain ingress_db {",
            f"    ip saddr {DB} return",
            f"    ip saddr {{ {CLIENT} }} meta l4proto tcp th dport 5432 return",
            '    counter drop comment "p"',
            "  }",
            "}",
            "",
        ]
    )


def test_no_document_or_no_isolation_no_chain():
    docs = {"web": document("web"), "client": document("client")}
    assert build_ruleset(PODS.values(), docs) == "\n".join([*HEAD, "  }", "}", ""])
    assert build_ruleset([], {}) == "\n".join([*HEAD, "  }", "}", ""])


def test_pods_in_name_order_egress_before_ingress():
    docs = {
        name: document(name, ingress=isolated(), egress=isolated())
        for name in ("web", "db", "client")
    }
    ruleset = build_ruleset(PODS.values(), docs)
    jumps = [line.strip() for line in ruleset.splitlines() if " jump " in line]
    assert jumps == [
        f"ip saddr {CLIENT} jump egress_client",
        f"ip daddr {CLIENT} jump ingress_client",
        f"ip saddr {DB} jump egress_db",
        f"ip daddr {DB} jump ingress_db",
        f"ip saddr {WEB} jump egress_web",
        f"ip daddr {WEB} jump ingress_web",
    ]
    # isolated with no rule: the pod's own address, then the drop (default deny)
    assert chain(ruleset, "egress_web") == [
        f"    ip daddr {WEB} return",
        '    counter drop comment "p"',
    ]


def test_any_peer_and_any_port():
    docs = {
        "db": document(
            "db",
            ingress=isolated(
                {"peers": "any", "ports": "any"},
                {"peers": "any", "ports": [tcp(80), tcp(53, protocol="UDP")]},
                {"peers": peers(WEB, CLIENT), "ports": "any"},
            ),
        )
    }
    assert chain(build_ruleset(PODS.values(), docs), "ingress_db") == [
        f"    ip saddr {DB} return",
        "    meta nfproto ipv4 return",
        "    meta l4proto tcp th dport 80 return",
        "    meta l4proto udp th dport 53 return",
        f"    ip saddr {{ {WEB}, {CLIENT} }} return",
        '    counter drop comment "p"',
    ]


def test_port_ranges_and_every_peer_port_pair():
    rule = {
        "peers": peers(WEB, blocks=[{"cidr": "10.0.0.0/8", "except": []}]),
        "ports": [tcp(1000, 2000), tcp(9, protocol="SCTP")],
    }
    docs = {"db": document("db", egress=isolated(rule))}
    assert chain(build_ruleset(PODS.values(), docs), "egress_db") == [
        f"    ip daddr {DB} return",
        f"    ip daddr {{ {WEB} }} meta l4proto tcp th dport 1000-2000 return",
        "    ip daddr 10.0.0.0/8 meta l4proto tcp th dport 1000-2000 return",
        f"    ip daddr {{ {WEB} }} meta l4proto sctp th dport 9 return",
        "    ip daddr 10.0.0.0/8 meta l4proto sctp th dport 9 return",
        '    counter drop comment "p"',
    ]


def test_ip_blocks_with_their_excepts_and_ipv6_left_out():
    rule = {
        "peers": peers(
            "fd00::5",
            CLIENT,
            blocks=[
                {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24", "fd00::/8", "172.17.2.0/24"]},
                {"cidr": "fd00::/64", "except": []},
                {"cidr": "192.168.0.0/16", "except": ["fd00::/8"]},
            ],
        ),
        "ports": "any",
    }
    docs = {"db": document("db", ingress=isolated(rule))}
    assert chain(build_ruleset(PODS.values(), docs), "ingress_db") == [
        f"    ip saddr {DB} return",
        f"    ip saddr {{ {CLIENT} }} return",
        "    ip saddr 172.17.0.0/16 ip saddr != { 172.17.1.0/24, 172.17.2.0/24 } return",
        "    ip saddr 192.168.0.0/16 return",
        '    counter drop comment "p"',
    ]


def test_peers_that_are_ipv6_only_or_nothing_allow_nothing():
    docs = {
        "db": document(
            "db",
            ingress=isolated(
                {
                    "peers": peers("fd00::5", blocks=[{"cidr": "fd00::/64", "except": []}]),
                    "ports": "any",
                },
                {"peers": peers(), "ports": [tcp(80)]},  # a selector that selected no pod
            ),
        )
    }
    assert chain(build_ruleset(PODS.values(), docs), "ingress_db") == [
        f"    ip saddr {DB} return",
        '    counter drop comment "p"',
    ]


NAMED = {
    DB: {"TCP/sql": [5432], "TCP/admin": [9000]},
    WEB: {"TCP/sql": [15432, 15433]},
    CLIENT: {"UDP/sql": [53]},
    "fd00::12": {"TCP/sql": [5432]},
}


def test_a_named_egress_port_is_each_matching_destinations_numbers():
    docs = {
        "client": document(
            "client",
            egress=isolated({"peers": "any", "ports": [{"protocol": "TCP", "name": "sql"}]}),
            named_ports=NAMED,
        )
    }
    assert chain(build_ruleset(PODS.values(), docs), "egress_client") == [
        f"    ip daddr {CLIENT} return",
        f"    ip daddr {WEB} meta l4proto tcp th dport {{ 15432, 15433 }} return",
        f"    ip daddr {DB} meta l4proto tcp th dport {{ 5432 }} return",
        '    counter drop comment "p"',
    ]


def test_a_named_egress_port_only_for_destinations_the_rules_peers_match():
    by_ip = {"peers": peers(DB), "ports": [{"protocol": "TCP", "name": "sql"}]}
    by_block = {
        "peers": peers(blocks=[{"cidr": "172.17.0.0/16", "except": [f"{DB}/32"]}]),
        "ports": [{"protocol": "TCP", "name": "sql"}, tcp(22)],
    }
    unknown = {"peers": "any", "ports": [{"protocol": "TCP", "name": "nope"}]}
    docs = {
        "client": document("client", egress=isolated(by_ip, by_block, unknown), named_ports=NAMED)
    }
    assert chain(build_ruleset(PODS.values(), docs), "egress_client") == [
        f"    ip daddr {CLIENT} return",
        f"    ip daddr {DB} meta l4proto tcp th dport {{ 5432 }} return",
        f"    ip daddr {WEB} meta l4proto tcp th dport {{ 15432, 15433 }} return",
        f"    ip daddr 172.17.0.0/16 ip daddr != {{ {DB}/32 }} meta l4proto tcp th dport 22 return",
        '    counter drop comment "p"',
    ]


def test_the_drop_names_the_isolating_policies_quoted_safely_and_bounded():
    long_name = "x" * 200
    docs = {
        "db": document("db", ingress=isolated(policies=('say "hi"', "b"))),
        "web": document("web", egress=isolated(policies=(long_name,))),
    }
    ruleset = build_ruleset(PODS.values(), docs)
    assert chain(ruleset, "ingress_db")[-1] == "    counter drop comment \"say 'hi', b\""
    assert chain(ruleset, "egress_web")[-1] == f'    counter drop comment "{"x" * 120}"'


def test_only_the_given_pods_get_chains():
    docs = {name: document(name, ingress=isolated()) for name in ("web", "db", "client")}
    ruleset = build_ruleset([PODS["db"]], docs)
    assert [line.strip() for line in ruleset.splitlines() if "chain " in line] == [
        "chain forward {",
        "chain ingress_db {",
    ]


def test_from_the_agents_reduction_of_the_lab_pods():
    """The documents as lab.netpolicy.documents makes them: World over pod_object."""
    db_in = policy(
        "db-in",
        ns="shop",
        podSelector={"matchLabels": {"role": "db"}},
        ingress=[
            {
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": "sql"}, {"protocol": "UDP", "port": 1337}],
            }
        ],
    )
    client_out = policy(
        "client-out",
        ns="shop",
        podSelector={"matchLabels": {"role": "client"}},
        policyTypes=["Egress"],
        egress=[
            {"to": [{"podSelector": {"matchLabels": {"role": "db"}}}], "ports": [{"port": "sql"}]}
        ],
    )
    world = World.of(
        "shop",
        [db_in, client_out],
        [pod_object(p) for p in PODS.values()],
        [build_namespace("shop")],
    )
    docs = {name: world.reduce(name) for name in PODS}
    ruleset = build_ruleset(PODS.values(), docs)
    assert chain(ruleset, "ingress_db") == [
        f"    ip saddr {DB} return",
        f"    ip saddr {{ {CLIENT} }} meta l4proto tcp th dport 5432 return",
        f"    ip saddr {{ {CLIENT} }} meta l4proto udp th dport 1337 return",
        '    counter drop comment "db-in"',
    ]
    assert chain(ruleset, "egress_client") == [
        f"    ip daddr {CLIENT} return",
        f"    ip daddr {DB} meta l4proto tcp th dport {{ 5432 }} return",
        '    counter drop comment "client-out"',
    ]
    assert [line.strip() for line in ruleset.splitlines() if " jump " in line] == [
        f"ip saddr {CLIENT} jump egress_client",
        f"ip daddr {DB} jump ingress_db",
    ]
