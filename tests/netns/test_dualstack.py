"""IPv6 sealed like IPv4 on a dual-stack lab (issue 24): a dual-stack pod is one peer, one
session; its IPv6 packets ride the IPv4 tunnel to the pod behind the destination.

    [nginx1] 172.17.0.11 fd00:17::11 --+                   +-- [nginx2] :8080 (http, app)
      getaddrinfo: AAAA first          |  node1 br0, kube-proxy DNAT per family     (myproject)
    [cakephp] project2, never patched -+                   +-- [nginx3] :8080 (http), :9090 (app)
    Services of myproject (dual-stack: a cluster IP per family, fd00:30::/108 and 172.30/16):
      web    80 -> targetPort "app"  : nginx2 (8080), nginx3 (9090)
      front  80 -> targetPort "http" : nginx2
      each pod's own Service, port 8080 (and nginx2's UDP 9999)

Every sealed check captures the node's bridge and asserts that its marker never crossed it in
the clear, in either family, and that nothing but UDP 1337 over IPv4 went between myproject's
pods' addresses (both families).
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tencrypt.lab.capture import Capture
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS, proxy_pid
from tencrypt.lab.topology import PodSpec, ServiceSpec, Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab, download_sha256, metrics

pytestmark = pytest.mark.netns

TOPOLOGY = Topology(
    ip_family="dual",
    pods=[
        PodSpec("nginx1", "myproject"),
        PodSpec(
            "nginx2",
            "myproject",
            ports={"http": 8080, "app": 8080},
            service_ports=[
                {"name": "http", "port": 8080, "targetPort": 8080},
                {"name": "echo", "port": 9999, "targetPort": 9999, "protocol": "UDP"},
            ],
        ),
        PodSpec("cakephp", "project2"),
        PodSpec("nginx3", "myproject", ports={"http": 8080, "app": 9090}),
    ],
    services=[
        ServiceSpec(
            "web",
            "myproject",
            ["nginx2", "nginx3"],
            [{"name": "h", "port": 80, "targetPort": "app"}],
        ),
        ServiceSpec("front", "myproject", ["nginx2"]),
    ],
)
HELLO = re.compile(r"Hello from (\w+)")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(1, TOPOLOGY, prefix="d") as built:
        for name in ("nginx1", "nginx2", "nginx3"):
            built.patch(name)
        yield built


def project_addresses(lab: Lab) -> set[str]:
    """Every address of myproject's pods and Services, both families."""
    pods = [p for p in lab.pods.values() if p.project == "myproject"]
    services = [s for s in lab.services if s.project == "myproject"]
    return {ip for p in pods for ip in (*p.ips, *p.vips)} | {
        ip for s in services for ip in s.cluster_ips
    }


def sealed(lab: Lab, action: Callable[[], Any], marker: str) -> Any:
    """Run ``action``; assert ``marker`` never crossed the bridge in the clear and nothing but
    UDP 1337 over IPv4 went between myproject's addresses."""
    node = lab.nodes["node1"]
    project = project_addresses(lab)
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        result = action()
        frames = cap.stop()
    assert marker.encode() not in cap.data
    between = [f for f in frames if f.src in project and f.dst in project]
    assert between, "no frames between the project's pods were captured"
    for f in between:
        assert f.proto == 17 and 1337 in (f.sport, f.dport) and ":" not in str(f.src), f
    return result


def curl(
    lab: Lab, url: str, *flags: str, pod: str = "nginx1", marker: str = "m"
) -> tuple[str, str]:
    """(who answered, the address curl connected to); ("", "") when it failed."""
    proc = lab.exec(
        pod,
        ["curl", "-sS", "--max-time", "10", *flags, "-H", f"X-Marker: {marker}"]
        + ["-w", "\\n%{remote_ip}", url],
        check=False,
        timeout=30,
    )
    found = HELLO.search(proc.stdout)
    if proc.returncode or not found:
        return "", ""
    return found.group(1), proc.stdout.strip().splitlines()[-1]


def test_curl_by_name_prefers_aaaa_and_is_sealed_in_both_families(lab: Lab):
    marker = f"tencrypt-ds-{secrets.token_hex(4)}"
    n2 = lab.pod("nginx2")

    def calls() -> tuple[tuple[str, str], ...]:
        return (
            curl(lab, "http://nginx2:8080/", marker=marker),  # getaddrinfo: AAAA first
            curl(lab, "http://nginx2:8080/", "-4", marker=marker),
            curl(lab, f"http://[{n2.vip_of(6)}]:8080/", marker=marker),  # a literal IPv6 VIP
        )

    by_name, v4, literal = sealed(lab, calls, marker)
    assert by_name == ("nginx2", n2.vip_of(6))
    assert v4 == ("nginx2", n2.vip_of(4))
    assert literal == ("nginx2", n2.vip_of(6))
    m = metrics(lab, "nginx1")
    assert m["tencrypt_packets_sealed_total"] > 0 and m["tencrypt_packets_opened_total"] > 0


def test_both_families_of_one_pod_share_one_peer_and_one_session(lab: Lab):
    n2 = lab.pod("nginx2")
    assert curl(lab, f"http://[{n2.ip_of(6)}]:8080/")[0] == "nginx2"
    assert curl(lab, f"http://{n2.ip_of(4)}:8080/")[0] == "nginx2"
    status = lab.exec("nginx1", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"])
    peers = [p for p in json.loads(status.stdout)["peers"] if set(n2.ips) & set(p["addresses"])]
    assert len(peers) == 1, peers  # one peer for both of nginx2's addresses
    assert set(n2.ips) <= set(peers[0]["addresses"]), peers[0]


def test_forty_connections_over_ipv6_spread_over_both_replicas_port_to_target_port(lab: Lab):
    web6 = lab.services_by_name["web"].vip_of(6)
    marker = f"tencrypt-lb6-{secrets.token_hex(4)}"
    script = (
        f'for i in $(seq 40); do curl -sS --max-time 5 -H "X-Marker: {marker}" '
        f"'http://[{web6}]/' || echo FAILED; echo; done"
    )
    out = sealed(lab, lambda: lab.exec("nginx1", ["sh", "-c", script], timeout=300).stdout, marker)
    seen = collections.Counter(m.group(1) for m in HELLO.finditer(out))
    assert out.count("FAILED") == 0, out[-500:]
    assert seen["nginx2"] >= 8 and seen["nginx3"] >= 8, seen  # nginx3 answers on 9090: "app"


def test_a_pod_ipv6_address_is_reached_after_a_session_through_a_service(lab: Lab):
    marker = f"tencrypt-vp6-{secrets.token_hex(4)}"
    front6 = lab.services_by_name["front"].vip_of(6)
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")

    def calls() -> tuple[str, str, str]:
        return (
            curl(lab, f"http://[{front6}]/", marker=marker)[0],
            curl(lab, f"http://[{n2.ip_of(6)}]:8080/", marker=marker)[0],
            curl(lab, f"http://[{n1.ip_of(6)}]:8080/", pod="nginx2", marker=marker)[0],
        )

    assert sealed(lab, calls, marker) == ("nginx2", "nginx2", "nginx1")


def test_udp_over_ipv6_crosses_the_tunnel(lab: Lab):
    n2 = lab.pod("nginx2")
    marker = f"tencrypt-udp6-{secrets.token_hex(4)}"
    echo = netns.spawn(
        n2.netns,
        [
            sys.executable,
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "s.bind(('::',9999))\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(d.upper(),a)\n",
        ],
    )
    try:
        client = (
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(2)\n"
            f"s.connect(('{n2.vip_of(6)}',9999))\n"
            "for i in range(20):\n"
            f"  s.send(b'{marker}')\n"
            "  try:\n    print(s.recv(2048).decode()); break\n"
            "  except OSError: pass\n"
        )
        out = sealed(
            lab,
            lambda: lab.exec("nginx1", [sys.executable, "-c", client], timeout=90).stdout,
            marker,
        )
        assert marker.upper() in out  # answered from the VIP: the reply translated back
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait()


def test_a_large_ipv6_stream_is_cut_and_merged_by_the_batch_path(lab: Lab):
    """TCP over IPv6 large enough for TSO6 super-packets out of tenc0 and GRO merges in."""
    path, digest = lab.make_blob("nginx2", 30)
    before = metrics(lab, "nginx2").get("tencrypt_super_packets_split_total", 0)
    url = f"http://[{lab.pod('nginx2').ip_of(6)}]:8080{path}"
    assert download_sha256(lab, "nginx1", url) == digest
    assert metrics(lab, "nginx2")["tencrypt_super_packets_split_total"] > before


def test_packet_too_big_for_ipv6_reaches_the_senders_path_mtu(lab: Lab):
    """tenc0's MTU raised behind setup's back: the proxy answers an IPv6 packet above the
    MTU it was set up with by an ICMPv6 Packet Too Big, which the kernel believes (RFC 8201):
    the sending socket's path MTU drops to it. The socket stays open meanwhile (the kernel
    applies a Packet Too Big for UDP only while a socket matches its quote)."""
    dst = lab.pod("nginx2").ip_of(6)
    mtu = int(lab.exec("nginx1", ["cat", "/sys/class/net/tenc0/mtu"]).stdout)
    lab.exec("nginx1", ["ip", "link", "set", "tenc0", "mtu", str(mtu + 60)])
    try:
        send = (
            "import socket, time\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, 23, 0)\n"  # IPV6_MTU_DISCOVER: PMTUDISC_DONT
            f"s.connect(('{dst}', 9))\nbefore = s.getsockopt(socket.IPPROTO_IPV6, 24)\n"
            f"s.send(b'x'*{mtu})\n"
            "for _ in range(200):\n"  # IPV6_MTU (24): the path MTU this socket knows
            f"    if s.getsockopt(socket.IPPROTO_IPV6, 24) <= {mtu}: break\n"
            "    time.sleep(0.05)\n"
            "print(before, s.getsockopt(socket.IPPROTO_IPV6, 24))\n"
        )
        before, after = lab.exec("nginx1", [sys.executable, "-c", send]).stdout.split()
        assert (int(before), int(after)) == (mtu + 60, mtu)
    finally:
        lab.exec("nginx1", ["ip", "link", "set", "tenc0", "mtu", str(mtu)], check=False)
        lab.exec("nginx1", ["ip", "-6", "route", "flush", "cache"], check=False)


def test_an_unpatched_project_pod_gets_no_ipv6_in_the_clear(lab: Lab):
    """nginx3 without a proxy: nginx1's IPv6 to it is refused (strict mode), never sent in
    the clear; IPv4 alike."""
    lab.unpatch("nginx3")
    try:
        marker = f"tencrypt-np6-{secrets.token_hex(4)}"
        n3 = lab.pod("nginx3")
        node = lab.nodes["node1"]
        with Capture(node.netns, node.bridge, "not port 53") as cap:
            got = curl(lab, f"http://[{n3.ip_of(6)}]:8080/", marker=marker)
            cap.stop()
        assert got == ("", "")
        assert marker.encode() not in cap.data
    finally:
        if not proxy_pid(lab, lab.pod("nginx3")):
            lab.patch("nginx3")
