"""What an app resolves cannot move the pod's boundary (#22 items 1-3), on a real lab with
dnsmasq as the cluster DNS and a capture on the node's bridge for every sealed check.

    [nginx1] client, patched ---+-- br0 (tcpdump) --+--- [nginx2] patched, :8080, UDP :9999
    [cakephp] project2 ---------+   node1 dnsmasq    |

The attacker is anyone who can publish a DNS name (a tenant of project2, or CoreDNS's
``pods insecure`` answering ``a-b-c-d.<any namespace>.pod...`` unchecked): the lab publishes
the records such a party could.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Iterator

import pytest

from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS, proxy_pid
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab, curl
from tests.netns.test_failclosed import firewall_set

pytestmark = pytest.mark.netns
UDP_PORT = 9999

UDP_SEND = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    try:
        s.sendto(sys.argv[2].encode(), (sys.argv[1], {UDP_PORT}))
    except OSError:
        pass
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    topology = Topology(
        pods=[
            PodSpec("nginx1", "myproject"),
            PodSpec(
                "nginx2",
                "myproject",
                service_ports=[
                    {"name": "http", "port": 8080},
                    {"name": "dgram", "port": UDP_PORT, "protocol": "UDP"},
                ],
            ),
            PodSpec("cakephp", "project2"),
        ]
    )
    with built_lab(1, topology, prefix="b") as built:
        yield built


def patched(lab: Lab, members: bool) -> None:
    for pod in ("nginx1", "nginx2"):
        if proxy_pid(lab, lab.pod(pod)):
            lab.unpatch(pod)
    lab.patch("nginx2", members=members)
    lab.patch("nginx1", members=members)


def capture_bridge(lab: Lab, capture):  # type: ignore[no-untyped-def]
    node = lab.nodes["node1"]
    return capture(node.netns, node.bridge, "not port 53")


def test_standalone_a_foreign_answer_for_a_project_vip_then_its_literal_address(lab, capture):
    """Item 1 and the mixed case: project2 publishes an alias for nginx2's VIP; nginx1's app
    resolves it, then talks to the VIP by literal address ($NGINX2_SERVICE_HOST): sealed."""
    patched(lab, members=False)
    n2 = lab.pod("nginx2")
    alias = f"a{secrets.token_hex(3)}.project2.svc.cluster.local"
    lab.add_dns_records([(n2.vip, alias)])
    assert n2.vip in lab.exec("nginx1", ["getent", "hosts", alias]).stdout
    marker = f"tencrypt-alias-{secrets.token_hex(4)}"
    with capture_bridge(lab, capture) as cap:
        got = curl(lab, "nginx1", f"http://{n2.vip}:8080/", marker)
        lab.exec("nginx1", [sys.executable, "-c", UDP_SEND, n2.vip, marker, "5"])
    assert got.returncode == 0 and "Hello from nginx2" in got.stdout, got.stderr
    assert marker.encode() not in cap.data
    routes = lab.exec("nginx1", ["ip", "route", "show", f"{n2.vip}/32"]).stdout
    assert "eth0" not in routes  # no bypass route for the project's VIP


@pytest.mark.parametrize("members", [True, False], ids=["membership", "standalone"])
def test_a_lookup_cannot_cut_the_pods_dns_nor_its_probes(lab, capture, members):
    """Item 2: names for the cluster DNS server, the gateway (where the kubelet's probes come
    from) and the metadata address under the project's pod and svc domains change nothing."""
    patched(lab, members)
    n1 = lab.pod("nginx1")
    tag = secrets.token_hex(3)
    names = {
        lab.dns_ip: "172-30-0-2.myproject.pod.cluster.local",
        n1.gateway: f"gw{tag}.myproject.svc.cluster.local",
        "169.254.169.254": f"md{tag}.myproject.svc.cluster.local",
    }
    lab.add_dns_records([(ip, name) for ip, name in names.items()])
    for name in names.values():
        lab.exec("nginx1", ["getent", "hosts", name], check=False)
    time.sleep(1.5)  # bounded: past the proxy's effects round and its sweep
    # the pod's DNS still answers, through its proxy, and a probe from the node still works
    assert lab.pod("nginx2").vip in lab.exec("nginx1", ["getent", "hosts", "nginx2"]).stdout
    probe = lab.exec(
        "node1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{n1.ip}:8080/"]
    )
    assert probe.stdout == "200"
    elements = firewall_set(lab, "nginx1", "project4")
    for ip in names:
        assert ip not in elements, ip
        assert "tenc0" not in lab.exec("nginx1", ["ip", "route", "get", ip]).stdout, ip
    metrics = lab.exec("nginx1", ["curl", "-sS", f"http://{METRICS}/metrics"]).stdout
    refused = re.search(r"^tencrypt_classification_reserved_refused_total (\d+)$", metrics, re.M)
    assert refused and int(refused[1]) >= 1  # every counter is there from start: its value


def test_standalone_a_pod_ip_learned_from_dns_is_sealed_from_its_first_packet(lab, capture):
    """Item 3: the answer naming nginx2's pod IP reaches the app only once its route into
    tenc0 and its firewall element are in place: the first datagram and the first SYN are
    sealed (before, they left in the clear until the route came ~1.5 s later)."""
    patched(lab, members=False)
    n2 = lab.pod("nginx2")
    marker = f"tencrypt-first-{secrets.token_hex(4)}"
    script = (
        "import socket, sys\n"
        f"ip = socket.gethostbyname({n2.endpoint_fqdn!r})\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.sendto({marker!r}.encode(), (ip, {UDP_PORT}))\n"
        "t = socket.socket()\nt.settimeout(5)\n"
        "try:\n"
        "    t.connect((ip, 8080)); t.sendall(b'GET / HTTP/1.0\\r\\nX-Marker: "
        f"{marker}\\r\\n\\r\\n'); print(t.recv(200))\n"
        "except OSError as exc:\n    print('tcp', exc)\n"
    )
    with capture_bridge(lab, capture) as cap:
        proc = netns.run(lab.pod("nginx1").netns, [sys.executable, "-c", script], check=False)
    assert marker.encode() not in cap.data, proc.stdout
    assert "200 OK" in proc.stdout, proc.stdout + proc.stderr


def test_standalone_a_literal_project_pod_ip_never_named_is_sealed_or_refused(lab, capture):
    """Item 9: standalone, nginx2's pod IP reached by literal address, never resolved: the
    on-link route would carry it in the clear; the outbound gate holds the first packet for
    a reverse lookup, which names the project: its /32 into tenc0 comes, the retry is sealed."""
    patched(lab, members=False)
    n2 = lab.pod("nginx2")
    marker = f"tencrypt-literal-{secrets.token_hex(4)}"
    with capture_bridge(lab, capture) as cap:
        lab.exec("nginx1", [sys.executable, "-c", UDP_SEND, n2.ip, marker, "5"])
        got = curl(lab, "nginx1", f"http://{n2.ip}:8080/", marker)
        lab.exec("nginx1", [sys.executable, "-c", UDP_SEND, n2.ip, marker, "5"])
    assert marker.encode() not in cap.data
    assert got.returncode == 0 and "Hello from nginx2" in got.stdout, got.stderr
    assert "tenc0" in lab.exec("nginx1", ["ip", "route", "get", n2.ip]).stdout
    # another project's pod, reached the same way, goes out in the clear as before
    cake = lab.pod("cakephp")
    with capture_bridge(lab, capture) as cap:
        other = curl(lab, "nginx1", f"http://{cake.ip}:8080/", marker + "-x")
    assert other.returncode == 0 and "Hello from cakephp" in other.stdout, other.stderr
    assert (marker + "-x").encode() in cap.data
