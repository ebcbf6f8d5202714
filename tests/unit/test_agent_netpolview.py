"""agent/netpolview.py: what the agent keeps of every NetworkPolicy, Pod and Namespace (lists
replace, events change, ``version`` moves exactly when something a reduction reads changed,
``world`` is built once per version, malformed objects are counted), and agent/netpol.py's
``World.document_for`` (fail closed for a pod these objects cannot describe) and
``World.blocked_for`` (per pod, which policies would make the CNI drop the tunnel)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tencrypt.agent.netpol import Blocked, World
from tencrypt.agent.netpolobjects import NAME_LABEL, PodInfo
from tencrypt.agent.netpolview import PolicyView
from tencrypt.core.netpolicy import TCP, UDP, Why, from_doc
from tencrypt.core.stats import Counter, Stats
from tencrypt.kube.objects import EventType
from tests.unit.test_netpolicy import (
    ALLOW_EGRESS,
    CLIENT,
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
)

ADDED, MODIFIED, DELETED = EventType.ADDED, EventType.MODIFIED, EventType.DELETED
OTHER = "blog"  # another namespace of the cluster
BLOG_API = pod("api", "10.1.0.1", ns=OTHER, role="api")
EVERY_NAMESPACE = policy("from-every-namespace", ingress=[{"from": [{"namespaceSelector": {}}]}])
TUNNEL_IN = policy(
    "tunnel-in",
    policyTypes=["Ingress"],
    ingress=[{"from": [{"podSelector": {}}], "ports": [{"protocol": "UDP", "port": 1337}]}],
)


def view(pods=PODS, policies=(), namespaces=None, stats=None) -> PolicyView:
    v = PolicyView(stats or Stats())
    v.replace_namespaces([namespace(), namespace(OTHER)] if namespaces is None else namespaces)
    v.replace_pods(pods)
    v.replace_policies(policies)
    return v


def bad_objects(v: PolicyView) -> int:
    return v.stats.get(Counter.AGENT_BAD_OBJECT)


def changed(obj: dict[str, Any], edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    edit(out)
    return out


# -- lists --------------------------------------------------------------------------------------


def test_lists_are_kept_by_namespace_and_the_world_reads_what_world_of_reads():
    policies = [DENY_INGRESS, TEST_NETWORK_POLICY, policy("theirs", ns=OTHER)]
    v = view([*PODS, BLOG_API], policies)
    assert sorted(v.pods) == [OTHER, NS]
    assert sorted(v.pods[NS]) == ["batch", "client", "db", "frontend", "legacy"]
    assert list(v.pods[OTHER]) == ["api"]
    assert v.pods[NS]["db"] == PodInfo(
        "db", {"role": "db"}, frozenset({"10.0.0.1"}), {("TCP", "redis"): frozenset({6379})}
    )
    assert sorted(v.policies[NS]) == ["default-deny-ingress", "test-network-policy"]
    assert list(v.policies[OTHER]) == ["theirs"]
    assert v.labels == {NS: {NAME_LABEL: NS}, OTHER: {NAME_LABEL: OTHER}}
    world = v.world(NS)
    expected = World.of(NS, policies, [*PODS, BLOG_API], [namespace()])
    assert world.project == NS and world.labels == {NAME_LABEL: NS}
    assert sorted(world.pods) == sorted(expected.pods)
    assert [p.name for p in world.policies] == ["default-deny-ingress", "test-network-policy"]
    for name in expected.pods:
        assert world.reduce(name) == expected.reduce(name)
    assert world.tunnel_blocked() == expected.tunnel_blocked()
    assert world.stats is v.stats and bad_objects(v) == 0


def test_a_new_list_replaces_the_old_and_moves_only_the_namespaces_it_changed():
    v = view([*PODS, BLOG_API], [DENY_INGRESS])
    before = {ns: v.version(ns) for ns in (NS, OTHER)}
    v.replace_pods([*PODS, BLOG_API])  # the same list again
    v.replace_policies([DENY_INGRESS])
    v.replace_namespaces([namespace(), namespace(OTHER)])
    assert {ns: v.version(ns) for ns in (NS, OTHER)} == before
    v.replace_pods([DB, FRONTEND, BLOG_API])  # three of NS's pods are gone
    assert (v.version(NS), v.version(OTHER)) == (before[NS] + 1, before[OTHER])
    assert sorted(v.pods[NS]) == ["db", "frontend"]
    v.replace_policies([])
    assert (v.version(NS), v.version(OTHER)) == (before[NS] + 2, before[OTHER])
    assert v.policies == {}
    v.replace_namespaces([namespace(), namespace(OTHER, team="blue")])
    assert (v.version(NS), v.version(OTHER)) == (before[NS] + 2, before[OTHER] + 1)
    v.replace_namespaces([namespace()])  # OTHER is gone
    assert v.version(OTHER) == before[OTHER] + 2 and OTHER not in v.labels
    v.replace_pods([DB, FRONTEND])
    assert v.version(OTHER) == before[OTHER] + 3 and OTHER not in v.pods


def test_a_fresh_view_is_at_version_zero_and_knows_no_project():
    v = PolicyView()
    assert v.version(NS) == 0
    world = v.world(NS)
    assert (world.labels, world.pods, world.policies) == (None, {}, [])
    v.replace_pods([])
    v.replace_policies([])
    v.replace_namespaces([])
    assert v.versions == {}


def test_a_malformed_pod_in_a_list_is_counted_and_left_out():
    bad = changed(CLIENT, lambda o: o["metadata"].update(labels=["role", "client"]))
    v = view([DB, FRONTEND, bad])
    assert sorted(v.pods[NS]) == ["db", "frontend"] and bad_objects(v) == 1


def test_a_nameless_policy_in_a_list_is_counted_and_left_out_a_malformed_one_kept():
    nameless = changed(DENY_INGRESS, lambda o: o["metadata"].pop("name"))
    unreadable = policy("unreadable", ingress=[{"from": [{}]}])  # "must specify a peer"
    v = view(PODS, [nameless, unreadable])
    assert list(v.policies[NS]) == ["unreadable"]
    assert v.policies[NS]["unreadable"].malformed and bad_objects(v) == 2
    doc = v.world(NS).reduce("db")
    assert doc["ingress"] == {"isolated": True, "policies": ["unreadable"], "rules": []}
    assert doc["malformed"] == ["unreadable"]
    assert bad_objects(v) == 2  # counted when it arrived, not when a world reads it


# -- events and the version ---------------------------------------------------------------------

with_annotation = changed(DB, lambda o: o["metadata"].update(annotations={"note": "x"}))
relabelled = changed(DB, lambda o: o["metadata"]["labels"].update(tier="gold"))
readdressed = pod("db", "10.0.0.9", role="db", ports=[("redis", 6379, "TCP")])
renamed_port = pod("db", "10.0.0.1", role="db", ports=[("cache", 6379, "TCP")])
finished = changed(DB, lambda o: o["status"].update(phase="Succeeded"))
unreadable_db = changed(DB, lambda o: o["metadata"].update(labels="role=db"))
bad_port = changed(DB, lambda o: o["spec"]["containers"][0]["ports"][0].update(containerPort=0))
narrower = changed(
    DENY_INGRESS, lambda o: o["spec"].update(podSelector={"matchLabels": {"a": "b"}})
)
blue = namespace(team="blue")

EVENTS = {
    # name: (what happens, how much NS's version moves, malformed objects counted)
    "pod: the same again": (lambda v: v.on_pod(MODIFIED, DB), 0, 0),
    "pod: only an annotation": (lambda v: v.on_pod(MODIFIED, with_annotation), 0, 0),
    "pod: a label": (lambda v: v.on_pod(MODIFIED, relabelled), 1, 0),
    "pod: an address": (lambda v: v.on_pod(MODIFIED, readdressed), 1, 0),
    "pod: a named port": (lambda v: v.on_pod(MODIFIED, renamed_port), 1, 0),
    "pod: finished, no address": (lambda v: v.on_pod(MODIFIED, finished), 1, 0),
    "pod: a new one": (lambda v: v.on_pod(ADDED, pod("new", "10.0.0.8")), 1, 0),
    "pod: deleted": (lambda v: v.on_pod(DELETED, DB), 1, 0),
    "pod: an unknown one deleted": (lambda v: v.on_pod(DELETED, pod("ghost", "10.0.0.8")), 0, 0),
    "pod: another namespace's": (lambda v: v.on_pod(ADDED, BLOG_API), 0, 0),
    "pod: unreadable labels": (lambda v: v.on_pod(MODIFIED, unreadable_db), 0, 1),
    "pod: an unreadable port": (lambda v: v.on_pod(MODIFIED, bad_port), 0, 1),
    "pod: not an object": (lambda v: v.on_pod(MODIFIED, "db"), 0, 1),
    "policy: added": (lambda v: v.on_policy(ADDED, DENY_EGRESS), 1, 0),
    "policy: the same again": (lambda v: v.on_policy(MODIFIED, DENY_INGRESS), 0, 0),
    "policy: its spec": (lambda v: v.on_policy(MODIFIED, narrower), 1, 0),
    "policy: deleted": (lambda v: v.on_policy(DELETED, DENY_INGRESS), 1, 0),
    "policy: an unknown one deleted": (lambda v: v.on_policy(DELETED, DENY_EGRESS), 0, 0),
    "policy: another namespace's": (lambda v: v.on_policy(ADDED, policy("x", ns=OTHER)), 0, 0),
    "policy: malformed, kept": (lambda v: v.on_policy(ADDED, policy("bad", egress=5)), 1, 1),
    "policy: no name": (
        lambda v: v.on_policy(ADDED, changed(DENY_EGRESS, lambda o: o["metadata"].pop("name"))),
        0,
        1,
    ),
    "namespace: the same again": (lambda v: v.on_namespace(MODIFIED, namespace()), 0, 0),
    "namespace: a label": (lambda v: v.on_namespace(MODIFIED, blue), 1, 0),
    "namespace: another one's label": (
        lambda v: v.on_namespace(MODIFIED, namespace(OTHER, team="blue")),
        0,
        0,
    ),
    "namespace: deleted": (lambda v: v.on_namespace(DELETED, namespace()), 1, 0),
    "namespace: unreadable labels": (
        lambda v: v.on_namespace(MODIFIED, {"metadata": {"name": NS, "labels": 7}}),
        1,
        1,
    ),
    "namespace: no name": (lambda v: v.on_namespace(MODIFIED, {"metadata": {}}), 0, 1),
}


@pytest.mark.parametrize("event", EVENTS, ids=list(EVENTS))
def test_the_version_moves_exactly_when_something_kept_changes(event):
    apply, moved, counted = EVENTS[event]
    v = view(PODS, [DENY_INGRESS])
    before, other = v.version(NS), v.version(OTHER)
    apply(v)
    assert v.version(NS) == before + moved
    assert bad_objects(v) == counted
    if "another" not in event:
        assert v.version(OTHER) == other


def test_events_of_another_namespace_move_that_namespace_only():
    v = view(PODS, [DENY_INGRESS])
    before, other = v.version(NS), v.version(OTHER)
    v.on_pod(ADDED, BLOG_API)
    v.on_policy(ADDED, policy("x", ns=OTHER))
    v.on_namespace(MODIFIED, namespace(OTHER, team="blue"))
    assert (v.version(NS), v.version(OTHER)) == (before, other + 3)


def test_a_malformed_pod_update_keeps_what_was_known_and_its_deletion_still_counts():
    v = view(PODS, [DENY_INGRESS])
    known, version = v.pods[NS]["db"], v.version(NS)
    v.on_pod(MODIFIED, unreadable_db)
    assert v.pods[NS]["db"] is known and v.version(NS) == version and bad_objects(v) == 1
    assert v.world(NS).reduce("db")["ips"] == ["10.0.0.1"]
    v.on_pod(DELETED, unreadable_db)  # its namespace and name are enough to forget it
    assert "db" not in v.pods[NS] and v.version(NS) == version + 1 and bad_objects(v) == 2
    v.on_pod(DELETED, {"metadata": {"namespace": NS}, "spec": "?"})  # no name: nothing to drop
    assert sorted(v.pods[NS]) == ["batch", "client", "frontend", "legacy"]
    assert v.version(NS) == version + 1 and bad_objects(v) == 3


def test_the_last_pod_or_policy_of_a_namespace_leaves_no_empty_entry():
    v = view([DB], [DENY_INGRESS])
    v.on_pod(DELETED, DB)
    v.on_policy(DELETED, DENY_INGRESS)
    assert v.pods == {} and v.policies == {}


def test_a_policy_without_a_namespace_is_not_kept():
    v = view(PODS, [])
    before, bad = dict(v.versions), bad_objects(v)
    v.on_policy(ADDED, changed(DENY_INGRESS, lambda o: o["metadata"].pop("namespace")))
    assert v.policies == {} and v.versions == before
    assert bad_objects(v) == bad + 1


def test_a_nameless_namespace_in_a_list_is_counted_and_left_out():
    v = view(PODS, [], namespaces=[])
    nameless = changed(namespace(), lambda o: o["metadata"].pop("name"))
    v.replace_namespaces([nameless, namespace()])
    assert list(v.labels) == [namespace()["metadata"]["name"]]
    assert bad_objects(v) == 1


def test_a_malformed_policy_is_kept_isolating_and_allowing_nothing():
    v = view(PODS, [])
    v.on_policy(ADDED, policy("bad", ingress=[{"ports": [{"protocol": "ICMP"}]}]))
    assert v.policies[NS]["bad"].malformed and bad_objects(v) == 1
    doc = v.world(NS).reduce("frontend")
    assert doc["ingress"] == {"isolated": True, "policies": ["bad"], "rules": []}
    assert doc["malformed"] == ["bad"]


def test_namespace_labels_decide_namespace_selectors_and_unreadable_ones_match_nothing():
    v = view(PODS, [EVERY_NAMESPACE])
    peers = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "172.17.0.5", "172.17.1.5"]
    assert v.world(NS).reduce("db")["ingress"]["rules"][0]["peers"]["ips"] == peers
    v.on_namespace(MODIFIED, {"metadata": {"name": NS, "labels": "bad"}})
    assert v.labels[NS] is None and bad_objects(v) == 1
    assert v.world(NS).reduce("db")["ingress"]["rules"][0]["peers"]["ips"] == []
    v.on_namespace(MODIFIED, namespace())
    assert v.world(NS).reduce("db")["ingress"]["rules"][0]["peers"]["ips"] == peers
    v.on_namespace(DELETED, namespace())
    assert NS not in v.labels and v.world(NS).labels is None
    assert v.world(NS).reduce("db")["ingress"]["rules"][0]["peers"]["ips"] == []


def test_a_namespace_deleted_twice_or_never_known_moves_nothing():
    v = view(PODS, [], namespaces=[])
    v.on_namespace(DELETED, namespace())
    assert v.version(NS) == 1  # the pods list alone
    v.on_namespace(ADDED, namespace())
    v.on_namespace(DELETED, namespace())
    v.on_namespace(DELETED, namespace())
    assert v.version(NS) == 3


# -- the world, once per version ----------------------------------------------------------------


def test_the_world_is_built_once_per_version_and_keeps_what_it_was_built_from():
    v = view(PODS, [DENY_INGRESS])
    first = v.world(NS)
    assert v.world(NS) is first
    v.on_pod(MODIFIED, with_annotation)  # nothing kept changed: the same world
    assert v.world(NS) is first
    v.on_pod(DELETED, FRONTEND)
    second = v.world(NS)
    assert second is not first and v.world(NS) is second
    assert "frontend" in first.pods and "frontend" not in second.pods
    v.on_policy(ADDED, DENY_EGRESS)
    third = v.world(NS)
    assert [p.name for p in third.policies] == ["default-deny-egress", "default-deny-ingress"]
    assert [p.name for p in second.policies] == ["default-deny-ingress"]


def test_forget_drops_the_worlds_of_projects_not_kept_and_nothing_else():
    v = view([*PODS, BLOG_API], [DENY_INGRESS])
    mine, theirs = v.world(NS), v.world(OTHER)
    versions = dict(v.versions)
    v.forget([OTHER])
    assert v.world(OTHER) is theirs
    rebuilt = v.world(NS)
    assert rebuilt is not mine and rebuilt.reduce("db") == mine.reduce("db")
    assert v.versions == versions and sorted(v.pods) == [OTHER, NS]
    v.forget([])
    assert v.world(OTHER) is not theirs


# -- World.document_for: fail closed for a pod it cannot describe ------------------------------


def test_document_for_a_known_pod_is_its_reduction():
    world = World.of(NS, [TEST_NETWORK_POLICY, DENY_INGRESS], PODS, [namespace()])
    assert world.document_for("db") == world.reduce("db")
    assert world.document_for("frontend") == world.reduce("frontend")


def test_document_for_an_unknown_pod_without_policies_is_not_isolated():
    world = World.of(NS, [], PODS, [namespace()])
    open_way = {"isolated": False, "policies": [], "rules": []}
    assert world.document_for("newcomer") == {
        "format": "tencrypt-netpol/1",
        "project": NS,
        "pod": "newcomer",
        "generation": 0,
        "ips": [],
        "ingress": open_way,
        "egress": open_way,
        "named_ports": {},
        "malformed": [],
    }
    table = from_doc(world.document_for("newcomer"))
    assert table.ingress("10.0.0.2", TCP, 80).why is Why.UNISOLATED
    assert table.egress("10.0.0.2", TCP, 80).why is Why.UNISOLATED


def test_document_for_an_unknown_pod_is_isolated_both_ways_by_every_policy():
    # none of these would select a pod with the newcomer's labels either way, or one way only
    world = World.of(NS, [TEST_NETWORK_POLICY, DENY_INGRESS, ALLOW_EGRESS], PODS, [namespace()])
    names = ["allow-all-egress", "default-deny-ingress", "test-network-policy"]
    closed = {"isolated": True, "policies": names, "rules": []}
    doc = world.document_for("newcomer")
    assert doc == {
        "format": "tencrypt-netpol/1",
        "project": NS,
        "pod": "newcomer",
        "generation": 0,
        "ips": [],
        "ingress": closed,
        "egress": closed,
        "named_ports": {},
        "malformed": [],
    }
    table = from_doc(doc)
    for peer in ("10.0.0.1", "10.0.0.2", "192.0.2.1"):
        for proto, port in ((TCP, 80), (UDP, 1337)):
            assert table.ingress(peer, proto, port).isolating == tuple(names)
            assert table.egress(peer, proto, port).isolating == tuple(names)
            assert not table.ingress(peer, proto, port).allowed
            assert not table.egress(peer, proto, port).allowed


def test_document_for_a_malformed_pod_fails_closed_too():
    bad = changed(DB, lambda o: o["metadata"].update(labels={"role": 1}))
    stats = Stats()
    world = World.of(NS, [ALLOW_EGRESS], [bad, FRONTEND], [namespace()], stats)
    assert stats.get(Counter.AGENT_BAD_OBJECT) == 1
    doc = world.document_for("db")
    assert (
        doc["ingress"]
        == doc["egress"]
        == {
            "isolated": True,
            "policies": ["allow-all-egress"],
            "rules": [],
        }
    )
    assert doc["ips"] == [] and doc["pod"] == "db"


# -- World.blocked_for: the tunnel under the CNI -------------------------------------------------


def blocked_for(policies, name="db", pods=PODS, **kw):
    return World.of(NS, policies, pods, [namespace()]).blocked_for(name, **kw)


def test_nothing_is_blocked_for_an_unknown_pod_one_without_addresses_or_one_not_isolated():
    pending = pod("pending", None)
    assert blocked_for([DENY_ALL], "ghost") == []
    assert blocked_for([DENY_ALL], "pending", [*PODS, pending]) == []
    assert blocked_for([]) == []
    assert blocked_for([TEST_NETWORK_POLICY], "frontend") == []  # it selects db only


def test_a_default_deny_blocks_the_direction_it_isolates_counting_every_peer_address():
    assert blocked_for([DENY_INGRESS]) == [Blocked("db", "default-deny-ingress", "ingress", 4)]
    assert blocked_for([DENY_EGRESS]) == [Blocked("db", "default-deny-egress", "egress", 4)]
    assert blocked_for([DENY_ALL]) == [
        Blocked("db", "default-deny-all", "ingress", 4),
        Blocked("db", "default-deny-all", "egress", 4),
    ]
    dual = pod("dual", "10.0.0.8", ips=["10.0.0.8", "fd00::8"])
    assert blocked_for([DENY_INGRESS], pods=[*PODS, dual]) == [
        Blocked("db", "default-deny-ingress", "ingress", 6)
    ]


def test_every_policy_isolating_a_blocked_direction_is_named():
    assert blocked_for([TEST_NETWORK_POLICY, DENY_INGRESS]) == [
        Blocked("db", "default-deny-ingress", "ingress", 4),
        Blocked("db", "test-network-policy", "ingress", 4),
        Blocked("db", "test-network-policy", "egress", 4),
    ]


def test_the_port_and_protocol_asked_about_decide():
    assert blocked_for([TUNNEL_IN]) == []
    assert blocked_for([TUNNEL_IN], port=53) == [Blocked("db", "tunnel-in", "ingress", 4)]
    assert blocked_for([TUNNEL_IN], protocol="TCP") == [Blocked("db", "tunnel-in", "ingress", 4)]
    assert blocked_for([TUNNEL_IN], port=1337, protocol="UDP") == []


def test_a_partial_allow_counts_the_peers_it_cuts_off():
    from_frontend = policy(
        "from-frontend",
        policyTypes=["Ingress"],
        ingress=[
            {
                "from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                "ports": [{"protocol": "UDP", "port": 1337}],
            }
        ],
    )
    assert blocked_for([from_frontend]) == [Blocked("db", "from-frontend", "ingress", 3)]


def test_blocked_for_uses_the_document_it_is_given():
    world = World.of(NS, [DENY_ALL], PODS, [namespace()])
    unisolated = World.of(NS, [], PODS, [namespace()]).reduce("db")
    assert world.blocked_for("db", doc=unisolated) == []
    ingress_only = World.of(NS, [DENY_INGRESS], PODS, [namespace()]).reduce("db")
    assert world.blocked_for("db", doc=ingress_only) == [
        Blocked("db", "default-deny-ingress", "ingress", 4)
    ]
    assert world.blocked_for("db", doc=world.reduce("db")) == world.blocked_for("db")


def test_tunnel_blocked_is_blocked_for_of_every_pod_by_name():
    world = World.of(NS, [DENY_INGRESS, TEST_NETWORK_POLICY], PODS, [namespace()])
    every = [b for name in sorted(world.pods) for b in world.blocked_for(name)]
    assert world.tunnel_blocked() == every and len(every) == 7  # 5 pods, db twice more
