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
    assert policy.pod_cidrs == ("10.128.0.0/14",)  # IPv4 claims only
    assert policy.check(OTHER_NODE, OTHER_NODE) is None  # another node's pod subnet


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
