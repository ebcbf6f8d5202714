"""IPv6-only pods (issue 24, "Outer IPv6"): setup's config, routes and rules in IPv6 alone,
and the tunnel socket's IPv6 addresses as the core wants them."""

from __future__ import annotations

import argparse
import json
import socket
from dataclasses import replace

import pytest

from tencrypt.core.podconfig import MIN_MTU6, OVERHEAD6, PodConfig, tun_mtu, validated
from tencrypt.core.stats import Stats
from tencrypt.errors import UsageError
from tencrypt.linux import gso, journal, podnet
from tencrypt.linux.journal import PlannedRoute

POD6 = PodConfig(
    pod_ip="fd00:10:128::5",
    dev="eth0",
    gateway="fe80::1",
    dns="fd00:30::a",
    domain="shop.svc.cluster.local",
    search=("shop.svc.cluster.local",),
    cluster_domain="cluster.local",
    service_cidr="fd00:30::/108",
    pod_cidrs=("fd00:10:128::/56",),
    uplink_cidrs=("fd00:10:128::/64",),
    mtu=1420,
)


def refusal(uplink_mtu=1500, mtu_given=True, **changes):
    with pytest.raises(UsageError) as info:
        validated(replace(POD6, **changes), uplink_mtu, mtu_given=mtu_given)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_ipv6_only_config_is_accepted_with_its_primary_family_ipv6():
    assert validated(POD6, 1500) == POD6
    loose = replace(POD6, pod_cidrs=("fd00:10:128::1/56",))
    assert validated(loose, 1500).pod_cidrs == ("fd00:10:128::/56",)
    assert POD6.version == 6 and POD6.overhead == OVERHEAD6 == 80
    assert POD6.service_cidrs == ("fd00:30::/108",) and POD6.pod_ips == ("fd00:10:128::5",)
    assert POD6.source_for("fd00:10:129::7") == "fd00:10:128::5"
    assert POD6.gateway_for("fd00:10:129::7") == "fe80::1"
    assert POD6.gateway_for("10.0.0.1") == ""  # no IPv4 route on an IPv6-only pod
    assert {"fd00:10:128::5", "fe80::1", "fd00:30::a"} <= POD6.own_addresses
    assert POD6.is_boundary("fd00:30::a") and not POD6.is_boundary("fd00:10:128::9")
    # the cluster DNS inside the Service CIDR, as a Service: Kubernetes' normal case
    assert validated(replace(POD6, dns="fd00:30::2"), 1500).dns == "fd00:30::2"
    # a global gateway is accepted too
    assert validated(replace(POD6, gateway="fd00:10:128::1"), 1500).gateway == "fd00:10:128::1"


def test_a_dual_stack_or_ipv4_config_keeps_ipv4_as_its_primary():
    dual = replace(
        POD6,
        pod_ip="10.128.0.5",
        gateway="10.128.0.1",
        dns="172.30.0.10",
        service_cidr="172.30.0.0/16",
        pod_ip6="fd00:10:128::5",
        gateway6="fe80::1",
        service_cidr6="fd00:30::/108",
        uplink_cidrs=("10.128.0.0/23", "fd00:10:128::/64"),
        mtu=1440,
    )
    assert validated(dual, 1500) == dual
    assert dual.version == 4 and dual.overhead == 60
    assert dual.gateway_for("fd00::1") == "fe80::1" and dual.gateway_for("10.1.0.1") == "10.128.0.1"


@pytest.mark.parametrize(
    ("changes", "start"),
    [
        ({"pod_ip": "fd00::zz"}, "--pod-ip 'fd00::zz': not an IPv6 address"),
        ({"pod_ip": "fe80::5"}, "--pod-ip fe80::5: not a global unicast address"),
        ({"pod_ip": "ff02::1"}, "--pod-ip ff02::1: not a global unicast address"),
        ({"pod_ip": "::1"}, "--pod-ip ::1: not a global unicast address"),
        ({"gateway": "10.128.0.1"}, "--gateway '10.128.0.1': not an IPv6 address"),
        ({"gateway": "::"}, "--gateway ::: not a unicast address"),
        ({"gateway": "ff02::2"}, "--gateway ff02::2: not a unicast address"),
        ({"gateway": "fd00:10:128::5"}, "--gateway fd00:10:128::5 is the pod's own address"),
        ({"dns": "172.30.0.10"}, "--dns '172.30.0.10': not an IPv6 address"),
        ({"dns": "::1"}, "--dns ::1: a loopback, unspecified or multicast address"),
        ({"dns": "ff02::fb"}, "--dns ff02::fb: a loopback"),
        ({"service_cidr": "172.30.0.0/16"}, "--service-cidr 172.30.0.0/16: not an IPv6 range"),
        ({"service_cidr": "fd00:30::1/108"}, "--service-cidr 'fd00:30::1/108': not a network"),
        ({"service_cidr": "fd00:10:128::/64"}, "--service-cidr fd00:10:128::/64 overlaps eth0's"),
        (
            {"service_cidr": "fd00:10:128:8::/64"},
            "--service-cidr fd00:10:128:8::/64 overlaps the pod network fd00:10:128::/56",
        ),
        ({"service_cidr": "::/0"}, "--service-cidr ::/0 overlaps ::/8, a range every host"),
        ({"service_cidr": "fe80::/64"}, "--service-cidr fe80::/64 overlaps fe80::/10"),
        ({"service_cidr": "ff00::/8"}, "--service-cidr ff00::/8 overlaps ff00::/8"),
        (
            {"service_cidr": "fd00:10::/32", "pod_cidrs": (), "uplink_cidrs": ()},
            "--service-cidr fd00:10::/32 contains the pod's own address (--pod-ip) fd00:10:128::5",
        ),
        (
            {"service_cidr": "fd00:99::/64", "gateway": "fd00:99::1", "uplink_cidrs": ()},
            "--service-cidr fd00:99::/64 contains the gateway (--gateway) fd00:99::1",
        ),
        ({"pod_cidrs": ("pods",)}, "--pod-cidr 'pods': not a network"),
        ({"pod_ip6": "fd00:10:128::6"}, "--pod-ip fd00:10:128::5 is IPv6: an IPv6-only pod"),
        ({"service_cidr6": "fd00:31::/108"}, "--pod-ip fd00:10:128::5 is IPv6: an IPv6-only"),
    ],
)
def test_a_bad_ipv6_only_config_is_refused_with_the_reason(changes, start):
    assert refusal(**changes).startswith(start)


def test_the_mtu_leaves_room_for_the_ipv6_tunnel_and_is_at_least_ipv6s_minimum():
    ceiling = 1430 - OVERHEAD6  # the lab's IPv6 VXLAN overlay: 1350
    assert tun_mtu(1500, 6) == 1420 and tun_mtu(1430, 6) == ceiling and tun_mtu(1500) == 1440
    with pytest.raises(ValueError):
        tun_mtu(1280 + OVERHEAD6 - 1, 6)
    for mtu in (MIN_MTU6, ceiling):
        assert validated(replace(POD6, mtu=mtu), 1430).mtu == mtu
    for mtu in (576, MIN_MTU6 - 1, ceiling + 1):
        assert refusal(1430, mtu=mtu) == (
            f"--mtu {mtu}: tenc0's MTU must be from 1280 (IPv6's minimum link MTU) to "
            f"{ceiling} (eth0's MTU 1430 less the tunnel's 80 bytes)"
        )
    assert refusal(1300, mtu=1220, mtu_given=False) == (
        "--mtu: eth0's MTU 1300 leaves 1220 for tenc0 after the tunnel's 80 bytes, below 1280 "
        "(IPv6's minimum link MTU)"
    )


def test_ipv6_only_routes_are_all_ipv6_with_the_dns_server_as_a_128():
    plan = journal.planned_routes(POD6, "fd00:10:128::/64", None)
    assert plan == [
        PlannedRoute("fd00:30::/108", "tenc0", None, "fd00:10:128::5"),
        PlannedRoute("fd00:30::a/128", "eth0", "fe80::1", "fd00:10:128::5"),
        PlannedRoute("fd00:10:128::/64", "eth0", None, "fd00:10:128::5", 1337),
        PlannedRoute("::/0", "eth0", "fe80::1", "fd00:10:128::5", 1337),
    ]
    # a DNS server on the on-link subnet is reached without the gateway
    on_link = journal.planned_routes(replace(POD6, dns="fd00:10:128::53"), "fd00:10:128::/64")
    assert on_link[1] == PlannedRoute("fd00:10:128::53/128", "eth0", None, "fd00:10:128::5")


def test_ipv4_routes_are_unchanged():
    pod = replace(
        POD6,
        pod_ip="10.128.0.5",
        gateway="10.128.0.1",
        dns="172.30.0.10",
        service_cidr="172.30.0.0/16",
        pod_cidrs=(),
        uplink_cidrs=(),
    )
    assert journal.planned_routes(pod, "10.128.0.0/23") == [
        PlannedRoute("172.30.0.0/16", "tenc0", None, "10.128.0.5"),
        PlannedRoute("172.30.0.10/32", "eth0", "10.128.0.1", "10.128.0.5"),
        PlannedRoute("10.128.0.0/23", "eth0", None, "10.128.0.5", 1337, scope_link=True),
        PlannedRoute("0.0.0.0/0", "eth0", "10.128.0.1", "10.128.0.5", 1337),
    ]
    assert journal.rule_versions(pod) == (4,)
    assert journal.rule_versions(replace(pod, pod_ip6="fd00::5")) == (4, 6)


def test_an_ipv6_only_pod_gets_ipv6_rules_alone_and_undo_keeps_those_that_were_there():
    marks = journal.marks(POD6)
    assert journal.rule_versions(POD6) == (6,)
    assert journal.removed_rules(POD6, []) == [(m, 6) for m in marks]
    assert journal.removed_rules(POD6, [marks[0]]) == [(marks[1], 6)]
    dual = replace(POD6, pod_ip="10.128.0.5", pod_ip6="fd00::5")
    # a dual-stack pod's kept rules are IPv4's; its IPv6 rules are always Tencrypt's
    assert journal.removed_rules(dual, [marks[0]]) == [(marks[1], 4), (marks[0], 6), (marks[1], 6)]


def _members(tmp_path, cidrs):
    path = tmp_path / "members.json"
    path.write_text(
        json.dumps(
            {
                "format": "tencrypt-members/2",
                "project": "shop",
                "generation": 1,
                "pods": [],
                "services": [],
                "serviceCIDRs": cidrs,
                "podCIDRs": ["fd00:10:128::/56"],
            }
        )
    )
    return str(path)


def test_an_ipv6_only_pods_service_cidr_comes_from_the_flags_or_the_members_file(tmp_path):
    args = argparse.Namespace(
        service_cidr=None, pod_cidr=None, members_file=_members(tmp_path, ["fd00:30::/108"])
    )
    assert podnet._cluster_ranges(args, 6) == ("fd00:30::/108", "", ("fd00:10:128::/56",))
    args.service_cidr = "10.96.0.0/12,fd00:31::/112"  # the IPv4 one is not routed
    assert podnet._cluster_ranges(args, 6) == ("fd00:31::/112", "", ("fd00:10:128::/56",))


@pytest.mark.parametrize(
    ("flag", "cidrs"),
    [(None, ["10.96.0.0/12"]), ("172.30.0.0/16", ["fd00:30::/108"]), (None, [])],
)
def test_an_ipv6_only_pod_without_an_ipv6_service_cidr_is_refused_never_given_a_default(
    tmp_path, flag, cidrs
):
    args = argparse.Namespace(
        service_cidr=flag, pod_cidr=None, members_file=_members(tmp_path, cidrs)
    )
    with pytest.raises(UsageError, match="no IPv6 Service CIDR known for this IPv6-only pod"):
        podnet._cluster_ranges(args, 6)
    args.members_file = None
    with pytest.raises(UsageError, match="pass --service-cidr"):
        podnet._cluster_ranges(args, 6)


def test_recvmsg_addresses_become_the_cores_endpoints():
    assert gso.endpoint(("10.0.0.1", 1337)) == ("10.0.0.1", 1337)
    assert gso.endpoint(("fd00:0:0::0:1", 1337, 0, 0)) == ("fd00::1", 1337)
    assert gso.endpoint(("FD00::A", 1337, 5, 0)) == ("fd00::a", 1337)
    assert gso.endpoint(("fe80::1%eth0", 1337, 0, 2)) == ("fe80::1", 1337)


def test_udp_batch_over_ipv6_sends_runs_and_names_the_sender_as_host_and_port():
    """Loopback ::1: a GSO run out of an AF_INET6 socket arrives as its datagrams (GRO or
    not), and the sender is (host, port), never recvmsg's 4-tuple."""
    a = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::1", 0))
            s.setblocking(False)
        out, into = gso.UdpBatch(a, Stats()), gso.UdpBatch(b, Stats())
        size, count = 1200, 5
        data = b"".join(bytes([i]) * size for i in range(count)) + b"\xff" * 100
        to = b.getsockname()[:2]
        assert out.send_batch(data, size, to) == count + 1
        got: list[bytes] = []
        senders = set()
        for _ in range(1000):
            batch = into.recv_batch()
            if batch is None:
                if len(got) == count + 1:
                    break
                continue
            datagrams, addr = batch
            senders.add(addr)
            got += [bytes(d) for d in datagrams]
        assert got == [bytes([i]) * size for i in range(count)] + [b"\xff" * 100]
        assert senders == {("::1", a.getsockname()[1])}
    finally:
        a.close()
        b.close()
