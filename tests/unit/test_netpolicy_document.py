"""The ``tencrypt-netpol/1`` document the agent writes (deterministic, dual-stack keys, pure
agent modules) and ``tunnel_blocked``: where the CNI, enforcing the project's policies on the
outer packets, would drop the tunnel itself (issue #23)."""

from __future__ import annotations

from pathlib import Path

from tencrypt.agent import netpol, netpolobjects
from tencrypt.agent.netpol import Blocked, World
from tencrypt.core.netpolicy import TCP, Why, parse_netpol, render_netpol
from tests.unit.test_netpolicy import (
    ALICE_AND,
    ALICE_OR,
    ALLOW_EGRESS,
    ALLOW_INGRESS,
    DB,
    DENY_ALL,
    DENY_EGRESS,
    DENY_INGRESS,
    FRONTEND,
    NS,
    PODS,
    TEST_NETWORK_POLICY,
    namespace,
    pod,
    policy,
    table,
)
from tests.unit.test_purity import FORBIDDEN, imported_roots

# -- the document -------------------------------------------------------------------------------


def test_the_document_is_deterministic_and_round_trips():
    world = World.of(NS, [TEST_NETWORK_POLICY, DENY_INGRESS, ALICE_OR], PODS, [namespace()])
    doc = world.reduce("db", generation=3)
    assert doc["format"] == "tencrypt-netpol/1" and doc["generation"] == 3
    assert doc["ingress"]["policies"] == ["alice-or", "default-deny-ingress", "test-network-policy"]
    assert render_netpol(doc) == render_netpol(
        World.of(
            NS, [ALICE_OR, DENY_INGRESS, TEST_NETWORK_POLICY], PODS[::-1], [namespace()]
        ).reduce("db", 3)
    )
    assert parse_netpol(render_netpol(doc)).generation == 3


def test_ip_block_host_bits_are_cleared():
    p = policy(
        "sloppy",
        ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.3/30", "except": ["10.0.0.2/31"]}}]}],
    )
    doc = World.of(NS, [p], PODS, [namespace()]).reduce("db")
    assert doc["ingress"]["rules"][0]["peers"]["blocks"] == [
        {"cidr": "10.0.0.0/30", "except": ["10.0.0.2/31"]}
    ]
    t = parse_netpol(render_netpol(doc))
    assert not t.ingress("10.0.0.2", TCP, 1).allowed and not t.ingress("10.0.0.3", TCP, 1).allowed
    assert (
        t.ingress("10.0.0.1", TCP, 1).why is Why.SELF
        and table([p], [DB, pod("x", "10.0.0.0")]).ingress("10.0.0.0", TCP, 1).allowed
    )


def test_ipv4_and_ipv6_keys_never_collide():
    six = pod("six", "fd00::5", ips=["fd00::5", "::a00:2"])  # ::a00:2 is 10.0.0.2 as an int
    t = table([ALICE_AND], [DB, six, FRONTEND], [namespace(user="alice")])
    assert not t.ingress("10.0.0.2", TCP, 80).allowed  # frontend is no client
    v6 = table(
        [policy("six", ingress=[{"from": [{"ipBlock": {"cidr": "::/96"}}]}])], [DB, six, FRONTEND]
    )
    assert v6.ingress("::a00:2", TCP, 80).allowed and not v6.ingress("10.0.0.2", TCP, 80).allowed


def test_the_agent_modules_stay_pure():
    for module in (netpol, netpolobjects):
        assert not imported_roots(Path(module.__file__)) & FORBIDDEN


# -- tunnel_blocked -----------------------------------------------------------------------------


def blocked(policies, pods=PODS):
    return World.of(NS, policies, pods, [namespace()]).tunnel_blocked()


def test_no_policy_and_allow_all_block_nothing():
    assert blocked([]) == []
    assert blocked([DENY_INGRESS, ALLOW_INGRESS, DENY_EGRESS, ALLOW_EGRESS]) == []


def test_default_deny_blocks_the_tunnel_for_every_pod():
    out = blocked([DENY_INGRESS])
    assert out == [
        Blocked(p["metadata"]["name"], "default-deny-ingress", "ingress", 4)
        for p in sorted(PODS, key=lambda p: p["metadata"]["name"])
    ]


def test_a_tcp_only_policy_blocks_the_udp_tunnel_to_the_pods_it_selects():
    assert blocked([TEST_NETWORK_POLICY]) == [
        Blocked("db", "test-network-policy", "ingress", 4),
        Blocked("db", "test-network-policy", "egress", 4),
    ]


def test_allowing_udp_1337_between_the_projects_pods_unblocks_it():
    tunnel = policy(
        "tencrypt-tunnel",
        policyTypes=["Ingress", "Egress"],
        ingress=[{"from": [{"podSelector": {}}], "ports": [{"protocol": "UDP", "port": 1337}]}],
        egress=[{"to": [{"podSelector": {}}], "ports": [{"protocol": "UDP", "port": 1337}]}],
    )
    assert blocked([DENY_ALL, tunnel]) == []
    assert blocked([DENY_ALL, tunnel], PODS[:1]) == []  # a lone pod has no peer to lose


def test_pods_without_an_address_are_neither_checked_nor_counted():
    pending = pod("pending", None)
    assert blocked([DENY_INGRESS], [DB, FRONTEND, pending]) == [
        Blocked("db", "default-deny-ingress", "ingress", 1),
        Blocked("frontend", "default-deny-ingress", "ingress", 1),
    ]


def test_reduce_pod_is_one_call_from_the_objects():
    doc = netpol.reduce_pod(NS, "db", [DENY_INGRESS], PODS, [namespace()], generation=9)
    assert doc["generation"] == 9 and doc["ingress"]["policies"] == ["default-deny-ingress"]


def test_a_partial_allow_reports_how_many_peers_are_cut_off():
    some = policy(
        "from-frontend",
        ingress=[
            {
                "from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                "ports": [{"protocol": "UDP", "port": 1337}],
            }
        ],
    )
    out = blocked([some])
    assert Blocked("db", "from-frontend", "ingress", 3) in out
    assert Blocked("frontend", "from-frontend", "ingress", 4) in out
