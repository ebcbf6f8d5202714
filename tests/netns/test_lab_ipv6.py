"""`tencrypt lab up --ip-family dual|ipv6`: the lab as a dual-stack and as an IPv6-only cluster,
without Tencrypt (the vanilla cluster the proxies will be measured against).

Each shape (dual and ipv6, one node and two) is one module-scoped lab; what must hold in it:
- by name, getaddrinfo puts the AAAA first and curl connects over IPv6 (in dual, ``curl -4``
  still reaches the IPv4 VIP); a literal ``http://[VIP]:port/`` works, from a pod and from
  the node (nat OUTPUT);
- a two-replica Service reached over IPv6 (port 80 -> targetPort http = 8080) answers from
  both replicas over repeated connections (ip6tables' per-connection random choice);
- the tunnel port of an IPv6 VIP reaches the pod and the reply comes back from the VIP;
- dnsmasq answers AAAA (and A in dual only) for Service, endpoint and headless names, PTR
  under ip6.arpa for every IPv6 lab address, NXDOMAIN for an unknown one;
- two nodes: pod to pod over IPv6 across the VXLAN, over an IPv4 underlay (dual) or an IPv6
  one (ipv6, MTU 1430), a capture on the underlay showing only VXLAN of that family;
- the pods and nodes are shaped as such a cluster (addresses, default routes, resolv.conf,
  forwarding, nothing tentative), the status shows the IPv6 addresses, a NetworkPolicy is
  enforced on IPv6 as on IPv4, and ``down`` leaves nothing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tencrypt.lab import netpolicy
from tencrypt.lab.cluster import Lab
from tencrypt.lab.topology import Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab
from tests.netns.test_lab import leftovers, root_namespace

PY = "/usr/bin/python3"
SHAPES = [("dual", 1), ("dual", 2), ("ipv6", 1), ("ipv6", 2)]

# Dual-stack listeners (IPV6_V6ONLY off): an IPv4 client shows up as ::ffff:a.b.c.d.
ECHO_SERVER = r"""
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
if proto == "udp":
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data + b" from " + peer[0].encode(), peer)
s.listen()
while True:
    c, peer = s.accept()
    c.sendall(c.recv(2048) + b" from " + peer[0].encode())
    c.close()
"""

# connected: the reply is accepted only from the address connected to (the VIP)
ECHO_CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.settimeout(5)
s.connect((host, port))
s.send(b"ping")
print(s.recv(2048).decode())
"""

FIRST_ADDRESS = r"""
import socket, sys
print(socket.getaddrinfo(sys.argv[1], 80, type=socket.SOCK_STREAM)[0][4][0])
"""


def topology(family: str) -> Topology:
    topo = Topology.default()
    topo.ip_family = family
    return topo


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{f}-{n}node" for f, n in SHAPES])
def lab6(request: pytest.FixtureRequest) -> Iterator[Lab]:
    family, nodes = request.param
    with built_lab(nodes, topology(family), prefix="s") as lab:
        yield lab


def v6(addresses: list[str]) -> str:
    found = [a for a in addresses if ":" in a]
    assert len(found) == 1, addresses
    return found[0]


def curl(lab: Lab, pod: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(pod, ["curl", "-sS", "--max-time", "10", *args], check=False, timeout=20)


def connected_to(lab: Lab, pod: str, *args: str) -> tuple[str, str]:
    """(the address curl connected to, the body)."""
    got = curl(lab, pod, "-w", r"\n%{remote_ip}", *args)
    assert got.returncode == 0, got.stderr
    body, _, remote = got.stdout.rpartition("\n")
    return remote, body


def dig(lab: Lab, pod: str, *query: str) -> str:
    server = lab.dns_ip
    return lab.exec(pod, ["dig", "+time=2", "+tries=1", f"@{server}", *query]).stdout


def answers(lab: Lab, pod: str, *query: str) -> list[tuple[str, str]]:
    """(type, data) of each answer record."""
    out = dig(lab, pod, "+noall", "+answer", *query)
    return [(f[3], f[4]) for f in (line.split() for line in out.splitlines()) if f]


def dns_status(lab: Lab, pod: str, *query: str) -> str:
    found = re.search(r"status: (\w+)", dig(lab, pod, *query))
    assert found, "dig printed no header"
    return found.group(1)


@contextmanager
def echo_server(lab: Lab, pod: str, proto: str, port: int = 1337) -> Iterator[None]:
    proc = netns.spawn(lab.pod(pod).netns, [PY, "-I", "-c", ECHO_SERVER, proto, str(port)])
    try:
        flag = "-Hlnu" if proto == "udp" else "-Hlnt"
        netns.wait_for(
            lambda: bool(lab.exec(pod, ["ss", flag, f"sport = :{port}"]).stdout),
            what=f"{proto} echo server in {pod}",
        )
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- every shape ------------------------------------------------------------------------------


def test_curl_by_name_prefers_aaaa(lab6: Lab) -> None:
    nginx1, nginx2 = lab6.pod("nginx1"), lab6.pod("nginx2")
    first = lab6.exec("nginx1", [PY, "-I", "-c", FIRST_ADDRESS, "nginx2"]).stdout.strip()
    assert first == v6(nginx2.vips)
    remote, body = connected_to(lab6, "nginx1", "http://nginx2:8080/")
    assert (remote, body) == (v6(nginx2.vips), "Hello from nginx2 (myproject)\n")
    remote, body = connected_to(lab6, "nginx1", "-6", "http://nginx2.myproject:8080/")
    assert (remote, body) == (v6(nginx2.vips), "Hello from nginx2 (myproject)\n")
    # the Service path keeps the client's IPv6 address: nginx2's server logged it
    log = lab6.log_file("nginx2.http")
    netns.wait_for(lambda: f"{v6(nginx1.ips)} - - " in log.read_text(), what="nginx2's log")
    got = curl(lab6, "nginx1", "-4", "http://nginx2:8080/")
    if lab6.topology.ip_family == "dual":
        assert (got.returncode, got.stdout) == (0, "Hello from nginx2 (myproject)\n"), got.stderr
        netns.wait_for(
            lambda: f"::ffff:{nginx1.ip} - - " in log.read_text(), what="nginx2's IPv4 line"
        )
    else:
        assert got.returncode == 6, (got.returncode, got.stderr)  # no A record to connect to


def test_literal_ipv6_vip_from_a_pod_and_from_the_node(lab6: Lab) -> None:
    cakephp, nginx2 = lab6.pod("cakephp"), lab6.pod("nginx2")
    remote, body = connected_to(lab6, "nginx1", f"http://[{v6(cakephp.vips)}]:8080/")
    assert (remote, body) == (v6(cakephp.vips), "Hello from cakephp (project2)\n")
    for node in lab6.nodes:  # nat OUTPUT, and in two nodes the way back over the vxlan
        remote, body = connected_to(lab6, node, f"http://[{v6(nginx2.vips)}]:8080/")
        assert body == "Hello from nginx2 (myproject)\n"
    remote, body = connected_to(lab6, "nginx1", f"http://[{v6(lab6.pod('nginx1').vips)}]:8080/")
    assert body == "Hello from nginx1 (myproject)\n"  # hairpin over IPv6


def test_two_replicas_answer_over_ipv6_with_port_not_target_port(lab6: Lab) -> None:
    web = lab6.services_by_name["web"]
    assert [(p.port, p.target) for p in web.ports] == [(80, "http")]
    seen: dict[str, int] = {}
    for _ in range(20):  # both are picked with probability 1 - 2**-19
        remote, body = connected_to(lab6, "nginx1", "-6", "http://web/")
        assert remote == v6(list(web.cluster_ips))
        name = body.split()[2]
        seen[name] = seen.get(name, 0) + 1
    assert set(seen) == {"nginx2", "nginx3"}, seen


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_tunnel_port_of_an_ipv6_vip_reaches_the_pod(lab6: Lab, proto: str) -> None:
    client, server = lab6.pod("nginx1"), lab6.pod("nginx2")
    with echo_server(lab6, "nginx2", proto):
        got = lab6.exec(
            "nginx1", [PY, "-I", "-c", ECHO_CLIENT, proto, v6(server.vips), "1337"], timeout=20
        ).stdout.strip()
    assert got == f"ping from {v6(client.ips)}"


def test_dns_answers_aaaa_and_ip6_arpa_ptr(lab6: Lab) -> None:
    dual = lab6.topology.ip_family == "dual"
    for pod in lab6.pods.values():
        assert answers(lab6, "nginx1", pod.fqdn, "AAAA") == [("AAAA", v6(pod.vips))]
        assert answers(lab6, "nginx1", pod.fqdn, "A") == ([("A", pod.vip)] if dual else [])
        assert answers(lab6, "cakephp", pod.endpoint_fqdn, "AAAA") == [("AAAA", v6(pod.ips))]
        assert answers(lab6, "cakephp", "-x", v6(pod.vips)) == [("PTR", f"{pod.fqdn}.")]
        assert answers(lab6, "nginx2", "-x", v6(pod.ips)) == [("PTR", f"{pod.endpoint_fqdn}.")]
    web = lab6.services_by_name["web"]
    assert answers(lab6, "nginx1", web.fqdn, "AAAA") == [("AAAA", v6(list(web.cluster_ips)))]
    assert answers(lab6, "nginx1", "-x", v6(list(web.cluster_ips))) == [("PTR", f"{web.fqdn}.")]
    # headless: the ready pods' addresses, as CoreDNS answers
    db = answers(lab6, "nginx1", "db.myproject.svc.cluster.local", "AAAA")
    assert db == [("AAAA", v6(lab6.pod("nginx3").ips))]
    assert dns_status(lab6, "nginx1", "-x", "fd00:30::9:9999") == "NXDOMAIN"  # in the /108
    assert dns_status(lab6, "nginx1", "-x", "fd00:17::99:99") == "NXDOMAIN"
    assert dns_status(lab6, "nginx1", "nosuch.myproject.svc.cluster.local", "AAAA") == "NXDOMAIN"
    if dual:  # the DNS Service is dual-stack too
        out = lab6.exec(
            "nginx1", ["dig", "+short", "@fd00:30::2", "nginx2.myproject.svc.cluster.local", "AAAA"]
        ).stdout.split()
        assert out == [v6(lab6.pod("nginx2").vips)]


def test_pods_and_nodes_are_shaped_like_the_cluster(lab6: Lab) -> None:
    family, two = lab6.topology.ip_family, len(lab6.nodes) == 2
    mtu = {(False, "dual"): 1500, (False, "ipv6"): 1500, (True, "dual"): 1450}.get(
        (two, family), 1430
    )
    for pod in lab6.pods.values():
        node = lab6.nodes[pod.node]
        assert lab6.exec(pod.name, ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip() == str(mtu)
        addrs = lab6.exec(pod.name, ["ip", "-o", "addr", "show", "eth0", "scope", "global"])
        found = sorted(line.split()[3] for line in addrs.stdout.splitlines())
        want = [f"{ip}/{c.split('/')[1]}" for ip, c in zip(pod.ips, node.pod_cidrs, strict=True)]
        assert found == sorted(want)
        route6 = lab6.exec(pod.name, ["ip", "-6", "route", "show", "default"]).stdout.split()
        assert route6[:3] == ["default", "via", v6(node.bridge_ips)]
        route4 = lab6.exec(pod.name, ["ip", "-4", "route", "show", "default"]).stdout.split()
        assert route4[:3] == (["default", "via", node.bridge_ip] if family == "dual" else [])
        assert lab6.exec(pod.name, ["ip", "-6", "addr", "show", "tentative"]).stdout == ""
        resolv = lab6.exec(pod.name, ["cat", "/etc/resolv.conf"]).stdout
        want_dns = "172.30.0.2" if family == "dual" else "fd00:30::2"
        assert resolv.splitlines()[0] == f"nameserver {want_dns}"
    for node in lab6.nodes:
        got = lab6.exec(
            node,
            [
                "sysctl",
                "-n",
                "net.ipv6.conf.all.forwarding",
                "net.bridge.bridge-nf-call-ip6tables",
                "net.bridge.bridge-nf-call-iptables",
            ],
        ).stdout.split()
        assert got == ["1", "1", "1"]
        if two:
            assert lab6.exec(node, ["cat", "/sys/class/net/vxlan0/mtu"]).stdout.strip() == str(mtu)
    text = lab6.status()
    for pod in lab6.pods.values():
        line = next(ln for ln in text.splitlines() if ln.startswith(pod.name + " "))
        assert {*pod.ips, *pod.vips} <= set(line.split()), line


# --- two nodes --------------------------------------------------------------------------------


def test_pod_to_pod_ipv6_across_nodes_over_the_vxlan(lab6: Lab, capture) -> None:  # type: ignore[no-untyped-def]
    if len(lab6.nodes) == 1:
        pytest.skip("one node: no underlay")
    nginx1, nginx2 = lab6.pod("nginx1"), lab6.pod("nginx2")
    assert (nginx1.node, nginx2.node) == ("node1", "node2")
    node1, node2 = lab6.nodes["node1"], lab6.nodes["node2"]
    assert node1.underlay_if and node1.underlay_ip and node2.underlay_ip
    underlay = {node1.underlay_ip.split("/")[0], node2.underlay_ip.split("/")[0]}
    with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
        remote, body = connected_to(lab6, "nginx1", f"http://[{v6(nginx2.ips)}]:8080/")
        assert (remote, body) == (v6(nginx2.ips), "Hello from nginx2 (myproject)\n")
        remote, body = connected_to(lab6, "nginx2", f"http://[{v6(nginx1.ips)}]:8080/")
        assert body == "Hello from nginx1 (myproject)\n"
    frames = cap.frames()
    assert frames, "no VXLAN packet crossed the underlay"
    assert all({f.src, f.dst} == underlay and 4789 in (f.sport, f.dport) for f in frames)
    outer = 6 if lab6.topology.ip_family == "ipv6" else 4
    assert all((":" in str(f.src)) == (outer == 6) for f in frames)
    # the inner packets are IPv6 between the pods (VXLAN alone hides nothing)
    assert ipaddress.IPv6Address(v6(nginx2.ips)).packed in cap.data
    assert b"Hello from nginx2 (myproject)" in cap.data
    # full-sized segments across the smaller MTU, by name over IPv6: intact
    path, digest = lab6.make_blob("nginx2", 4)
    got = lab6.exec(
        "nginx1",
        ["sh", "-c", f"curl -6 -sS --max-time 30 http://nginx2:8080{path} | sha256sum"],
        timeout=40,
    )
    assert got.stdout.split()[0] == digest
    (lab6.www("nginx2") / "blob").unlink()


# --- policies and life cycle (one shape each) -------------------------------------------------


def test_network_policy_is_enforced_on_ipv6_as_on_ipv4(lab6: Lab) -> None:
    if (lab6.topology.ip_family, len(lab6.nodes)) != ("dual", 1):
        pytest.skip("checked once, in the one-node dual-stack lab")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "only-nginx1", "namespace": "myproject"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "nginx2"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nginx1"}}}]}],
        },
    }
    nginx2 = lab6.pod("nginx2")
    try:
        lab6.set_network_policies([policy])
        for flag in ("-6", "-4"):
            ok = curl(lab6, "nginx1", flag, "http://nginx2:8080/")
            assert ok.returncode == 0, (flag, ok.stderr)
            refused = curl(lab6, "nginx3", flag, "--max-time", "2", "http://nginx2:8080/")
            assert refused.returncode == 28, (flag, refused.returncode)  # dropped: timeout
        ruleset = lab6.exec("node1", ["nft", "list", "table", "inet", netpolicy.TABLE]).stdout
        assert f"ip6 daddr {v6(nginx2.ips)} jump ingress_nginx2" in ruleset
        assert netpolicy.counters(lab6, "node1")["ingress_nginx2"] >= 2
    finally:
        lab6.set_network_policies([])
    assert curl(lab6, "nginx3", "-6", "http://nginx2:8080/").returncode == 0


@pytest.mark.parametrize("family", ["dual", "ipv6"])
def test_down_leaves_nothing_behind(family: str) -> None:
    links_before, rules_before = root_namespace()
    ip6_before = ip6tables_save()
    lab = Lab(f"d{netns.unique_suffix()}", topology(family), nodes=2)
    try:
        lab.up()
        present = leftovers(lab.name)
        assert len(present["namespaces"]) == 6 and len(present["processes"]) == 6
    finally:
        lab.down()
    assert leftovers(lab.name) == {}
    links_after, rules_after = root_namespace()
    assert (links_after, rules_after) == (links_before, rules_before)
    assert ip6tables_save() == ip6_before  # nothing of the lab's ever reached the root ns


def ip6tables_save() -> str:
    rules = subprocess.run(["ip6tables-save"], capture_output=True, text=True).stdout
    return re.sub(r"\[\d+:\d+\]", "", "\n".join(ln for ln in rules.splitlines() if ln[:1] != "#"))
