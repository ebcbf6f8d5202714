"""NetworkPolicy inside an encrypted project (issue #23), without root: the agent's reduction
(``agent/netpol.py``) and the proxy's table (``core/netpolicy.py``) against the examples of
https://kubernetes.io/docs/concepts/services-networking/network-policies/, plus named ports,
policyTypes defaulting and selectors. Elsewhere: the document and ``tunnel_blocked``
(``test_netpolicy_document.py``), malformed input (``test_netpolicy_malformed.py``), the
property against a reference (``test_netpolicy_property.py``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tencrypt.agent import netpolobjects
from tencrypt.agent.netpol import World
from tencrypt.core.netpolicy import SCTP, TCP, UDP, NetPolicy, Why, parse_netpol, render_netpol

ICMP = 1
NS = "default"


# -- objects as the API server writes them ----------------------------------------------------


def namespace(name: str = NS, **labels: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ip: str | None, ns: str = NS, ports=(), ips=None, **labels: str):
    """A running pod; ``ports``: (name, number, protocol) container ports."""
    status: dict[str, Any] = {"phase": "Running"}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": i} for i in (ips or [ip])])
    container_ports = [{"containerPort": n, "name": nm, "protocol": pr} for nm, n, pr in ports]
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "app", "ports": container_ports}]},
        "status": status,
    }


def policy(name: str, ns: str = NS, **spec: Any) -> dict[str, Any]:
    spec.setdefault("podSelector", {})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def table(policies, pods, namespaces=None, target="db", project=NS) -> NetPolicy:
    """The target pod's table, through the file's text as the proxy reads it."""
    world = World.of(project, policies, pods, namespaces or [namespace(project)])
    return parse_netpol(render_netpol(world.reduce(target)))


# The pods of most examples: a database, its frontend, and two others of the project.
DB = pod("db", "10.0.0.1", role="db", ports=[("redis", 6379, "TCP")])
FRONTEND = pod("frontend", "10.0.0.2", role="frontend", ports=[("http", 8080, "TCP")])
CLIENT = pod("client", "10.0.0.3", role="client")
IN_BLOCK = pod("batch", "172.17.0.5")  # inside the example's ipBlock
IN_EXCEPT = pod("legacy", "172.17.1.5")  # inside its except
PODS = [DB, FRONTEND, CLIENT, IN_BLOCK, IN_EXCEPT]
PEERS = ["10.0.0.2", "10.0.0.3", "172.17.0.5", "172.17.1.5"]

# -- "Default policies" ------------------------------------------------------------------------

DENY_INGRESS = policy("default-deny-ingress", policyTypes=["Ingress"])
ALLOW_INGRESS = policy("allow-all-ingress", ingress=[{}], policyTypes=["Ingress"])
DENY_EGRESS = policy("default-deny-egress", policyTypes=["Egress"])
ALLOW_EGRESS = policy("allow-all-egress", egress=[{}], policyTypes=["Egress"])
DENY_ALL = policy("default-deny-all", policyTypes=["Ingress", "Egress"])


def test_no_policy_isolates_nothing():
    t = table([], PODS)
    for peer in PEERS:
        assert t.ingress(peer, TCP, 80).why is Why.UNISOLATED
        assert t.egress(peer, UDP, 53).why is Why.UNISOLATED


def test_default_deny_ingress_denies_every_peer_and_leaves_egress_alone():
    t = table([DENY_INGRESS], PODS)
    for peer in PEERS:
        for proto, port in ((TCP, 6379), (UDP, 53), (SCTP, 9), (ICMP, 0)):
            d = t.ingress(peer, proto, port)
            assert not d.allowed and d.isolating == ("default-deny-ingress",)
        assert t.egress(peer, TCP, 80).why is Why.UNISOLATED


def test_default_allow_all_ingress_wins_over_default_deny():
    t = table([DENY_INGRESS, ALLOW_INGRESS], PODS)
    for peer in PEERS:
        for proto, port in ((ICMP, 0), (TCP, 1), (UDP, 53), (SCTP, 9)):
            d = t.ingress(peer, proto, port)
            assert d.allowed and (d.policy, d.rule) == ("allow-all-ingress", 0)


def test_default_deny_egress_denies_every_destination_and_leaves_ingress_alone():
    t = table([DENY_EGRESS], PODS)
    for peer in PEERS:
        assert t.egress(peer, TCP, 443).isolating == ("default-deny-egress",)
        assert t.ingress(peer, TCP, 6379).why is Why.UNISOLATED


def test_default_allow_all_egress():
    t = table([DENY_EGRESS, ALLOW_EGRESS], PODS)
    assert all(t.egress(peer, UDP, 5353).policy == "allow-all-egress" for peer in PEERS)


def test_default_deny_all_both_ways():
    t = table([DENY_ALL], PODS)
    for peer in PEERS:
        assert not t.ingress(peer, TCP, 1).allowed and not t.egress(peer, TCP, 1).allowed


def test_a_pod_cannot_block_access_to_itself():
    t = table([DENY_ALL], [pod("db", "10.0.0.1", ips=["10.0.0.1", "fd00::1"]), FRONTEND])
    for own in ("10.0.0.1", 0x0A000001, "fd00::1"):
        assert t.ingress(own, TCP, 80).why is Why.SELF
        assert t.egress(own, TCP, 80).why is Why.SELF


# -- "The NetworkPolicy resource": test-network-policy ---------------------------------------

TEST_NETWORK_POLICY = policy(
    "test-network-policy",
    podSelector={"matchLabels": {"role": "db"}},
    policyTypes=["Ingress", "Egress"],
    ingress=[
        {
            "from": [
                {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                {"podSelector": {"matchLabels": {"role": "frontend"}}},
            ],
            "ports": [{"protocol": "TCP", "port": 6379}],
        }
    ],
    egress=[
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}], "ports": [{"protocol": "TCP", "port": 5978}]}
    ],
)


def test_the_example_allows_frontend_and_the_block_but_its_except_on_6379_only():
    t = table([TEST_NETWORK_POLICY], PODS)  # the namespace lacks project=myproject
    assert t.ingress("10.0.0.2", TCP, 6379).policy == "test-network-policy"
    assert t.ingress("172.17.0.5", TCP, 6379).allowed  # ipBlock
    assert not t.ingress("172.17.1.5", TCP, 6379).allowed  # its except
    assert not t.ingress("10.0.0.3", TCP, 6379).allowed  # not a frontend
    assert not t.ingress("10.0.0.2", TCP, 6380).allowed
    assert not t.ingress("10.0.0.2", UDP, 6379).allowed


def test_the_example_namespace_selector_admits_the_whole_project_when_its_labels_match():
    t = table([TEST_NETWORK_POLICY], PODS, [namespace(project="myproject")])
    assert all(t.ingress(peer, TCP, 6379).allowed for peer in PEERS)
    assert not any(t.ingress(peer, TCP, 80).allowed for peer in PEERS)


def test_the_example_egress_to_its_block_on_5978_only():
    t = table([TEST_NETWORK_POLICY], PODS)
    assert t.egress("10.0.0.2", TCP, 5978).allowed
    assert not t.egress("10.0.0.2", TCP, 5979).allowed
    assert not t.egress("172.17.0.5", TCP, 5978).allowed  # outside 10.0.0.0/24


def test_the_example_does_not_select_other_pods():
    t = table([TEST_NETWORK_POLICY], PODS, target="frontend")
    assert t.ingress("10.0.0.3", TCP, 80).why is Why.UNISOLATED


# -- "Targeting a range of ports" ------------------------------------------------------------

MULTI_PORT_EGRESS = policy(
    "multi-port-egress",
    podSelector={"matchLabels": {"role": "db"}},
    policyTypes=["Egress"],
    egress=[
        {
            "to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
            "ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}],
        }
    ],
)


@pytest.mark.parametrize(
    "proto, port, ok",
    [(TCP, 32000, True), (TCP, 32768, True), (TCP, 32500, True), (TCP, 31999, False)]
    + [(TCP, 32769, False), (UDP, 32000, False), (SCTP, 32000, False), (ICMP, 0, False)],
)
def test_end_port_is_an_inclusive_range(proto, port, ok):
    assert table([MULTI_PORT_EGRESS], PODS).egress("10.0.0.2", proto, port).allowed is ok


def test_a_protocol_without_a_port_is_every_port_of_that_protocol():
    p = policy("dns", policyTypes=["Ingress"], ingress=[{"ports": [{"protocol": "UDP"}]}])
    t = table([p], PODS)
    assert t.ingress("10.0.0.3", UDP, 1).allowed and t.ingress("10.0.0.3", UDP, 65535).allowed
    assert not t.ingress("10.0.0.3", TCP, 53).allowed


def test_sctp_ports_match_sctp_only():
    p = policy("sctp", ingress=[{"ports": [{"protocol": "SCTP", "port": 9}]}])
    t = table([p], PODS)
    assert t.ingress("10.0.0.3", SCTP, 9).allowed
    assert not t.ingress("10.0.0.3", TCP, 9).allowed


def test_other_protocols_pass_only_a_rule_without_ports():
    with_ports = policy("web", ingress=[{"ports": [{"port": 80}]}])
    without = policy(
        "ping", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]
    )
    assert not table([with_ports], PODS).ingress("10.0.0.3", ICMP, 0).allowed
    t = table([with_ports, without], PODS)
    assert t.ingress("10.0.0.3", ICMP, 0).policy == "ping"
    assert not t.ingress("10.0.0.2", ICMP, 0).allowed


# -- "Behavior of to and from selectors": AND versus OR --------------------------------------

ALICE_AND = policy(
    "alice-and",
    ingress=[
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"user": "alice"}},
                    "podSelector": {"matchLabels": {"role": "client"}},
                }
            ]
        }
    ],
)
ALICE_OR = policy(
    "alice-or",
    ingress=[
        {
            "from": [
                {"namespaceSelector": {"matchLabels": {"user": "alice"}}},
                {"podSelector": {"matchLabels": {"role": "client"}}},
            ]
        }
    ],
)


def test_namespace_and_pod_selector_in_one_element_is_and():
    alice = [namespace(user="alice")]
    assert table([ALICE_AND], PODS, alice).ingress("10.0.0.3", TCP, 80).allowed
    assert not table([ALICE_AND], PODS, alice).ingress("10.0.0.2", TCP, 80).allowed
    assert not table([ALICE_AND], PODS).ingress("10.0.0.3", TCP, 80).allowed  # not alice's


def test_two_elements_are_or():
    assert all(
        table([ALICE_OR], PODS, [namespace(user="alice")]).ingress(p, TCP, 80).allowed
        for p in PEERS
    )
    t = table([ALICE_OR], PODS)
    assert t.ingress("10.0.0.3", TCP, 80).allowed
    assert not t.ingress("10.0.0.2", TCP, 80).allowed


def test_a_namespace_is_selected_by_its_name_label_even_when_the_object_lacks_it():
    p = policy(
        "by-name",
        ingress=[
            {"from": [{"namespaceSelector": {"matchLabels": {netpolobjects.NAME_LABEL: NS}}}]}
        ],
    )
    assert table([p], PODS, [{"metadata": {"name": NS}}]).ingress("10.0.0.3", TCP, 80).allowed


def test_without_the_namespace_object_no_namespace_selector_matches():
    everywhere = policy("everywhere", ingress=[{"from": [{"namespaceSelector": {}}]}])
    here = policy("here", ingress=[{"from": [{"podSelector": {}}]}])
    world = World.of(NS, [everywhere], PODS, [])
    assert not parse_netpol(render_netpol(world.reduce("db"))).ingress("10.0.0.3", TCP, 80).allowed
    world = World.of(NS, [here], PODS, [])
    assert parse_netpol(render_netpol(world.reduce("db"))).ingress("10.0.0.3", TCP, 80).allowed


def test_only_the_projects_pods_become_peers():
    other = pod("spy", "10.9.0.1", ns="elsewhere", role="client")
    everywhere = policy("everywhere", ingress=[{"from": [{"namespaceSelector": {}}]}])
    doc = World.of(NS, [everywhere], [*PODS, other], [namespace()]).reduce("db")
    assert "10.9.0.1" not in doc["ingress"]["rules"][0]["peers"]["ips"]
    assert sorted(doc["ingress"]["rules"][0]["peers"]["ips"]) == sorted(["10.0.0.1", *PEERS])


def test_finished_and_host_network_pods_are_no_peers():
    done = pod("done", "10.0.0.7", role="client")
    done["status"]["phase"] = "Succeeded"
    host = pod("host", "192.168.200.1", role="client")
    host["spec"]["hostNetwork"] = True
    t = table([ALICE_OR], [DB, done, host])
    assert (
        not t.ingress("10.0.0.7", TCP, 80).allowed
        and not t.ingress("192.168.200.1", TCP, 80).allowed
    )


@pytest.mark.parametrize(
    "expr, labels, selected",
    [
        ({"key": "tier", "operator": "In", "values": ["a", "b"]}, {"tier": "a"}, True),
        ({"key": "tier", "operator": "In", "values": ["a"]}, {}, False),
        ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {"tier": "b"}, True),
        ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {}, True),  # absent key matches
        ({"key": "tier", "operator": "NotIn", "values": ["a"]}, {"tier": "a"}, False),
        ({"key": "tier", "operator": "Exists"}, {"tier": ""}, True),
        ({"key": "tier", "operator": "Exists", "values": []}, {}, False),
        ({"key": "tier", "operator": "DoesNotExist"}, {}, True),
        ({"key": "tier", "operator": "DoesNotExist"}, {"tier": "a"}, False),
    ],
)
def test_match_expressions(expr, labels, selected):
    sel = netpolobjects.parse_selector({"matchExpressions": [expr], "matchLabels": {}})
    assert sel is not None and sel.matches(labels) is selected


def test_match_labels_and_expressions_are_anded_and_empty_selects_all():
    sel = netpolobjects.parse_selector(
        {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]}
    )
    assert sel.matches({"app": "web", "tier": "x"})
    assert not sel.matches({"app": "web"}) and not sel.matches({"tier": "x"})
    assert netpolobjects.parse_selector({}).matches({})


# -- named ports --------------------------------------------------------------------------------


def test_an_ingress_named_port_is_this_pods_container_port_of_that_name_and_protocol():
    p = policy("redis", ingress=[{"ports": [{"port": "redis"}]}])
    t = table([p], PODS)
    assert t.ingress("10.0.0.2", TCP, 6379).allowed
    assert not t.ingress("10.0.0.2", TCP, 6380).allowed
    assert not t.ingress("10.0.0.2", UDP, 6379).allowed  # the container port is TCP
    udp = table(
        [policy("redis-udp", ingress=[{"ports": [{"protocol": "UDP", "port": "redis"}]}])], PODS
    )
    assert (
        not udp.ingress("10.0.0.2", UDP, 6379).allowed
        and not udp.ingress("10.0.0.2", TCP, 6379).allowed
    )


def test_a_container_port_without_a_protocol_is_tcp():
    bare = pod("db", "10.0.0.1", role="db")
    bare["spec"]["containers"][0]["ports"] = [{"name": "redis", "containerPort": 6379}]
    t = table([policy("redis", ingress=[{"ports": [{"port": "redis"}]}])], [bare, FRONTEND])
    assert t.ingress("10.0.0.2", TCP, 6379).allowed and not t.ingress("10.0.0.2", UDP, 6379).allowed


def test_an_ingress_named_port_the_pod_lacks_allows_nothing_not_everything():
    p = policy("http", ingress=[{"ports": [{"port": "http"}]}])  # db has no "http"
    doc = World.of(NS, [p], PODS, [namespace()]).reduce("db")
    assert doc["ingress"]["rules"][0]["ports"] == []
    t = parse_netpol(render_netpol(doc))
    assert not any(
        t.ingress("10.0.0.2", proto, port).allowed for proto in (TCP, UDP) for port in (80, 8080)
    )


def test_an_egress_named_port_resolves_per_destination_pod():
    api1 = pod("api-1", "10.0.0.11", role="api", ports=[("http", 8080, "TCP")])
    api2 = pod(
        "api-2", "10.0.0.12", role="api", ports=[("http", 9090, "TCP"), ("http", 9090, "UDP")]
    )
    p = policy(
        "to-api",
        policyTypes=["Egress"],
        egress=[
            {"to": [{"podSelector": {"matchLabels": {"role": "api"}}}], "ports": [{"port": "http"}]}
        ],
    )
    t = table([p], [DB, api1, api2, FRONTEND])
    assert t.egress("10.0.0.11", TCP, 8080).allowed and not t.egress("10.0.0.11", TCP, 9090).allowed
    assert t.egress("10.0.0.12", TCP, 9090).allowed and not t.egress("10.0.0.12", UDP, 9090).allowed
    assert not t.egress("10.0.0.2", TCP, 8080).allowed  # frontend has an http port, not role=api


# -- several policies, directions, policyTypes -----------------------------------------------


def test_multiple_policies_are_a_union_and_the_decision_names_the_rule():
    web = policy(
        "web",
        ingress=[
            {
                "from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                "ports": [{"port": 80}],
            },
            {
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": 81}],
            },
        ],
    )
    tls = policy(
        "tls",
        ingress=[
            {
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": 443}],
            }
        ],
    )
    t = table([web, tls], PODS)
    assert (t.ingress("10.0.0.2", TCP, 80).policy, t.ingress("10.0.0.2", TCP, 80).rule) == (
        "web",
        0,
    )
    assert (t.ingress("10.0.0.3", TCP, 81).policy, t.ingress("10.0.0.3", TCP, 81).rule) == (
        "web",
        1,
    )
    assert (t.ingress("10.0.0.3", TCP, 443).policy, t.ingress("10.0.0.3", TCP, 443).rule) == (
        "tls",
        0,
    )
    denied = t.ingress("10.0.0.2", TCP, 443)
    assert not denied.allowed and denied.isolating == ("tls", "web")


def test_an_ingress_only_policy_does_not_touch_egress():
    t = table([policy("in", ingress=[{"ports": [{"port": 80}]}])], PODS)  # policyTypes defaulted
    assert not t.ingress("10.0.0.2", TCP, 81).allowed
    assert t.egress("10.0.0.2", TCP, 81).why is Why.UNISOLATED


def test_an_egress_only_policy_ignores_its_ingress_section():
    p = policy(
        "out",
        policyTypes=["Egress"],
        ingress=[{"ports": [{"port": 80}]}],
        egress=[{"ports": [{"port": 53, "protocol": "UDP"}]}],
    )
    t = table([p], PODS)
    assert t.ingress("10.0.0.2", TCP, 81).why is Why.UNISOLATED
    assert t.egress("10.0.0.2", UDP, 53).allowed and not t.egress("10.0.0.2", TCP, 80).allowed


@pytest.mark.parametrize(
    "spec, types",
    [
        ({}, {"Ingress"}),
        ({"policyTypes": []}, {"Ingress"}),
        ({"egress": []}, {"Ingress"}),  # len(egress) == 0: no Egress
        ({"egress": [{}]}, {"Ingress", "Egress"}),
        ({"ingress": [{}], "egress": [{"ports": [{"port": 53}]}]}, {"Ingress", "Egress"}),
        ({"policyTypes": ["Egress"], "ingress": [{}]}, {"Egress"}),
        ({"policyTypes": ["Ingress"], "egress": [{}]}, {"Ingress"}),
    ],
)
def test_policy_types_default_as_the_api_server_does(spec, types):
    assert netpolobjects.parse_policy(policy("p", **spec)).types == types
