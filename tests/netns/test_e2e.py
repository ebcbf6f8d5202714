"""End to end on the one-node lab: the real proxy in real pods, real curl, ping, captures.

    [nginx1]--veth--+                       +--veth--[nginx2]      myproject: patched
      tencrypt run  |    node1: br0 172.17.0.1/16   tencrypt run
                    +--- kube-proxy DNAT (VIP:8080, VIP:1337), dnsmasq 172.30.0.2
    [cakephp]--veth-+                                               project2: never patched

Every check looks at what crossed the bridge (tcpdump) or at the proxies' own counters
(Prometheus text on each pod's 127.0.0.1:9137), never at a mock.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import pytest

from tencrypt.lab.proxy import proxy_pid
from tencrypt.lab.topology import Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab, download_sha256, forgeries_are_counted, metrics
from tests.netns.conftest import curl as lab_curl

MARKER = "tencrypt-e2e-marker-7f3a9c"


def curl(lab, pod: str, url: str, timeout: int = 15, marker: str = MARKER):
    return lab_curl(lab, pod, url, marker, timeout)


@pytest.fixture(scope="module")
def lab():
    """The default lab, nginx2's Service with a UDP port too (the echo server of the UDP test):
    a datagram to a VIP port no Service lists is rejected, as kube-proxy rejects it."""
    topology = Topology.default()
    topology.pods[1] = dataclasses.replace(
        topology.pods[1],
        service_ports=[
            {"name": "http", "port": 8080, "targetPort": 8080},
            {"name": "echo", "port": 9999, "targetPort": 9999, "protocol": "UDP"},
        ],
    )
    with built_lab(1, topology) as built:
        yield built


@pytest.fixture(scope="module")
def sealed(lab):
    lab.patch("nginx2")
    lab.patch("nginx1")
    yield lab


def test_curl_by_name_is_sealed_on_the_bridge(sealed, capture):
    lab = sealed
    node = lab.nodes["node1"]
    with capture(node.netns, node.bridge, "not port 53") as cap:
        proc = curl(lab, "nginx1", "http://nginx2:8080/")
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")
    pods = {n1.ip, n1.vip, n2.ip, n2.vip}
    talk = [f for f in cap.frames() if f.src in pods and f.dst in pods]
    assert talk, "no frames between the pods were captured"
    assert all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in talk)
    assert MARKER.encode() not in cap.data and b"Hello from nginx2" not in cap.data
    m = metrics(lab, "nginx1")
    assert m["tencrypt_packets_sealed_total"] > 0 and m["tencrypt_packets_opened_total"] > 0
    assert m["tencrypt_sessions"] >= 1


def test_100mb_transfer_arrives_intact(sealed):
    lab = sealed
    path, digest = lab.make_blob("nginx2", 100)
    assert download_sha256(lab, "nginx1", f"http://nginx2:8080{path}") == digest


def test_one_packet_path_delivers_the_same_bytes(sealed):
    """--no-batch: no offloads, one packet per system call; the same download, the same bytes."""
    lab = sealed
    path, digest = lab.make_blob("nginx2", 20)
    for pod in ("nginx2", "nginx1"):
        lab.unpatch(pod)
        lab.patch(pod, run_args=("--no-batch",))
    try:
        assert download_sha256(lab, "nginx1", f"http://nginx2:8080{path}") == digest
        m = metrics(lab, "nginx1")
        assert (
            m.get("tencrypt_super_packets_split_total", 0) == 0
            and m["tencrypt_packets_sealed_total"] > 0
        )
    finally:
        for pod in ("nginx2", "nginx1"):
            lab.unpatch(pod)
            lab.patch(pod)
    assert download_sha256(lab, "nginx1", f"http://nginx2:8080{path}") == digest
    m = metrics(lab, "nginx2")
    assert m["tencrypt_super_packets_split_total"] > 0  # the batch path carried the download


def test_udp_and_icmp_cross_the_tunnel(sealed, capture):
    lab = sealed
    n2 = lab.pod("nginx2")
    echo = netns.spawn(
        n2.netns,
        [
            sys.executable,
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0',9999))\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(d.upper(),a)\n",
        ],
    )
    try:
        client = (
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\n"
            f"s.connect(('{n2.vip}',9999))\n"
            "for i in range(20):\n"
            f"  s.send(b'{MARKER}')\n"
            "  try:\n    print(s.recv(2048).decode()); break\n"
            "  except socket.timeout: pass\n"
        )
        node = lab.nodes["node1"]
        with capture(node.netns, node.bridge, "not port 53") as cap:
            out = lab.exec("nginx1", [sys.executable, "-c", client], timeout=90).stdout
            ping = lab.exec(
                "nginx1", ["ping", "-c", "3", "-i", "0.2", "-W", "3", n2.vip], check=False
            )
        assert MARKER.upper() in out  # answered by nginx2, from the VIP (connected socket)
        assert ping.returncode == 0 and f"from {n2.vip}" in ping.stdout, ping.stdout + ping.stderr
        assert MARKER.encode() not in cap.data and MARKER.upper().encode() not in cap.data
        assert not [f for f in cap.frames() if f.proto == 1 and f.src in (n2.ip, n2.vip)]
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait()


def test_cross_project_traffic_stays_plaintext_and_works(sealed, capture):
    lab = sealed
    node = lab.nodes["node1"]
    with capture(node.netns, node.bridge, "tcp port 8080") as cap:
        proc = curl(lab, "cakephp", "http://nginx2.myproject:8080/")
        back = curl(lab, "nginx1", "http://cakephp.project2:8080/")
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
    assert back.returncode == 0 and "Hello from cakephp" in back.stdout, back.stderr
    assert cap.data.count(MARKER.encode()) >= 2  # both requests readable: untouched by Tencrypt


def test_literal_vips_work_without_a_dns_lookup(sealed, capture):
    """Applications using *_SERVICE_HOST env vars: a fresh proxy meets the VIP on tenc0 first."""
    lab = sealed
    lab.unpatch("nginx1")
    lab.patch("nginx1")  # a fresh DNS table: nothing classified yet
    n2, cake = lab.pod("nginx2"), lab.pod("cakephp")
    node = lab.nodes["node1"]
    with capture(node.netns, node.bridge, "not port 53") as cap:
        internal = curl(lab, "nginx1", f"http://{n2.vip}:8080/", marker=MARKER + "-in")
        external = curl(lab, "nginx1", f"http://{cake.vip}:8080/", marker=MARKER + "-out")
    assert internal.returncode == 0 and "Hello from nginx2" in internal.stdout, internal.stderr
    assert external.returncode == 0 and "Hello from cakephp" in external.stdout, external.stderr
    frames = cap.frames()
    to_n2 = [f for f in frames if {f.src, f.dst} & {n2.ip, n2.vip}]
    assert to_n2 and all(f.proto == 17 and f.dport == 1337 or f.sport == 1337 for f in to_n2)
    assert (MARKER + "-in").encode() not in cap.data  # the project's request is sealed
    assert (MARKER + "-out").encode() in cap.data  # the cross-project one is untouched
    assert metrics(lab, "nginx1")["tencrypt_packets_bypassed_total"] > 0


def test_forged_replayed_and_flipped_datagrams_are_counted_drops(sealed, capture):
    lab = sealed
    n2 = lab.pod("nginx2")
    node = lab.nodes["node1"]
    with capture(node.netns, node.bridge, f"udp and dst host {n2.ip} and dst port 1337") as cap:
        assert curl(lab, "nginx1", "http://nginx2:8080/").returncode == 0
    data = [f.raw[14 + 28 :] for f in cap.frames() if f.raw[14 + 28 : 14 + 29] == b"\x04"]
    assert data, "no data messages captured"
    forgeries_are_counted(lab, "nginx2", "node1", n2.ip, data)
    proc = curl(lab, "nginx1", "http://nginx2:8080/")  # still serving
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout


def test_peer_restart_is_healed_by_a_new_handshake(sealed):
    lab = sealed
    n1_pid = proxy_pid(lab, lab.pod("nginx1"))
    assert curl(lab, "nginx1", "http://nginx2:8080/").returncode == 0
    os.kill(proxy_pid(lab, lab.pod("nginx2")), signal.SIGKILL)  # a crash: no goodbye
    lab.unpatch("nginx2")
    lab.patch("nginx2")
    deadline = time.monotonic() + 60
    while True:
        proc = curl(lab, "nginx1", "http://nginx2:8080/", timeout=10)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
    assert proxy_pid(lab, lab.pod("nginx1")) == n1_pid  # nginx1 was not touched


def test_strict_mode_refuses_plaintext_within_the_project(sealed):
    lab = sealed
    assert curl(lab, "nginx1", "http://nginx2:8080/").returncode == 0  # nginx1 knows nginx2 now
    lab.unpatch("nginx2")
    try:
        # plaintext from a pod of its own project is refused by nginx1's firewall
        assert curl(lab, "nginx2", "http://nginx1:8080/", timeout=5).returncode != 0
        # and nginx1 never falls back to plaintext towards its project
        assert curl(lab, "nginx1", "http://nginx2:8080/", timeout=5).returncode != 0
        assert curl(lab, "cakephp", "http://nginx1.myproject:8080/").returncode == 0
        lab.unpatch("nginx1")
        lab.patch("nginx1", strict=False)
        deadline = time.monotonic() + 90
        while True:  # --no-strict: after the handshake gives up, the clear is allowed
            proc = curl(lab, "nginx1", "http://nginx2:8080/", timeout=20)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
        assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
        assert curl(lab, "nginx2", "http://nginx1:8080/").returncode == 0
    finally:
        lab.unpatch("nginx1")
        lab.patch("nginx2")
        lab.patch("nginx1")
