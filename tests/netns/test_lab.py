"""`tencrypt lab`: a real namespace cluster, reachable by name, that leaves nothing behind.

Topology: see the picture in tencrypt/lab/cluster.py. What must hold, and is checked here:
- pods reach each other by Service name (search list) and across projects by <svc>.<project>;
- dnsmasq answers A and PTR exactly, and NXDOMAIN (not a timeout) for unknown cluster names;
- a reply from a DNAT'ed Service comes back from the VIP (bridged replies pass conntrack), for
  the Service port and for UDP/TCP 1337 (chain TENCRYPT); a pod reaches its own Service;
- two nodes talk over VXLAN (a capture on the underlay sees UDP 4789 carrying the traffic);
- ``down`` removes every namespace, /etc/netns entry, process and file, also after ``up`` was
  killed half-way or the state was lost, and ``up`` on a dirty host starts clean.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tencrypt.errors import SetupError, UsageError
from tencrypt.lab import proxy, services
from tencrypt.lab.cluster import ETC_NETNS, STATE_ROOT, Lab
from tencrypt.lab.topology import Pod, Topology
from tencrypt.linux import netns, procs
from tencrypt.nodesync import nftrules

TENCRYPT = [sys.executable, "-m", "tencrypt"]
PY = "/usr/bin/python3"

ECHO_SERVER = r"""
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data + b" from " + peer[0].encode(), peer)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen()
while True:
    c, peer = s.accept()
    c.sendall(c.recv(2048) + b" from " + peer[0].encode())
    c.close()
"""

# A connected UDP socket only accepts datagrams from the address it connected to: the reply
# arrives only if the node's conntrack turned the pod's source back into the VIP.
ECHO_CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.settimeout(5)
s.connect((host, port))
s.send(b"ping")
print(s.recv(2048).decode())
"""


def curl(lab: Lab, pod: str, url: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(pod, ["curl", "-sS", "--max-time", "10", url], check=False, timeout=20)


def dig(lab: Lab, pod: str, *query: str) -> str:
    return lab.exec(pod, ["dig", "+time=2", "+tries=1", f"@{lab.dns_ip}", *query]).stdout


def answers(lab: Lab, pod: str, *query: str) -> list[tuple[int, str, str]]:
    """(ttl, type, data) of each answer record."""
    out = dig(lab, pod, "+noall", "+answer", *query)
    return [(int(f[1]), f[3], f[4]) for f in (line.split() for line in out.splitlines()) if f]


def dns_status(lab: Lab, pod: str, *query: str) -> str:
    found = re.search(r"status: (\w+)", dig(lab, pod, *query))
    assert found, "dig printed no header"
    return found.group(1)


@contextmanager
def echo_server(lab: Lab, pod: Pod, proto: str, port: int = services.TUNNEL_PORT) -> Iterator[None]:
    proc = netns.spawn(pod.netns, [PY, "-I", "-c", ECHO_SERVER, proto, str(port)])
    try:
        flag = "-Hlnu" if proto == "udp" else "-Hlnt"
        netns.wait_for(
            lambda: bool(lab.exec(pod.name, ["ss", flag, f"sport = :{port}"]).stdout),
            what=f"{proto} echo server in {pod.name}",
        )
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def echo(lab: Lab, client: str, proto: str, host: str, port: int = services.TUNNEL_PORT) -> str:
    return lab.exec(
        client, [PY, "-I", "-c", ECHO_CLIENT, proto, host, str(port)], timeout=20
    ).stdout.strip()


# --- one node ---------------------------------------------------------------------------------


def test_curl_by_service_name_within_a_project(lab: Lab) -> None:
    for client, server in (("nginx1", "nginx2"), ("nginx2", "nginx1")):
        got = curl(lab, client, f"http://{server}:8080/")
        assert got.returncode == 0, got.stderr
        assert got.stdout == f"Hello from {server} (myproject)\n"
    # the Service path keeps the client's address: the server logged nginx1's pod IP
    log = lab.log_file("nginx1.http")
    netns.wait_for(
        lambda: f"{lab.pod('nginx2').ip} - - " in log.read_text(), what="nginx1's access log"
    )


def test_curl_across_projects_needs_the_project_in_the_name(lab: Lab) -> None:
    got = curl(lab, "cakephp", "http://nginx2.myproject:8080/")
    assert (got.returncode, got.stdout) == (0, "Hello from nginx2 (myproject)\n"), got.stderr
    got = curl(lab, "nginx1", "http://cakephp.project2.svc.cluster.local:8080/")
    assert (got.returncode, got.stdout) == (0, "Hello from cakephp (project2)\n"), got.stderr
    # cakephp's search list is project2's: a bare "nginx2" does not resolve there
    got = curl(lab, "cakephp", "http://nginx2:8080/")
    assert got.returncode == 6, (got.returncode, got.stdout, got.stderr)  # couldn't resolve


def test_dns_answers_a_and_ptr_for_services_and_pods(lab: Lab) -> None:
    for pod in lab.pods.values():
        svc = answers(lab, "nginx1", pod.fqdn, "A")
        assert [(t, d) for _, t, d in svc] == [("A", pod.vip)]
        assert svc[0][0] > 0, "a TTL of 0 would make the pod-side DNS proxy forget at once"
        assert answers(lab, "cakephp", "-x", pod.vip) == [(svc[0][0], "PTR", f"{pod.fqdn}.")]
        assert [(t, d) for _, t, d in answers(lab, "nginx2", "-x", pod.ip)] == [
            ("PTR", f"{pod.name}.{pod.fqdn}.")
        ]
        assert [(t, d) for _, t, d in answers(lab, "nginx2", f"{pod.name}.{pod.fqdn}")] == [
            ("A", pod.ip)
        ]
    assert dns_status(lab, "nginx1", "nosuch.myproject.svc.cluster.local") == "NXDOMAIN"
    assert dns_status(lab, "nginx1", "nginx1.project2.svc.cluster.local") == "NXDOMAIN"
    assert dns_status(lab, "nginx1", "-x", "172.30.99.99") == "NXDOMAIN"
    assert dns_status(lab, "nginx1", "-x", "172.17.99.99") == "NXDOMAIN"


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_tunnel_port_reaches_the_pod_and_replies_come_from_the_vip(lab: Lab, proto: str) -> None:
    client, server = lab.pod("nginx1"), lab.pod("nginx2")
    with echo_server(lab, server, proto):
        assert echo(lab, client.name, proto, server.vip) == f"ping from {client.ip}"


def test_pod_reaches_its_own_service_and_node_reaches_services(lab: Lab) -> None:
    got = curl(lab, "nginx1", "http://nginx1:8080/")  # hairpin: out of and back into one port
    assert (got.returncode, got.stdout) == (0, "Hello from nginx1 (myproject)\n"), got.stderr
    got = curl(lab, "node1", f"http://{lab.pod('cakephp').vip}:8080/")  # nat OUTPUT
    assert (got.returncode, got.stdout) == (0, "Hello from cakephp (project2)\n"), got.stderr


def test_program_tencrypt_chain_replaces_the_chain(lab: Lab) -> None:
    """The lab programs its nodes through node-sync's code and nft backend: exactly the given
    Services, in table inet tencrypt, nothing in the nat table."""
    node = lab.nodes["node1"].netns

    def programmed() -> set[tuple[str, str]]:
        listing = lab.exec("node1", ["nft", "list", "table", "inet", "tencrypt"]).stdout
        return nftrules.pairs(nftrules.parse_listing(listing))

    everything = {(s.vip, e.ip) for s in lab.services if s.vip for e in s.endpoints if e.ready}
    assert ("172.30.0.100", lab.pod("nginx3").ip) in everything  # web's second replica
    try:
        services.program_tencrypt_chain(node, lab.services)
        assert programmed() == everything
        services.program_tencrypt_chain(node, [s for s in lab.services if s.name == "nginx2"])
        nginx2 = lab.pod("nginx2")
        assert programmed() == {(nginx2.vip, nginx2.ip)}
        listing = lab.exec("node1", ["nft", "list", "table", "inet", "tencrypt"]).stdout
        assert "hook prerouting priority" in listing and "hook output priority" in listing
        assert "TENCRYPT" not in lab.exec("node1", ["iptables-save", "-t", "nat"]).stdout
    finally:
        services.program_tencrypt_chain(node, lab.services)
    assert programmed() == everything


def test_pod_and_node_namespaces_are_shaped_like_a_cluster(lab: Lab) -> None:
    node = lab.nodes["node1"]
    for pod in lab.pods.values():
        assert lab.exec(pod.name, ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip() == "1500"
        assert (
            f"inet {pod.ip}/16" in lab.exec(pod.name, ["ip", "-4", "addr", "show", "eth0"]).stdout
        )
        assert lab.exec(pod.name, ["ip", "route", "show", "default"]).stdout.split()[:3] == [
            "default",
            "via",
            node.bridge_ip,
        ]
        assert lab.exec(pod.name, ["cat", "/etc/resolv.conf"]).stdout == (
            f"nameserver 172.30.0.2\nsearch {pod.project}.svc.cluster.local svc.cluster.local "
            "cluster.local\noptions ndots:5\n"
        )
    sysctls = lab.exec(
        "node1", ["sysctl", "-n", "net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"]
    ).stdout.split()
    assert sysctls == ["1", "1"]
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for pod in lab.pods.values():
        assert f" {pod.host_if}@" not in root_links and f" {pod.host_if}:" not in root_links


def test_project_keys(lab: Lab) -> None:
    keys = {}
    for project in ("myproject", "project2"):
        path = lab.psk_file(project)
        assert path.stat().st_mode & 0o777 == 0o600
        keys[project] = base64.b64decode(path.read_text().strip(), validate=True)
        assert len(keys[project]) == 32
    assert keys["myproject"] != keys["project2"]


def test_status_exec_and_load(lab: Lab) -> None:
    text = lab.status()
    for pod in lab.pods.values():
        line = next(ln for ln in text.splitlines() if ln.startswith(pod.name + " "))
        for field in (pod.project, pod.node, pod.netns, pod.ip, pod.vip, "1500"):
            assert field in line.split(), (field, line)
        assert line.split()[-1] == "no"  # no proxy in the pod
    cli = [*TENCRYPT, "lab", "--name", lab.name]
    got = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=30)
    assert got.returncode == 0 and "dnsmasq up" in got.stdout, got.stderr
    got = subprocess.run(
        [*cli, "exec", "nginx1", "--", "sh", "-c", "cat; exit 7"],
        input="via stdin\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (got.returncode, got.stdout) == (7, "via stdin\n")
    got = subprocess.run(
        [*cli, "exec", "cakephp", "--", "ip", "-4", "-o", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert got.returncode == 0 and f"inet {lab.pod('cakephp').ip}/" in got.stdout
    again = Lab.load(lab.name)
    assert again.pods == lab.pods and again.nodes == lab.nodes
    with pytest.raises(UsageError):
        Lab.load(f"nolab{netns.unique_suffix()}")


def test_100_mb_download_is_intact(lab: Lab) -> None:
    path, digest = lab.make_blob("nginx2", 100)
    got = lab.exec(
        "nginx1",
        ["sh", "-c", f"curl -sS --max-time 50 http://nginx2:8080{path} | sha256sum"],
        timeout=60,
    )
    assert got.stdout.split()[0] == digest
    (lab.www("nginx2") / "blob").unlink()


# --- two nodes --------------------------------------------------------------------------------


def test_two_nodes_talk_over_vxlan(lab2: Lab, capture) -> None:  # type: ignore[no-untyped-def]
    nginx1, nginx2 = lab2.pod("nginx1"), lab2.pod("nginx2")
    assert (nginx1.node, nginx2.node) == ("node1", "node2")
    node1, node2 = lab2.nodes["node1"], lab2.nodes["node2"]
    assert node1.underlay_if and node1.underlay_ip and node2.underlay_ip
    with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
        got = curl(lab2, "nginx1", "http://nginx2:8080/")
        assert (got.returncode, got.stdout) == (0, "Hello from nginx2 (myproject)\n"), got.stderr
    frames = cap.frames()
    underlay = {node1.underlay_ip.split("/")[0], node2.underlay_ip.split("/")[0]}
    assert frames, "no VXLAN packet crossed the underlay"
    assert all({f.src, f.dst} == underlay and 4789 in (f.sport, f.dport) for f in frames)
    assert b"Hello from nginx2 (myproject)" in cap.data  # VXLAN alone hides nothing


def test_two_nodes_mtu_services_and_dns_on_both(lab2: Lab) -> None:
    for pod in lab2.pods.values():
        assert lab2.exec(pod.name, ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip() == "1450"
    for node in ("node1", "node2"):
        assert lab2.exec(node, ["cat", "/sys/class/net/vxlan0/mtu"]).stdout.strip() == "1450"
    # nginx2 lives on node2: its queries go to node2's dnsmasq, its Service traffic to node2's
    # DNAT, and it reaches pods of node1 through the tunnel
    got = curl(lab2, "nginx2", "http://cakephp.project2:8080/")
    assert (got.returncode, got.stdout) == (0, "Hello from cakephp (project2)\n"), got.stderr
    assert f"from {lab2.pod('nginx2').ip}" in lab2.log_file("node2.dnsmasq").read_text()
    with echo_server(lab2, lab2.pod("nginx1"), "udp"):
        assert echo(lab2, "nginx2", "udp", lab2.pod("nginx1").vip) == (
            f"ping from {lab2.pod('nginx2').ip}"
        )
    path, digest = lab2.make_blob("nginx2", 4)
    got = lab2.exec(
        "nginx1",
        ["sh", "-c", f"curl -sS --max-time 30 http://nginx2:8080{path} | sha256sum"],
        timeout=40,
    )
    assert got.stdout.split()[0] == digest


# --- life cycle -------------------------------------------------------------------------------


def leftovers(name: str) -> dict[str, list[str]]:
    """Everything of lab ``name`` that still exists anywhere on the machine."""
    state = STATE_ROOT / name
    mentions = re.compile(re.escape(str(state)) + r"(/|$)")
    procs = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if entry.name.isdigit() and any(mentions.search(a) for a in argv):
            procs.append(f"{entry.name}: {' '.join(argv)[:100]}")
    found = {
        "namespaces": [ns for ns in netns.listed() if ns.startswith(f"{name}-")],
        "etc_netns": [p.name for p in ETC_NETNS.glob(f"{name}-*")] if ETC_NETNS.is_dir() else [],
        "processes": procs,
        "state": [str(state)] if state.exists() else [],
    }
    return {k: v for k, v in found.items() if v}


def root_namespace() -> tuple[set[str], str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    # comments carry a timestamp and [packets:bytes] counters move with unrelated traffic
    rules = re.sub(
        r"\[\d+:\d+\]", "", "\n".join(ln for ln in rules.splitlines() if not ln.startswith("#"))
    )
    return names, rules


def lab_name() -> str:
    return f"l{netns.unique_suffix()}"


def cli(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TENCRYPT, "lab", "--name", name, *args], capture_output=True, text=True, timeout=120
    )


def test_down_leaves_nothing_behind() -> None:
    lab = Lab(lab_name())
    links_before, rules_before = root_namespace()
    try:
        lab.up()
        present = leftovers(lab.name)
        assert len(present["namespaces"]) == 5 and len(present["etc_netns"]) == 4
        assert len(present["processes"]) == 5  # dnsmasq + 4 HTTP servers
        assert root_namespace()[0] == links_before  # nothing was ever made in the root ns
    finally:
        lab.down()
    assert leftovers(lab.name) == {}
    links_after, rules_after = root_namespace()
    assert rules_after == rules_before
    assert not {p.host_if for p in lab.pods.values()} & links_after


def test_up_on_a_dirty_host_starts_clean() -> None:
    first = Lab(lab_name())
    try:
        first.up()
        old = [int(first.pid_file(f"{p}.http").read_text()) for p in first.pods]
        second = Lab(first.name, nodes=2)  # same name, other shape, no down in between
        second.up()
        assert leftovers(first.name)["namespaces"] == sorted(
            [n.netns for n in second.nodes.values()] + [p.netns for p in second.pods.values()]
        )
        assert len(leftovers(first.name)["processes"]) == 6  # 2 dnsmasq + 4 HTTP
        assert not [pid for pid in old if procs.alive(pid)]
        got = curl(second, "nginx1", "http://nginx2:8080/")
        assert (got.returncode, got.stdout) == (0, "Hello from nginx2 (myproject)\n")
        assert Lab.load(first.name).nodes == second.nodes
    finally:
        first.down()
    assert leftovers(first.name) == {}


@pytest.mark.parametrize("lost", ["state file", "state dir"])
def test_down_without_the_state(lost: str) -> None:
    name = lab_name()
    assert cli(name, "up").returncode == 0
    state = STATE_ROOT / name
    if lost == "state file":
        (state / "state.json").unlink()
    else:
        subprocess.run(["rm", "-rf", str(state)], check=True)
    assert leftovers(name).get("namespaces")  # the lab still runs
    got = cli(name, "down")
    assert got.returncode == 0, got.stderr
    assert leftovers(name) == {}


def test_down_after_up_was_killed_half_way(tmp_path: Path) -> None:
    name = lab_name()
    # more pods than the default, so that there is time to kill it between two of them
    pods = [{"name": f"pod{i}", "project": "p" + str(i % 2)} for i in range(12)]
    config = tmp_path / "topology.json"
    config.write_text(json.dumps({"pods": pods}))
    up = subprocess.Popen(
        [*TENCRYPT, "lab", "--name", name, "up", "--nodes", "2", "--config", str(config)],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        netns.wait_for(
            lambda: netns.exists(f"{name}-pod1") or up.poll() is not None,
            timeout=60,
            interval=0.01,
            what="up to build its second pod",
        )
    finally:
        os.killpg(up.pid, signal.SIGKILL)  # up and whatever `ip` it was running
        up.wait()
    state = json.loads((STATE_ROOT / name / "state.json").read_text())
    assert state["phase"] == "building", "up finished before it could be killed"
    assert leftovers(name)["namespaces"]
    got = cli(name, "down")
    assert got.returncode == 0, got.stderr
    assert leftovers(name) == {}


def pod_network(lab: Lab, pod: str) -> dict[str, str]:
    """What `tencrypt setup` changes in a pod, as text."""
    views = {
        "links": ["ip", "-o", "link"],
        "routes": ["ip", "-4", "route", "show", "table", "all"],
        "rules": ["ip", "rule"],
        "resolv.conf": ["cat", "/etc/resolv.conf"],
    }
    text = {k: lab.exec(pod, argv).stdout for k, argv in views.items()}
    text["links"] = " ".join(line.split(":")[1].strip() for line in text["links"].splitlines())
    return text


def test_patch_runs_the_proxy_and_unpatch_restores_the_pod() -> None:
    lab = Lab(lab_name())
    try:
        lab.up()
        nginx1, nginx2 = lab.pod("nginx1"), lab.pod("nginx2")
        before = pod_network(lab, "nginx1")
        lab.patch("nginx1")
        pid = int(lab.pid_file("nginx1.tencrypt").read_text())
        assert proxy.proxies_in(nginx1.netns) == [pid]  # the launcher exec'ed into the proxy
        assert proxy.READY in lab.log_file("nginx1.tencrypt").read_text()
        assert "tenc0" in pod_network(lab, "nginx1")["links"]
        line = next(ln for ln in lab.status().splitlines() if ln.startswith("nginx1 "))
        assert line.endswith(f"yes (pid {pid})")
        with pytest.raises(UsageError, match="already patched"):
            lab.patch("nginx1")
        setup_state = Path(f"/run/tencrypt/netns-{os.stat(netns.NETNS_DIR / nginx1.netns).st_ino}")
        assert setup_state.is_dir()

        lab.unpatch("nginx1")
        assert proxy.proxies_in(nginx1.netns) == [] and not procs.alive(pid)
        assert pod_network(lab, "nginx1") == before
        assert not setup_state.exists()
        got = curl(lab, "nginx1", "http://nginx2:8080/")
        assert (got.returncode, got.stdout) == (0, "Hello from nginx2 (myproject)\n"), got.stderr

        lab.patch("nginx2", strict=False)  # left running: down must stop it and its state
        assert "not strict" in lab.log_file("nginx2.tencrypt").read_text()
        setup_state = Path(f"/run/tencrypt/netns-{os.stat(netns.NETNS_DIR / nginx2.netns).st_ino}")
        assert setup_state.is_dir()
    finally:
        lab.down()
    assert leftovers(lab.name) == {}
    assert not setup_state.exists()


def test_failed_up_removes_what_it_built() -> None:
    # VNI 2**24 passes the topology but the kernel refuses it: up fails after both nodes exist
    topology = Topology.from_dict({"pods": [{"name": "web", "project": "shop"}], "vni": 1 << 24})
    lab = Lab(lab_name(), topology, nodes=2)
    with pytest.raises(SetupError, match="invalid id"):
        lab.up()
    assert leftovers(lab.name) == {}
