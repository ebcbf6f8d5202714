"""core/clustershape.py: the ranges a proxy guards and checks claims against, once the agent's
membership names the cluster's; and the loud report when setup routed another Service CIDR."""

from __future__ import annotations

from tencrypt.core.clustershape import claim_policy, cluster_ranges
from tencrypt.core.membership import Members
from tencrypt.core.stats import DropReason
from tests.unit.fakes import pod_config

A, OTHER_NODE = "10.128.0.11", "10.131.4.7"


def members(service_cidrs=(), pod_cidrs=(), services=frozenset({"172.30.5.9"})) -> Members:
    return Members("shop", 1, frozenset({A}), services, (), service_cidrs, pod_cidrs)


def test_the_agents_pod_network_replaces_setups_and_no_mismatch_when_they_agree():
    config = pod_config(A)
    ranges = cluster_ranges(config, members(("172.30.0.0/16",), ("10.128.0.0/14", "fd00::/48")))
    assert ranges.pods == ("10.128.0.0/14", "fd00::/48")
    assert ranges.services == ("172.30.0.0/16",) and ranges.mismatch is None
    policy = claim_policy(config, lambda ip: True, ranges.pods, ranges.services)
    assert policy.pod_cidrs == ("10.128.0.0/14", "fd00::/48")  # claims of both families
    assert policy.check(OTHER_NODE, OTHER_NODE) is None  # another node's pod subnet
    assert policy.check("fd00::7", "fd00::7") is None
    assert policy.check("fd01::7", "fd01::7") is DropReason.CLAIM_OUTSIDE_POD_NETWORK


def test_a_dual_stack_pods_other_claim_needs_the_memberships_pairing():
    config = pod_config(A)
    doc = Members(
        "shop",
        1,
        frozenset({A, "fd00::11", OTHER_NODE, "fd00::47"}),
        frozenset(),
        (),
        (),
        ("10.128.0.0/14", "fd00::/48"),
        pod_ips=((A, "fd00::11"), (OTHER_NODE, "fd00::47")),
    )
    policy = claim_policy(config, lambda ip: True, doc.pod_cidrs, paired=doc.paired)
    assert policy.check_paired("fd00::47", OTHER_NODE) is None
    assert policy.check_paired("fd00::11", OTHER_NODE) is DropReason.CLAIM_NOT_SOURCE
    assert doc.partner("fd00::47") == OTHER_NODE and doc.partner(OTHER_NODE) == "fd00::47"
    assert doc.partner("fd00::99") is None
    unpaired = claim_policy(config, lambda ip: True, doc.pod_cidrs)  # no pairing known
    assert unpaired.check_paired("fd00::47", OTHER_NODE) is DropReason.CLAIM_NOT_SOURCE


def test_a_dual_stack_pods_unrouted_ipv6_service_cidr_is_a_mismatch_only_there():
    dual = pod_config(A)
    from dataclasses import replace

    dual = replace(dual, pod_ip6="fd00::11", service_cidr6="fd00:30::/108")
    doc = members(("172.30.0.0/16", "fd00:30::/108"))
    assert cluster_ranges(dual, doc).mismatch is None
    assert cluster_ranges(pod_config(A), doc).mismatch is None  # IPv4-only pod: not routed
    other = members(("172.30.0.0/16", "fd00:99::/108"))
    assert "fd00:99::/108" in (cluster_ranges(dual, other).mismatch or "")


def test_without_a_known_pod_network_claims_are_not_refused_on_a_guess():
    config = pod_config(A)
    policy = claim_policy(config, lambda ip: None, ())
    assert policy.check(OTHER_NODE, OTHER_NODE) is None
    assert policy.check("172.30.1.1", "172.30.1.1") is DropReason.CLAIM_SERVICE_IP


def test_a_service_cidr_setup_did_not_route_is_a_loud_mismatch():
    config = pod_config(A)  # setup routed 172.30.0.0/16
    ranges = cluster_ranges(config, members(("10.96.0.0/12",), services=frozenset({"10.96.0.10"})))
    assert ranges.services == ("172.30.0.0/16", "10.96.0.0/12")
    assert ranges.mismatch is not None and "10.96.0.0/12" in ranges.mismatch
    assert "172.30.0.0/16" in ranges.mismatch and "--service-cidr" in ranges.mismatch
    policy = claim_policy(config, lambda ip: True, ranges.pods, ranges.services)
    assert policy.check("10.96.0.10", "10.96.0.10") is DropReason.CLAIM_SERVICE_IP


def test_service_ips_outside_every_known_range_are_a_mismatch_too():
    ranges = cluster_ranges(pod_config(A), members(services=frozenset({"10.96.0.10"})))
    assert ranges.mismatch is not None and "10.96.0.10" in ranges.mismatch
    assert cluster_ranges(pod_config(A), members()).mismatch is None


def test_vip_sessions_only_on_the_standalone_path():
    config = pod_config(A)
    assert claim_policy(config, lambda ip: None, ()).via_vip("172.30.5.9")
    assert not claim_policy(config, lambda ip: None, (), vip_sessions=False).via_vip("172.30.5.9")
