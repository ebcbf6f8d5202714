"""End to end across two nodes (the OpenShift SDN shape): sealed traffic inside VXLAN.

    node1: br0 172.17.0.1/16 [nginx1, cakephp]  --vxlan0 (VNI 42) over underlay veth--
    node2: br0 172.18.0.1/16 [nginx2]            pod MTU 1450 -> tenc0 MTU 1390

An eavesdropper on the underlay reads the VXLAN-encapsulated frames: the marker the
application sends must not be in them.
"""

from __future__ import annotations

import pytest

from tencrypt.lab.proxy import proxy_pid
from tests.netns.conftest import curl, download_sha256

MARKER = "tencrypt-two-node-marker-51d0"


@pytest.fixture(scope="module")
def sealed2(lab2):
    lab2.patch("nginx2")
    lab2.patch("nginx1")
    yield lab2


def test_tenc0_mtu_follows_the_overlay(sealed2):
    link = sealed2.exec("nginx1", ["ip", "link", "show", "tenc0"]).stdout
    assert "mtu 1390" in link


def test_curl_across_vxlan_is_sealed_on_the_underlay(sealed2, capture):
    lab = sealed2
    node1 = lab.nodes["node1"]
    with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
        proc = curl(lab, "nginx1", "http://nginx2:8080/", MARKER)
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
    assert cap.frames(), "nothing crossed the underlay"
    assert MARKER.encode() not in cap.data and b"Hello from nginx2" not in cap.data
    # inside VXLAN (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8, inner Ethernet 14): every
    # inner IPv4 packet between the two pods is UDP to or from :1337 (IPv6 neighbour chatter
    # of the bridges may cross too: it is not the pods' traffic)
    pods = {lab.pod("nginx1").ip, lab.pod("nginx2").ip, lab.pod("nginx2").vip}
    inner = [
        f.raw[64:] for f in cap.frames() if f.raw[62:64] == b"\x08\x00" and len(f.raw) >= 64 + 28
    ]
    between = [
        p for p in inner if {".".join(map(str, p[12:16])), ".".join(map(str, p[16:20]))} <= pods
    ]
    assert between and all(
        p[9] == 17 and 1337 in (int.from_bytes(p[20:22], "big"), int.from_bytes(p[22:24], "big"))
        for p in between
    )


def test_100mb_across_vxlan_arrives_intact(sealed2):
    lab = sealed2
    path, digest = lab.make_blob("nginx2", 100)
    assert download_sha256(lab, "nginx1", f"http://nginx2:8080{path}") == digest


def test_cross_project_across_nodes_stays_plaintext(sealed2, capture):
    lab = sealed2
    node1 = lab.nodes["node1"]
    with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
        proc = curl(lab, "cakephp", "http://nginx2.myproject:8080/", MARKER)
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
    assert MARKER.encode() in cap.data


def test_both_ways_across_nodes_set_up_as_the_daemonset_does(sealed2, capture):
    """The lab's launcher passes setup nothing, as the agent's: the pod network comes from
    the membership (the Nodes' pod CIDRs), so a claim from the other node's pod subnet is
    not refused as outside "the pod network" (issue 21: eth0's /16 is one node's subnet)."""
    lab = sealed2
    if not proxy_pid(lab, lab.pod("nginx3")):
        lab.patch("nginx3")  # web's replica on node1 (nginx2's is on node2)
    node1 = lab.nodes["node1"]
    with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
        there = curl(lab, "nginx1", f"http://{lab.pod('nginx2').ip}:8080/", MARKER)
        back = curl(lab, "nginx2", f"http://{lab.pod('nginx1').ip}:8080/", MARKER)
        web = [curl(lab, "nginx1", "http://web/", MARKER) for _ in range(12)]
    assert "Hello from nginx2" in there.stdout and "Hello from nginx1" in back.stdout
    answered = {line.split()[2] for p in web for line in p.stdout.splitlines() if "Hello" in line}
    assert answered == {"nginx2", "nginx3"}  # one replica per node, both reached
    assert MARKER.encode() not in cap.data
    for pod in ("nginx1", "nginx2"):
        setup = lab.log_file(f"{pod}.tencrypt").read_text()
        assert "pod network 172.17.0.0/16, 172.18.0.0/16" in setup  # from the membership


def test_standalone_pods_reach_each_other_across_nodes(lab2, capture):
    """Without membership (the origin-pod image, `tencrypt run` by hand) and no --pod-cidr:
    the VIP path through the node's DNAT works across nodes, both ways."""
    lab = lab2
    for pod in ("nginx1", "nginx2"):
        if proxy_pid(lab, lab.pod(pod)):
            lab.unpatch(pod)
    try:
        lab.patch("nginx2", members=False)
        lab.patch("nginx1", members=False)
        node1 = lab.nodes["node1"]
        with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
            there = curl(lab, "nginx1", "http://nginx2:8080/", MARKER)
            back = curl(lab, "nginx2", "http://nginx1.myproject:8080/", MARKER)
        assert there.returncode == 0 and "Hello from nginx2" in there.stdout, there.stderr
        assert back.returncode == 0 and "Hello from nginx1" in back.stdout, back.stderr
        assert MARKER.encode() not in cap.data
        log = lab.log_file("nginx1.tencrypt").read_text()
        assert "standalone mode" in log and "no per-connection load balancing" in log
    finally:
        for pod in ("nginx1", "nginx2"):
            if proxy_pid(lab, lab.pod(pod)):
                lab.unpatch(pod)
        lab.patch("nginx2")
        lab.patch("nginx1")
