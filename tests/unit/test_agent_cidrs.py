"""agent/cidrs.py: the cluster's Service CIDRs, pod network and this node's zone, discovered
from the objects that name them, most trusted first, never guessed."""

from __future__ import annotations

from tencrypt.agent.cidrs import ZONE_LABEL, ClusterRanges, discover


def node(name, *cidrs, zone=None):
    labels = {ZONE_LABEL: zone} if zone else {}
    return {"metadata": {"name": name, "labels": labels}, "spec": {"podCIDRs": list(cidrs)}}


OPENSHIFT = {
    "spec": {"serviceNetwork": ["172.30.0.0/16"], "clusterNetwork": [{"cidr": "10.128.0.0/14"}]},
    "status": {
        "serviceNetwork": ["172.30.0.0/16"],
        "clusterNetwork": [{"cidr": "10.128.0.0/14", "hostPrefix": 23}],
    },
}


def test_nothing_known_is_empty_never_a_guess():
    assert discover("n1") == ClusterRanges()
    assert "unknown" in discover("n1").describe()


def test_openshift_names_both_and_beats_the_nodes_for_the_pod_network():
    got = discover("n1", openshift_network=OPENSHIFT, nodes=[node("n1", "10.128.0.0/23")])
    assert got.service_cidrs == ("172.30.0.0/16",) and got.pod_cidrs == ("10.128.0.0/14",)
    assert dict(got.sources) == {
        "services": "OpenShift Network config",
        "pods": "OpenShift Network config",
    }


def test_service_cidr_objects_beat_openshift_and_deleted_ones_do_not_count():
    objs = [
        {"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/12", "fd00::/108"]}},
        {"metadata": {"name": "old", "deletionTimestamp": "x"}, "spec": {"cidrs": ["10.0.0.0/24"]}},
    ]
    got = discover("n1", service_cidr_objects=objs, openshift_network=OPENSHIFT)
    assert got.service_cidrs == ("10.96.0.0/12", "fd00::/108")


def test_the_nodes_pod_cidrs_and_this_nodes_zone():
    nodes = [node("n1", "10.244.0.0/24", "fd00:10:244::/64", zone="a"), node("n2", "10.244.1.0/24")]
    got = discover("n1", nodes=nodes)
    assert got.pod_cidrs == ("10.244.0.0/24", "fd00:10:244::/64", "10.244.1.0/24")
    assert got.zone == "a" and got.service_cidrs == ()
    assert discover("n2", nodes=nodes).zone is None


def test_flags_win_and_malformed_entries_are_skipped_and_counted():
    got = discover(
        "n1",
        ["10.96.0.0/12"],
        ["10.244.0.0/16"],
        service_cidr_objects=[{"spec": {"cidrs": ["banana", "10.100.0.0/16"]}}],
        nodes=[node("n1", "10.1.0.0/24"), "not a node"],
    )
    assert got.service_cidrs == ("10.96.0.0/12",) and got.pod_cidrs == ("10.244.0.0/16",)
    assert got.skipped == 1 and dict(got.sources)["services"] == "--service-cidr"
    assert discover("n1", ["nope"]).skipped == 1
