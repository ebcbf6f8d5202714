"""Fail closed (DESIGN §1a): what gets encrypted does not depend on anything an attacker or an
outage controls. Each test replays one way the proxy used to fail open and asserts, from a
capture on the node's bridge, that no byte of a marker crossed it in the clear.

    [nginx1]--+                                        +--[nginx2]    myproject: patched
    [legacy]--+-- node1: br0 172.17.0.1/16, kube-proxy DNAT, dnsmasq 172.30.0.2
    [cakephp]-+                                                       project2: never patched
    legacy is a pod of myproject that is never patched (an app the operator forgot).

Most tests run twice: with the membership the lab hands each proxy (as the node agent does)
and standalone (no membership: DNS and sessions are the only evidence).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import proxy_pid
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab, curl, drops, metrics

pytestmark = pytest.mark.netns
MARKER = "tencrypt-failclosed-c41f"
STREAM_PORT = 9000
UDP_PORT = 9999


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    topology = Topology(
        pods=[
            PodSpec("nginx1", "myproject"),
            # its Service lists the ports the tests use, as a real Service would have to
            PodSpec(
                "nginx2",
                "myproject",
                service_ports=[
                    {"name": "http", "port": 8080},
                    {"name": "stream", "port": STREAM_PORT},
                    {"name": "datagrams", "port": UDP_PORT, "protocol": "UDP"},
                ],
            ),
            PodSpec("cakephp", "project2"),
            PodSpec("legacy", "myproject"),
        ]
    )
    with built_lab(1, topology, prefix="f") as lab:
        yield lab


def patched(lab: Lab, members: bool, *pods: str, run_args: tuple[str, ...] = ()) -> None:
    """Exactly ``pods`` patched, each freshly (empty tables), with or without membership."""
    for pod in ("nginx1", "nginx2"):
        if proxy_pid(lab, lab.pod(pod)):
            lab.unpatch(pod)
    for pod in pods:
        lab.patch(pod, run_args=run_args, members=members)


def bridge(lab: Lab) -> tuple[str, str]:
    node = lab.nodes["node1"]
    return node.netns, node.bridge


STREAM_SERVER = f"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {STREAM_PORT})); srv.listen(1)
conn, _ = srv.accept()
with open(sys.argv[1], "ab", buffering=0) as out:
    while data := conn.recv(65536):
        out.write(data)
"""

STREAM_CLIENT = f"""
import socket, sys, time
host, count = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, {STREAM_PORT}), timeout=10)
for i in range(count):
    s.sendall(("{MARKER}-%04d;" % i).encode())
    time.sleep(0.05)
s.close()
print("sent", count)
"""


def firewall_set(lab: Lab, pod: str, name: str) -> list[str]:
    out = lab.exec(pod, ["nft", "-j", "list", "set", "inet", "tencrypt", name]).stdout
    items = [i["set"] for i in json.loads(out)["nftables"] if "set" in i]
    return [e for e in items[0].get("elem", []) if isinstance(e, str)]


# -- 1. a tenant's DNS name for our VIP ----------------------------------------------------


@pytest.mark.parametrize("members", [True, False], ids=["membership", "standalone"])
def test_a_tenants_alias_for_our_vip_does_not_unseal_a_connection(lab, capture, tmp_path, members):
    patched(lab, members, "nginx1", "nginx2")
    n2 = lab.pod("nginx2")
    alias = f"alias{int(members)}.project2.svc.cluster.local"
    received = tmp_path / "received"
    server = netns.spawn(n2.netns, [sys.executable, "-c", STREAM_SERVER, str(received)])
    try:
        netns.wait_for(
            lambda: f":{STREAM_PORT}" in lab.exec("nginx2", ["ss", "-ltn"]).stdout,
            what="the stream server",
        )
        ns, iface = bridge(lab)
        with capture(ns, iface, "not port 53") as cap:
            client = netns.spawn(
                lab.pod("nginx1").netns, [sys.executable, "-c", STREAM_CLIENT, "nginx2", "120"]
            )
            netns.wait_for(
                lambda: received.exists() and received.stat().st_size > 0,
                timeout=20,
                what="the first chunks",
            )
            lab.add_dns_records([(n2.vip, alias)])  # any tenant can publish this
            answer = lab.exec("nginx1", ["getent", "hosts", alias])
            assert n2.vip in answer.stdout  # the app did resolve the alias, through the proxy
            assert client.wait(timeout=30) == 0
        assert received.read_bytes().count(MARKER.encode()) == 120  # the connection survived
        assert MARKER.encode() not in cap.data  # and stayed sealed all along
        routes = lab.exec("nginx1", ["ip", "route", "show", f"{n2.vip}/32"]).stdout
        assert "eth0" not in routes  # no bypass route for our own VIP
        assert metrics(lab, "nginx1").get("tencrypt_classification_conflicts_total", 0) >= 1
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# -- 3. PeerDown: an unreachable peer's pod IP stays protected -------------------------------

UDP_SENDER = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    try:
        s.sendto(b"{MARKER}-udp", (sys.argv[1], {UDP_PORT}))
    except OSError:
        pass  # refused (ICMP admin-prohibited, EPERM from the firewall): never in the clear
    time.sleep(0.05)
"""


@pytest.mark.parametrize("members", [True, False], ids=["membership", "standalone"])
def test_peer_down_keeps_the_protection(lab, capture, members):
    patched(
        lab,
        members,
        "nginx1",
        "nginx2",
        run_args=("--handshake-give-up", "3", "--session-lifetime", "6"),
    )
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")
    # nginx2 calls nginx1: nginx1's session is bound to nginx2's own pod IP (its source)
    assert curl(lab, "nginx2", "http://nginx1:8080/", MARKER + "-warm").returncode == 0
    log = lab.log_file("nginx1.tencrypt")
    netns.wait_for(lambda: f"peer {n2.ip} up" in log.read_text(), what="the session")
    node_ns, iface = bridge(lab)
    block = ["iptables", "-I", "FORWARD", "-p", "udp", "--dport", "1337", "-j", "DROP"]
    netns.run(node_ns, block)
    try:
        with capture(node_ns, iface, "not port 53") as cap:

            def down() -> bool:  # traffic keeps the stale timer going until the peer is given up
                lab.exec("nginx1", [sys.executable, "-c", UDP_SENDER, n2.ip, "4"])
                return f"peer {n2.ip} down" in log.read_text()

            netns.wait_for(down, timeout=60, interval=0.5, what="the peer to go down")
            assert metrics(lab, "nginx1").get("tencrypt_peers_unreachable_total", 0) >= 1
            lab.exec("nginx1", [sys.executable, "-c", UDP_SENDER, n2.ip, "20"])
            tcp = curl(lab, "nginx1", f"http://{n2.ip}:8080/", MARKER + "-tcp", timeout=3)
        assert tcp.returncode != 0  # availability is lost ...
        assert MARKER.encode() not in cap.data  # ... confidentiality is not
        clear = [
            f
            for f in cap.frames()
            if f.src == n1.ip and f.dst == n2.ip and not (f.proto == 17 and f.dport == 1337)
        ]
        assert clear == []
    finally:
        netns.run(node_ns, ["iptables", "-D", *block[2:]])


def test_a_member_pod_ip_never_learned_is_protected_from_the_first_packet(lab, capture):
    """With the membership, nginx2's pod IP is the project's before any DNS or session."""
    patched(lab, True, "nginx1", "nginx2")
    n2 = lab.pod("nginx2")
    node_ns, iface = bridge(lab)
    block = ["iptables", "-I", "FORWARD", "-p", "udp", "--dport", "1337", "-j", "DROP"]
    netns.run(node_ns, block)
    try:
        with capture(node_ns, iface, "not port 53") as cap:
            lab.exec("nginx1", [sys.executable, "-c", UDP_SENDER, n2.ip, "20"])
        assert MARKER.encode() not in cap.data
    finally:
        netns.run(node_ns, ["iptables", "-D", *block[2:]])
    assert n2.ip in firewall_set(lab, "nginx1", "project4")


# -- 4. an unpatched pod of the project ------------------------------------------------------


def test_an_unpatched_member_is_refused_from_its_first_syn(lab, capture):
    patched(lab, True, "nginx1")
    n1, legacy = lab.pod("nginx1"), lab.pod("legacy")
    node_ns, iface = bridge(lab)
    with capture(node_ns, iface, f"host {legacy.ip}") as cap:
        direct = curl(lab, "legacy", f"http://{n1.ip}:8080/", MARKER + "-in", timeout=3)
        by_vip = curl(lab, "legacy", f"http://{n1.vip}:8080/", MARKER + "-vip", timeout=3)
    assert direct.returncode != 0 and by_vip.returncode != 0
    answers = [f for f in cap.frames() if f.dst == legacy.ip and f.proto == 6]
    assert answers == []  # not even a SYN-ACK: nginx1 never accepted plaintext from it

    def counted() -> bool:
        refused = 'tencrypt_firewall_packets_total{rule="refused",direction="in",family="ipv4"}'
        return metrics(lab, "nginx1").get(refused, 0) >= 2

    netns.wait_for(counted, timeout=15, interval=0.5, what="the firewall's refusal counter")
    # and the other way: a project pod without a proxy is never reached in the clear
    with capture(node_ns, iface, f"host {legacy.ip}") as cap:
        out = curl(lab, "nginx1", "http://legacy:8080/", MARKER + "-out", timeout=3)
    assert out.returncode != 0 and MARKER.encode() not in cap.data


def test_standalone_an_unpatched_member_is_refused_after_a_reverse_lookup(lab, capture):
    """No membership: the first plaintext SYN from an unknown source waits in the kernel
    (NFQUEUE) while a PTR lookup names its project; the project's is refused, others pass."""
    patched(lab, False, "nginx1")
    n1, legacy, cake = lab.pod("nginx1"), lab.pod("legacy"), lab.pod("cakephp")
    node_ns, iface = bridge(lab)
    with capture(node_ns, iface, f"host {legacy.ip}") as cap:
        refused = curl(lab, "legacy", f"http://{n1.ip}:8080/", MARKER + "-sa", timeout=3)
    assert refused.returncode != 0
    assert [f for f in cap.frames() if f.dst == legacy.ip and f.proto == 6] == []
    other = curl(lab, "cakephp", f"http://{n1.ip}:8080/", MARKER + "-x")  # another project
    assert other.returncode == 0 and "Hello from nginx1" in other.stdout, other.stderr
    m = metrics(lab, "nginx1")
    assert drops(m, "plaintext_from_project") >= 1
    assert m.get("tencrypt_inbound_accepted_total", 0) >= 1
    assert legacy.ip in firewall_set(lab, "nginx1", "project4")  # later packets: the kernel
    assert cake.ip not in firewall_set(lab, "nginx1", "project4")


@pytest.mark.parametrize("members", [True, False], ids=["membership", "standalone"])
def test_a_stopped_proxy_leaves_the_firewall_and_a_restarted_one_adopts_it(lab, capture, members):
    """No plaintext window around a proxy restart: the rules stay when it stops (its /32s go,
    so a member's pod IP takes eth0, where the firewall refuses it), and the next proxy starts
    from what is in the sets."""
    patched(lab, members, "nginx1", "nginx2")
    n2 = lab.pod("nginx2")
    assert curl(lab, "nginx1", "http://nginx2:8080/", MARKER + "-before").returncode == 0
    netns.wait_for(
        lambda: n2.vip in firewall_set(lab, "nginx1", "project4"), what="the VIP in the firewall"
    )
    before = set(firewall_set(lab, "nginx1", "project4"))
    pid = proxy_pid(lab, lab.pod("nginx1"))
    os.kill(pid, signal.SIGTERM)
    netns.wait_for(lambda: proxy_pid(lab, lab.pod("nginx1")) is None, what="the proxy to stop")
    node_ns, iface = bridge(lab)
    with capture(node_ns, iface, "not port 53") as cap:
        lab.exec("nginx1", [sys.executable, "-c", UDP_SENDER, n2.vip, "10"])
        if members:  # standalone, nothing named nginx2's pod IP: a documented residual
            assert "eth0" in lab.exec("nginx1", ["ip", "route", "get", n2.ip]).stdout
            lab.exec("nginx1", [sys.executable, "-c", UDP_SENDER, n2.ip, "10"])
        stopped = curl(lab, "nginx1", f"http://{n2.vip}:8080/", MARKER + "-stopped", timeout=3)
    assert stopped.returncode != 0 and MARKER.encode() not in cap.data
    assert set(firewall_set(lab, "nginx1", "project4")) == before
    lab.patch("nginx1", members=members)  # setup again (idempotent) and a new proxy
    assert set(firewall_set(lab, "nginx1", "project4")) >= before
    with capture(node_ns, iface, "not port 53") as cap:
        after = curl(lab, "nginx1", f"http://{n2.vip}:8080/", MARKER + "-after")
    assert after.returncode == 0 and MARKER.encode() not in cap.data


# -- 5. dual stack: AAAA answers -------------------------------------------------------------


@pytest.mark.parametrize("members", [True, False], ids=["membership", "standalone"])
def test_aaaa_answers_break_nothing_and_never_open_the_clear(lab, capture, members):
    patched(lab, members, "nginx1", "nginx2")
    lab.add_dns_records(
        [
            ("fd00:30::12", "nginx2.myproject.svc.cluster.local"),
            ("fd00:30::13", "cakephp.project2.svc.cluster.local"),
        ]
    )
    aaaa = lab.exec("nginx1", ["dig", "+short", "AAAA", "nginx2.myproject.svc.cluster.local"])
    assert "fd00:30::12" in aaaa.stdout  # answered: the old proxy lost this answer
    node_ns, iface = bridge(lab)
    with capture(node_ns, iface, "not port 53") as cap:
        internal = curl(lab, "nginx1", "http://nginx2:8080/", MARKER + "-v4in")
        external = curl(lab, "nginx1", "http://cakephp.project2:8080/", MARKER + "-v4out")
    assert internal.returncode == 0 and "Hello from nginx2" in internal.stdout, internal.stderr
    assert external.returncode == 0 and "Hello from cakephp" in external.stdout, external.stderr
    assert (MARKER + "-v4in").encode() not in cap.data
    assert (MARKER + "-v4out").encode() in cap.data  # cross-project stays untouched

    def in_set() -> bool:
        return "fd00:30::12" in firewall_set(lab, "nginx1", "project6")

    if members:  # the membership does not list it: DNS alone makes no project address
        time.sleep(1.0)  # bounded: one effects round, which would have added it
        assert not in_set()
    else:  # standalone: the project's DNS name is its evidence
        netns.wait_for(in_set, timeout=10, what="the AAAA address in the firewall")
    assert "fd00:30::13" not in firewall_set(lab, "nginx1", "project6")
    assert proxy_pid(lab, lab.pod("nginx1"))


# -- 2. a cluster DNS outage (last: it stops the lab's DNS) ----------------------------------


@pytest.mark.parametrize("members", [True, False], ids=["membership", "standalone"])
def test_dns_outage_and_a_literal_vip_never_go_in_the_clear(lab, capture, members):
    patched(lab, members, "nginx1", "nginx2")
    n2 = lab.pod("nginx2")
    node_ns, iface = bridge(lab)
    lab.stop_dns()
    try:
        with capture(node_ns, iface, "not port 53") as cap:
            first = curl(lab, "nginx1", f"http://{n2.vip}:8080/", MARKER + "-1", timeout=10)
            second = curl(lab, "nginx1", f"http://{n2.vip}:8080/", MARKER + "-2", timeout=10)
        assert MARKER.encode() not in cap.data
        if members:  # the membership says it is ours: sealed, DNS or not
            assert first.returncode == 0 and "Hello from nginx2" in first.stdout, first.stderr
            assert second.returncode == 0
        else:  # unknown: refused, and the app is told (it does not wait for its time-out)
            # curl's 7 is "failed to connect" (the ICMP error), not its time-out (28)
            assert first.returncode == 7 and second.returncode == 7, first.stderr
            assert drops(metrics(lab, "nginx1"), "unclassified") >= 2
    finally:
        lab.start_dns()
