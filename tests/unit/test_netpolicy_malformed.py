"""Malformed input never widens access (issue #23): policies the agent cannot read in full
isolate and allow nothing; Pods and Namespaces it cannot read select no peer; a
``tencrypt-netpol/1`` document the proxy cannot read is refused with a clear message."""

from __future__ import annotations

import copy
import json

import pytest

from tencrypt.agent.netpol import NetpolInputError, World
from tencrypt.core.netpolicy import (
    TCP,
    UDP,
    NetpolError,
    Why,
    from_doc,
    ip_key,
    parse_netpol,
    render_netpol,
)
from tencrypt.core.stats import Counter, Stats
from tests.unit.test_netpolicy import DB, NS, PEERS, PODS, namespace, pod, policy

PROBES = [(proto, port) for proto in (TCP, UDP, 132, 1) for port in (0, 53, 80, 6379, 8080)]
ING, EGR = frozenset({"ingress"}), frozenset({"egress"})
BOTH = ING | EGR


def world(policies, pods=PODS, namespaces=None, stats=None):
    return World.of(NS, policies, pods, namespaces or [namespace()], stats)


def one(where: str, rule: dict, types=None):
    """A policy selecting every pod with one bad ``where`` rule (policyTypes as given)."""
    spec = {where: [rule]}
    if types is not None:
        spec["policyTypes"] = types
    return policy("bad", **spec)


MALFORMED = {
    "protocol ICMP": (one("ingress", {"ports": [{"protocol": "ICMP"}]}), ING),
    "protocol lower case": (one("ingress", {"ports": [{"protocol": "tcp", "port": 80}]}), ING),
    "endPort on a named port": (one("ingress", {"ports": [{"port": "http", "endPort": 90}]}), ING),
    "endPort below port": (one("ingress", {"ports": [{"port": 90, "endPort": 80}]}), ING),
    "endPort without port": (one("ingress", {"ports": [{"endPort": 80}]}), ING),
    "port 0": (one("ingress", {"ports": [{"port": 0}]}), ING),
    "port 65536": (one("ingress", {"ports": [{"port": 65536}]}), ING),
    "port true": (one("ingress", {"ports": [{"port": True}]}), ING),
    "port empty name": (one("ingress", {"ports": [{"port": ""}]}), ING),
    "ipBlock and podSelector": (
        one("ingress", {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}),
        ING,
    ),
    "empty peer": (one("ingress", {"from": [{}]}), ING),
    "peer null": (one("ingress", {"from": [None]}), ING),
    "bad cidr": (one("ingress", {"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}), ING),
    "cidr a number": (one("ingress", {"from": [{"ipBlock": {"cidr": 167772160}}]}), ING),
    "cidr without a prefix length": (
        one("ingress", {"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}),
        ING,
    ),
    "cidr with a netmask": (
        one("ingress", {"from": [{"ipBlock": {"cidr": "10.0.0.0/255.0.0.0"}}]}),
        ING,
    ),
    "no cidr": (one("ingress", {"from": [{"ipBlock": {"except": ["10.0.0.0/24"]}}]}), ING),
    "bad except": (
        one("ingress", {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["x"]}}]}),
        ING,
    ),
    "operator Gt": (
        one(
            "ingress",
            {
                "from": [
                    {
                        "podSelector": {
                            "matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]
                        }
                    }
                ]
            },
        ),
        ING,
    ),
    "In without values": (
        one(
            "ingress",
            {"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]},
        ),
        ING,
    ),
    "NotIn without values": (
        one(
            "ingress",
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]
                        }
                    }
                ]
            },
        ),
        ING,
    ),
    "Exists with values": (
        one(
            "ingress",
            {
                "from": [
                    {
                        "podSelector": {
                            "matchExpressions": [
                                {"key": "a", "operator": "Exists", "values": ["x"]}
                            ]
                        }
                    }
                ]
            },
        ),
        ING,
    ),
    "matchLabels value not a string": (
        one("ingress", {"from": [{"podSelector": {"matchLabels": {"a": 1}}}]}),
        ING,
    ),
    "matchExpressions not a list": (
        one("ingress", {"from": [{"podSelector": {"matchExpressions": {"key": "a"}}}]}),
        ING,
    ),
    "unknown key in an expression": (
        one(
            "ingress",
            {
                "from": [
                    {
                        "podSelector": {
                            "matchExpressions": [{"key": "a", "operator": "Exists", "value": "x"}]
                        }
                    }
                ]
            },
        ),
        ING,
    ),
    "unknown key in an ipBlock": (
        one(
            "ingress", {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "exceptions": ["10.0.0.0/9"]}}]}
        ),
        ING,
    ),
    "unknown key in a rule": (one("ingress", {"fromm": [{"podSelector": {}}]}), ING),
    "unknown key in a peer": (
        one("ingress", {"from": [{"podSelector": {}, "nodeSelector": {}}]}),
        ING,
    ),
    "unknown key in a port": (one("ingress", {"ports": [{"port": 80, "portt": 81}]}), ING),
    "unknown key in a selector": (
        one("ingress", {"from": [{"podSelector": {"matchLabel": {}}}]}),
        ING,
    ),
    "ports not a list": (one("ingress", {"ports": {"port": 80}}), ING),
    "bad egress rule, Egress only": (
        one("egress", {"ports": [{"protocol": "ICMP"}]}, ["Egress"]),
        EGR,
    ),
    "bad egress rule, defaulted": (one("egress", {"to": [{}]}), BOTH),
    "bad ingress rule of an Egress-only policy": (
        one("ingress", {"ports": [{"protocol": "ICMP"}]}, ["Egress"]),
        EGR,
    ),
    "policyTypes Bogus": (policy("bad", policyTypes=["Ingress", "Bogus"], ingress=[{}]), BOTH),
    "policyTypes a string": (policy("bad", policyTypes="Ingress", ingress=[{}]), BOTH),
    "egress not a list, defaulted": (policy("bad", egress={"to": []}, ingress=[{}]), BOTH),
    "ingress not a list": (policy("bad", ingress={"from": []}, policyTypes=["Ingress"]), ING),
    "unknown key in the spec": (policy("bad", ingres=[{}], policyTypes=["Ingress"]), ING),
    "spec missing": ({"metadata": {"name": "bad", "namespace": NS}}, BOTH),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_policy_isolates_and_allows_nothing(case):
    obj, isolated = MALFORMED[case]
    stats = Stats()
    w = world([obj], stats=stats)
    doc = w.reduce("db")
    assert doc["malformed"] == ["bad"] and stats.get(Counter.AGENT_BAD_OBJECT) == 1
    t = parse_netpol(render_netpol(doc))
    for direction, decide in (("ingress", t.ingress), ("egress", t.egress)):
        for peer in PEERS:
            for proto, port in PROBES:
                d = decide(peer, proto, port)
                if direction in isolated:
                    assert d.why is Why.DENIED and d.isolating == ("bad",), (direction, peer)
                else:
                    assert d.why is Why.UNISOLATED, (direction, peer)


def test_a_malformed_policy_takes_nothing_from_valid_ones():
    allow = policy("allow", ingress=[{"ports": [{"port": 80}]}])
    obj, _ = MALFORMED["protocol ICMP"]
    t = parse_netpol(render_netpol(world([obj, allow]).reduce("db")))
    assert t.ingress("10.0.0.2", TCP, 80).policy == "allow"
    assert not t.ingress("10.0.0.2", TCP, 81).allowed


def test_an_unreadable_pod_selector_selects_every_pod():
    only_web = {
        "matchLabels": {"role": "web"},
        "matchExpressions": [{"key": "x", "operator": "Gt"}],
    }
    t = parse_netpol(render_netpol(world([policy("bad", podSelector=only_web)]).reduce("db")))
    assert t.ingress("10.0.0.2", TCP, 80).isolating == ("bad",)


def test_policies_without_a_name_or_an_object_at_all_are_malformed_by_position():
    nameless = policy("x")
    del nameless["metadata"]["name"]
    stats = Stats()
    doc = world([nameless, None], stats=stats).reduce("db")
    assert doc["malformed"] == ["#0", "#1"] and stats.get(Counter.AGENT_BAD_OBJECT) == 2
    assert doc["ingress"]["policies"] == ["#0", "#1"]  # #0's policyTypes read: Ingress
    assert doc["egress"]["policies"] == ["#1"]  # nothing of #1 reads: both directions


def test_policies_of_other_namespaces_are_not_the_projects():
    stats = Stats()
    doc = world([policy("theirs", ns="elsewhere"), None], stats=stats).reduce("db")
    assert doc["ingress"]["policies"] == ["#1"] and stats.get(Counter.AGENT_BAD_OBJECT) == 1


def test_a_malformed_pod_is_no_peer_and_cannot_be_reduced():
    bad = pod("weird", "10.0.0.9", role="client")
    bad["metadata"]["labels"] = ["role=client"]
    bad_ports = pod("ports", "10.0.0.8", role="client")
    bad_ports["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    bad_ip = pod("garbled", "10.0.0.7", role="client")
    bad_ip["status"]["podIPs"] = [{"ip": "10.0.0.300"}]
    bad_value = pod("number", "10.0.0.6", role="client")
    bad_value["metadata"]["labels"]["replicas"] = 3
    bad_container = pod("container", "10.0.0.5", role="client")
    bad_container["spec"]["containers"][0]["ports"] = ["http"]
    unnamed = pod("unnamed", "10.0.0.4", role="client")
    unnamed["spec"]["containers"][0]["ports"] = [{"containerPort": 80}]  # fine: no name
    clients = policy(
        "clients", ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]
    )
    stats = Stats()
    pods = [DB, bad, bad_ports, bad_ip, bad_value, bad_container, unnamed]
    w = world([clients], pods, stats=stats)
    assert stats.get(Counter.AGENT_BAD_OBJECT) == 5
    assert w.reduce("db")["ingress"]["rules"][0]["peers"] == {"ips": ["10.0.0.4"], "blocks": []}
    for name in ("weird", "ports", "garbled", "number", "container", "absent"):
        with pytest.raises(NetpolInputError):
            w.reduce(name)


def test_a_malformed_namespace_matches_no_namespace_selector():
    everywhere = policy("everywhere", ingress=[{"from": [{"namespaceSelector": {}}]}])
    stats = Stats()
    w = world([everywhere], namespaces=[{"metadata": {"name": NS, "labels": "x"}}], stats=stats)
    assert stats.get(Counter.AGENT_BAD_OBJECT) == 1
    assert w.reduce("db")["ingress"]["rules"][0]["peers"]["ips"] == []


# -- the document: refused, never guessed -------------------------------------------------------

GOOD = {
    "format": "tencrypt-netpol/1",
    "project": "shop",
    "pod": "db-0",
    "generation": 7,
    "ips": ["10.128.2.7"],
    "ingress": {
        "isolated": True,
        "policies": ["p"],
        "rules": [
            {
                "policy": "p",
                "rule": 0,
                "peers": {
                    "ips": ["10.128.2.9"],
                    "blocks": [{"cidr": "172.17.0.0/16", "except": []}],
                },
                "ports": [{"protocol": "TCP", "port": 80, "end": 81}],
            }
        ],
    },
    "egress": {
        "isolated": True,
        "policies": ["p"],
        "rules": [
            {
                "policy": "p",
                "rule": 1,
                "peers": "any",
                "ports": [{"protocol": "UDP", "name": "dns"}],
            }
        ],
    },
    "named_ports": {"10.128.2.9": {"UDP/dns": [53]}},
    "malformed": [],
}


def mutate(path, value):
    doc = copy.deepcopy(GOOD)
    *parents, last = path
    target = doc
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return doc


IN_RULE = ("ingress", "rules", 0)
REFUSED = [
    (("format",), "tencrypt-members/1", "format"),
    (("project",), "", "project"),
    (("pod",), None, "pod"),
    (("generation",), -1, "generation"),
    (("generation",), True, "generation"),
    (("ips",), KeyError, "'ips' is missing"),
    (("ips",), ["10.128.2.300"], "not an IP address"),
    (("ingress",), KeyError, "'ingress' is missing"),
    (("egress",), [], "must be an object"),
    (("ingress", "isolated"), "yes", "isolated"),
    (("ingress", "policies"), [], "isolated exactly when"),
    (("egress", "isolated"), False, "isolated exactly when"),
    ((*IN_RULE, "policy"), "q", "not one of the isolating policies"),
    ((*IN_RULE, "rule"), -1, "'rule'"),
    ((*IN_RULE, "peers"), KeyError, "'peers' is missing"),
    ((*IN_RULE, "peers"), "all", "'peers' must be"),
    ((*IN_RULE, "peers", "ips"), ["pod-a"], "not an IP address"),
    ((*IN_RULE, "peers", "blocks"), [{"cidr": "172.17.0.0/33"}], "not a CIDR"),
    ((*IN_RULE, "peers", "blocks"), [{"cidr": "172.17.0.0/16"}], "must be a list"),
    ((*IN_RULE, "ports"), KeyError, "'ports' is missing"),
    ((*IN_RULE, "ports"), [{"protocol": "ICMP", "port": 1, "end": 1}], "protocol"),
    ((*IN_RULE, "ports"), [{"protocol": "TCP", "port": 81, "end": 80}], "port range"),
    ((*IN_RULE, "ports"), [{"protocol": "TCP", "port": 0, "end": 0}], "port range"),
    ((*IN_RULE, "ports"), [{"protocol": "TCP", "port": 80}], "port range"),
    ((*IN_RULE, "ports"), [{"protocol": "TCP", "name": "http"}], "resolved by the writer"),
    (("named_ports",), {"10.128.2.9": {"dns": [53]}}, "PROTOCOL/name"),
    (("named_ports",), {"10.128.2.9": {"UDP/dns": [0]}}, "not port numbers"),
    (("named_ports",), {"pod-b": {"UDP/dns": [53]}}, "not an IP address"),
    (("named_ports",), [], "named_ports"),
    (("malformed",), [""], "malformed"),
    (("ips",), [10], "not an IP address"),
    (("egress", "rules", 0), "p", "must be an object"),
    ((*IN_RULE, "peers", "blocks"), ["172.17.0.0/16"], "a block must be an object"),
    ((*IN_RULE, "peers", "blocks"), [{"cidr": 17, "except": []}], "not a CIDR"),
    ((*IN_RULE, "peers", "blocks"), [{"cidr": "172.17.0.1", "except": []}], "not a CIDR"),
    ((*IN_RULE, "peers", "blocks"), [{"cidr": "172.17.0.0/255.255.0.0", "except": []}], "CIDR"),
    (("named_ports",), {"10.128.2.9": [53]}, "must be an object"),
]


def test_rules_in_a_direction_no_policy_isolates_are_refused():
    doc = mutate(("egress",), {"isolated": False, "policies": [], "rules": GOOD["egress"]["rules"]})
    with pytest.raises(NetpolError, match="rules in a direction no policy isolates"):
        from_doc(doc)


def test_a_list_beyond_the_bound_is_refused(monkeypatch):
    monkeypatch.setattr("tencrypt.core.netpolicy.MAX_ITEMS", 2)
    with pytest.raises(NetpolError, match="more than 2"):
        from_doc(mutate(("ips",), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]))


@pytest.mark.parametrize("path, value, message", REFUSED)
def test_a_document_that_does_not_parse_is_refused_with_a_clear_message(path, value, message):
    with pytest.raises(NetpolError, match=message):
        parse_netpol(json.dumps(mutate(path, value)))


def test_not_json_or_not_an_object_is_refused():
    for text in ("{", b"\xff", "[]", "null"):
        with pytest.raises(NetpolError):
            parse_netpol(text)


def test_the_good_document_and_its_optional_keys():
    t = parse_netpol(json.dumps(GOOD).encode())
    assert t.ingress("10.128.2.9", TCP, 81).allowed and t.ingress("172.17.3.3", TCP, 80).allowed
    assert not t.ingress("10.128.2.10", TCP, 80).allowed
    assert t.egress("10.128.2.9", UDP, 53).allowed and not t.egress("10.128.2.8", UDP, 53).allowed
    bare = mutate(("named_ports",), KeyError)
    del bare["malformed"]
    bare["future"] = {"ignored": True}
    assert not from_doc(bare).egress("10.128.2.9", UDP, 53).allowed  # absent: denies more


def test_empty_lists_match_nothing_where_any_matches_everything():
    nothing = mutate((*IN_RULE, "peers"), {"ips": [], "blocks": []})
    assert not from_doc(nothing).ingress("10.128.2.9", TCP, 80).allowed
    no_port = mutate((*IN_RULE, "ports"), [])
    assert not from_doc(no_port).ingress("10.128.2.9", TCP, 80).allowed
    anything = mutate((*IN_RULE, "ports"), "any")
    assert from_doc(anything).ingress("10.128.2.9", 1, 0).allowed


def test_a_lookup_returns_decisions_built_with_the_table():
    t = from_doc(GOOD)
    assert t.ingress("10.128.2.9", TCP, 80) is t.ingress(0x0A800209, TCP, 81)
    assert t.ingress("10.0.0.1", TCP, 80) is t.ingress("10.0.0.2", UDP, 53)


def test_ip_keys():
    assert ip_key("10.0.0.1") == ip_key(0x0A000001) == 0x0A000001
    assert ip_key("::a00:1") != ip_key("10.0.0.1")
    for bad in (-1, 1 << 32, "10.0.0.256", "pod"):
        with pytest.raises(ValueError):
            ip_key(bad)
