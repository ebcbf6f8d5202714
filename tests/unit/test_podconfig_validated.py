"""``validated``: every input setup would apply, refused before anything is touched."""

from dataclasses import replace

import pytest

from tencrypt.core.podconfig import MIN_MTU, OVERHEAD, PodConfig, validated
from tencrypt.errors import UsageError

POD = PodConfig(
    pod_ip="10.128.0.5",
    dev="eth0",
    gateway="10.128.0.1",
    dns="172.30.0.10",
    domain="shop.svc.cluster.local",
    search=("shop.svc.cluster.local",),
    cluster_domain="cluster.local",
    service_cidr="172.30.0.0/16",
    pod_cidrs=("10.128.0.0/14",),
    uplink_cidrs=("10.128.0.0/23",),
    mtu=1440,
)


def refusal(uplink_mtu=1500, mtu_given=True, **changes):
    with pytest.raises(UsageError) as info:
        validated(replace(POD, **changes), uplink_mtu, mtu_given=mtu_given)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_sound_config_is_accepted_and_its_pod_network_normalised():
    assert validated(POD, 1500) == POD
    loose = replace(POD, pod_cidrs=("10.128.0.1/14", "fd00::1/48"))
    assert validated(loose, 1500).pod_cidrs == ("10.128.0.0/14", "fd00::/48")


def test_the_dns_server_inside_the_service_cidr_is_kubernetes_normal():
    """CoreDNS is a Service: its VIP lies in the Service CIDR, and setup routes its /32 by the
    uplink. A DNS server on the pod's subnet, at the gateway or in the pod network too."""
    for dns in ("172.30.0.10", "172.30.255.255", "10.128.0.9", "10.128.0.1", "10.130.0.3"):
        assert validated(replace(POD, dns=dns), 1500).dns == dns


def test_the_service_cidr_equal_to_or_overlapping_the_pods_subnet_is_refused():
    for cidr in ("10.128.0.0/23", "10.128.0.0/24", "10.128.1.0/24", "10.0.0.0/8"):
        message = refusal(service_cidr=cidr, pod_cidrs=())
        assert message.startswith(f"--service-cidr {cidr} overlaps eth0's subnet 10.128.0.0/23")
        assert "pod 10.128.0.5" in message


def test_the_service_cidr_containing_the_pod_ip_or_the_gateway_is_refused():
    # a /32 pod address on eth0 (on-link subnet the address itself), gateway off-subnet
    pod = dict(uplink_cidrs=("10.128.0.5/32",), pod_cidrs=())
    assert refusal(service_cidr="10.128.0.0/16", **pod) == (
        "--service-cidr 10.128.0.0/16 overlaps eth0's subnet 10.128.0.5/32 (pod 10.128.0.5): "
        "its route into tenc0 would cut the pod off its own network"
    )
    assert refusal(service_cidr="10.128.0.0/16", uplink_cidrs=(), pod_cidrs=()) == (
        "--service-cidr 10.128.0.0/16 contains the pod's own address (--pod-ip) 10.128.0.5"
    )
    assert refusal(service_cidr="10.200.0.0/16", gateway="10.200.0.1", **pod) == (
        "--service-cidr 10.200.0.0/16 contains the gateway (--gateway) 10.200.0.1"
    )


def test_the_service_cidr_overlapping_the_pod_network_is_refused():
    assert refusal(service_cidr="10.130.0.0/16") == (
        "--service-cidr 10.130.0.0/16 overlaps the pod network 10.128.0.0/14 (--pod-cidr)"
    )
    # an IPv6 pod network never overlaps the IPv4 Service CIDR
    assert validated(replace(POD, pod_cidrs=("fd00::/48",)), 1500).pod_cidrs == ("fd00::/48",)


@pytest.mark.parametrize(
    ("cidr", "host"),
    [
        ("0.0.0.0/0", "0.0.0.0/8"),
        ("128.0.0.0/1", "169.254.0.0/16"),
        ("127.0.0.0/16", "127.0.0.0/8"),
        ("169.254.0.0/16", "169.254.0.0/16"),
        ("224.0.0.0/24", "224.0.0.0/4"),
        ("255.255.255.255/32", "240.0.0.0/4"),
    ],
)
def test_a_service_cidr_over_a_range_every_host_routes_itself_is_refused(cidr, host):
    assert refusal(service_cidr=cidr).startswith(
        f"--service-cidr {cidr} overlaps {host}, a range every host routes itself"
    )


@pytest.mark.parametrize(
    ("changes", "start"),
    [
        ({"pod_ip": "10.128.0.500"}, "--pod-ip '10.128.0.500': not an IPv4 address"),
        ({"gateway": "gw"}, "--gateway 'gw': not an IPv4 address"),
        ({"dns": "fd00::10"}, "--dns 'fd00::10': not an IPv4 address"),
        ({"service_cidr": "172.30.0.0/33"}, "--service-cidr '172.30.0.0/33': not a network"),
        ({"service_cidr": "172.30.0.1/16"}, "--service-cidr '172.30.0.1/16': not a network"),
        ({"service_cidr": "fd00::/108"}, "--service-cidr fd00::/108: not an IPv4 range"),
        ({"pod_cidrs": ("10.128.0.0/14", "pods")}, "--pod-cidr 'pods': not a network"),
        ({"pod_ip": "0.0.0.0"}, "--pod-ip 0.0.0.0: not a unicast address"),
        ({"gateway": "224.0.0.1"}, "--gateway 224.0.0.1: not a unicast address"),
        ({"gateway": "240.0.0.1"}, "--gateway 240.0.0.1: not a unicast address"),
        ({"gateway": "10.128.0.5"}, "--gateway 10.128.0.5 is the pod's own address"),
        ({"dns": "127.0.0.1"}, "--dns 127.0.0.1: a loopback, unspecified, multicast or"),
        ({"dns": "0.0.0.0"}, "--dns 0.0.0.0: a loopback"),
        ({"dns": "255.255.255.255"}, "--dns 255.255.255.255: a loopback"),
        ({"dns": "239.1.1.1"}, "--dns 239.1.1.1: a loopback"),
    ],
)
def test_malformed_or_impossible_addresses_are_refused(changes, start):
    assert refusal(**changes).startswith(start)


def test_the_mtu_leaves_room_for_the_tunnel_and_is_at_least_ipv4s_minimum():
    ceiling = 1450 - OVERHEAD
    for mtu in (MIN_MTU, ceiling):
        assert validated(replace(POD, mtu=mtu), 1450).mtu == mtu
    for mtu in (50, 0, -1, MIN_MTU - 1):
        assert refusal(1450, mtu=mtu) == (
            f"--mtu {mtu}: tenc0's MTU must be from 576 (the datagram every IPv4 host accepts) "
            f"to {ceiling} (eth0's MTU 1450 less the tunnel's 60 bytes)"
        )
    assert refusal(1450, mtu=ceiling + 1).startswith(f"--mtu {ceiling + 1}: tenc0's MTU must be")
    # the default (uplink MTU less the overhead) on an uplink too small for it
    assert refusal(600, mtu=540, mtu_given=False) == (
        "--mtu: eth0's MTU 600 leaves 540 for tenc0 after the tunnel's 60 bytes, below 576 "
        "(the datagram every IPv4 host accepts)"
    )
    assert validated(replace(POD, mtu=1390), 1450, mtu_given=False).mtu == 1390


DUAL = replace(
    POD,
    pod_ip6="fd00:10:128::5",
    gateway6="fe80::1",
    service_cidr6="fd00:30::/108",
    pod_cidrs=("10.128.0.0/14", "fd00:10:128::/56"),
    uplink_cidrs=("10.128.0.0/23", "fd00:10:128::/64"),
)


def test_a_sound_dual_stack_config_is_accepted_with_a_link_local_gateway():
    assert validated(DUAL, 1500) == DUAL
    assert DUAL.service_cidrs == ("172.30.0.0/16", "fd00:30::/108")
    assert DUAL.pod_ips == ("10.128.0.5", "fd00:10:128::5")
    assert DUAL.source_for("fd00:10:129::7") == "fd00:10:128::5"
    assert DUAL.source_for("10.129.0.7") == "10.128.0.5"
    assert {"fd00:10:128::5", "fe80::1"} <= DUAL.own_addresses
    assert POD.service_cidrs == ("172.30.0.0/16",) and POD.source_for("fd00::1") == "10.128.0.5"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"service_cidr6": "fd00:10:128::/64"}, "overlaps eth0's subnet fd00:10:128::/64"),
        ({"service_cidr6": "fd00:10:128:8::/64"}, "overlaps the pod network fd00:10:128::/56"),
        ({"service_cidr6": "fe80::/64"}, "overlaps fe80::/10, a range every host routes itself"),
        ({"service_cidr6": "::/0"}, "overlaps ::/8"),
        ({"service_cidr6": "ff02::/16"}, "overlaps ff00::/8"),
        ({"service_cidr6": "10.96.0.0/12"}, "the second range must be the IPv6 one"),
        ({"service_cidr6": "fd00:30::1/108"}, "not a network"),
        ({"pod_ip6": "fe80::5"}, "not a global unicast address"),
        ({"pod_ip6": "ff02::1"}, "not a global unicast address"),
        ({"pod_ip6": "10.128.0.6"}, "not an IPv6 address"),
        ({"gateway6": "fd00:10:128::5"}, "not a unicast address of another host"),
        ({"gateway6": "::"}, "not a unicast address of another host"),
        (
            {"service_cidr6": "fd00:10:128::/48", "pod_cidrs": (), "uplink_cidrs": ()},
            "contains the pod's IPv6 address fd00:10:128::5",
        ),
    ],
)
def test_a_bad_ipv6_half_is_refused_with_the_reason(changes, words):
    with pytest.raises(UsageError) as info:
        validated(replace(DUAL, **changes), 1500)
    assert words in str(info.value)
