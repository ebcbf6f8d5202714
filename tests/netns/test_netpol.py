"""NetworkPolicy keeps its meaning inside an encrypted project (issue 23).

The lab's nodes enforce the policies as a CNI would (lab/netpolicy.py: nft in the forward
hook, replies pass, a removed rule ends its connections); the lab hands each patched pod's
proxy its policy as the agent would. Every scenario runs unpatched first, then with nginx1,
nginx2 and nginx3 patched, and must have the same outcome: who may open which connection.

    nginx1 172.17.0.11  client      nginx2 172.17.0.12  server: http 8080, app 9090, alt 9091
    nginx3 172.17.0.14  client      cakephp (project2)  another project's client
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tencrypt.lab import netpolicy
from tencrypt.lab.capture import Capture
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS, members_file, proxy_pid
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.linux.netns import wait_for
from tests.netns.conftest import built_lab

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
TUNNEL_EXAMPLE = ROOT / "scripts" / "k8s" / "networkpolicy-tunnel.yaml"
TOPOLOGY = Topology(
    pods=[
        PodSpec("nginx1", "myproject"),
        PodSpec("nginx2", "myproject", ports={"http": 8080, "app": 9090, "alt": 9091}),
        PodSpec("cakephp", "project2"),
        PodSpec("nginx3", "myproject"),
    ],
)
CLIENTS = ("nginx1", "nginx3")


def policy(name: str, selector: str | None, types: list[str], **rules: object) -> dict:
    spec: dict[str, object] = {
        "podSelector": {"matchLabels": {"app": selector}} if selector else {},
        "policyTypes": types,
        **rules,
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "myproject"},
        "spec": spec,
    }


def from_pods(*apps: str) -> list[dict]:
    return [{"podSelector": {"matchLabels": {"app": a}}} for a in apps]


def tunnel_example() -> list[dict]:
    """scripts/k8s's ready-to-apply policy, as `kubectl apply -n myproject` would make it."""
    docs = [d for d in yaml.safe_load_all(TUNNEL_EXAMPLE.read_text()) if d]
    for d in docs:
        d["metadata"]["namespace"] = "myproject"
    return docs


ONLY_NGINX1_ON_8080 = policy(
    "nginx2-from-nginx1",
    "nginx2",
    ["Ingress"],
    ingress=[{"from": from_pods("nginx1"), "ports": [{"protocol": "TCP", "port": 8080}]}],
)


@pytest.fixture(scope="module", params=["unpatched", "patched"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The lab, first with no proxy, then with nginx1, nginx2 and nginx3 patched."""
    with built_lab(1, TOPOLOGY, prefix="np") as built:
        if request.param == "patched":
            for name in ("nginx1", "nginx2", "nginx3"):
                built.patch(name)
        yield built
        built.set_network_policies([])


def apply(lab: Lab, policies: list[dict]) -> None:
    """The policies in force everywhere: the nodes at once, and every patched proxy once it
    loaded the membership file that carries them (it polls the file every second)."""
    lab.set_network_policies(policies)
    for pod in lab.pods.values():
        if proxy_pid(lab, pod):
            want = json.loads(members_file(lab, pod).read_text())["generation"]
            wait_for(
                lambda p=pod.name, w=want: status(lab, p)["membership"]["generation"] == w,
                timeout=15,
                what=f"{pod.name}'s proxy to load its new NetworkPolicy",
            )


def patched(lab: Lab) -> bool:
    return proxy_pid(lab, lab.pod("nginx2")) is not None


def status(lab: Lab, pod: str) -> dict:
    out = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"]).stdout
    return json.loads(out)


def metric(lab: Lab, pod: str, name: str) -> float:
    text = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"]).stdout
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name if "{" in name else (name + " ", name + "{"))
    )


def curl(lab: Lab, src: str, url: str, timeout: int = 3) -> int:
    """curl's exit code for ``url`` from ``src`` (0: it answered 200)."""
    proc = lab.exec(
        src,
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(timeout), url],
        check=False,
        timeout=timeout + 15,
    )
    if proc.returncode == 0 and proc.stdout != "200":
        return 22
    return proc.returncode


def reach(lab: Lab, src: str, url: str) -> bool:
    return curl(lab, src, url) == 0


def test_ingress_admits_nginx1_and_denies_nginx3_as_the_cni_does(lab: Lab):
    apply(lab, [ONLY_NGINX1_ON_8080, *tunnel_example()])
    nginx2 = lab.pod("nginx2")
    urls = [f"http://{nginx2.ip}:8080/", "http://nginx2:8080/"]  # its pod IP and its Service
    marker = f"tencrypt-np-{secrets.token_hex(4)}"
    node = lab.nodes["node1"]
    project = {p.ip for p in lab.pods.values() if p.project == "myproject"}
    denied_before = (
        metric(lab, "nginx2", "tencrypt_netpol_packets_denied_total") if patched(lab) else 0
    )
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        outcome = {
            (src, url): curl(lab, src, f"{url}?{marker}") == 0
            for src in (*CLIENTS, "cakephp")
            for url in urls
        }
        frames = cap.stop()
    assert outcome == {
        ("nginx1", urls[0]): True,
        ("nginx1", urls[1]): True,
        ("nginx3", urls[0]): False,
        ("nginx3", urls[1]): False,
        ("cakephp", urls[0]): False,  # another project: the CNI's, patched or not
        ("cakephp", urls[1]): False,
    }, outcome
    if patched(lab):
        # the receiving proxy dropped nginx3's attempts, counted by policy and by peer
        assert metric(lab, "nginx2", "tencrypt_netpol_packets_denied_total") > denied_before
        denied = status(lab, "nginx2")["network_policy"]["denied_by_peer"]
        assert denied.get(lab.pod("nginx3").ip, 0) > 0, denied
        allowed = (
            'tencrypt_netpol_flows_allowed_total{direction="ingress",policy="nginx2-from-nginx1"'
        )
        assert metric(lab, "nginx2", allowed) >= 2
        # and nothing of the project's went over the bridge in the clear
        assert marker.encode() not in cap.data
        between = [f for f in frames if f.src in project and f.dst in project]
        assert between and all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in between)
    else:
        assert netpolicy.counters(lab, "node1")["ingress_nginx2"] > 0


def test_a_named_port_and_an_end_port_range(lab: Lab):
    apply(
        lab,
        [
            policy(
                "nginx2-ports",
                "nginx2",
                ["Ingress"],
                ingress=[
                    {"from": from_pods("nginx1"), "ports": [{"port": "app"}]},
                    {"from": from_pods("nginx3"), "ports": [{"port": 9000, "endPort": 9100}]},
                ],
            ),
            *tunnel_example(),
        ],
    )
    ip = lab.pod("nginx2").ip
    outcome = {
        (src, port): reach(lab, src, f"http://{ip}:{port}/")
        for src in CLIENTS
        for port in (8080, 9090, 9091)
    }
    assert outcome == {
        ("nginx1", 8080): False,
        ("nginx1", 9090): True,  # "app" is 9090 on nginx2
        ("nginx1", 9091): False,
        ("nginx3", 8080): False,
        ("nginx3", 9090): True,  # 9000..9100
        ("nginx3", 9091): True,
    }, outcome


def test_egress_is_denied_by_the_sender(lab: Lab):
    apply(
        lab,
        [
            policy(
                "nginx1-out",
                "nginx1",
                ["Egress"],
                egress=[
                    {"to": from_pods("nginx3")},
                    # DNS, and the tunnel's port as the example says for egress
                    {
                        "ports": [
                            {"protocol": p, "port": n} for p in ("UDP", "TCP") for n in (53, 1337)
                        ]
                    },
                ],
            ),
        ],
    )
    denied_at_nginx2 = (
        metric(lab, "nginx2", "tencrypt_netpol_packets_denied_total") if patched(lab) else 0
    )
    assert reach(lab, "nginx1", f"http://{lab.pod('nginx3').ip}:8080/")
    assert reach(lab, "nginx1", "http://nginx3:8080/")
    code = curl(lab, "nginx1", f"http://{lab.pod('nginx2').ip}:8080/")
    assert code != 0
    assert not reach(lab, "nginx1", "http://nginx2:8080/")
    if patched(lab):
        # refused at once by the sending proxy (ICMP administratively prohibited), never
        # sealed: curl says "could not connect", not a time-out
        assert code == 7
        assert metric(lab, "nginx1", 'tencrypt_netpol_packets_denied_total{direction="egress"') > 0
        # nothing was sealed for nginx2 to drop
        assert metric(lab, "nginx2", "tencrypt_netpol_packets_denied_total") == denied_at_nginx2


def test_a_policy_added_and_removed_during_traffic(lab: Lab):
    both = policy(
        "nginx2-from-clients",
        "nginx2",
        ["Ingress"],
        ingress=[{"from": from_pods(*CLIENTS), "ports": [{"protocol": "TCP", "port": 8080}]}],
    )
    apply(lab, [both, *tunnel_example()])
    lab.make_blob("nginx2", 8)
    # a small receive window, so that the reader's pace paces the sender: otherwise most of
    # the blob sits in nginx3's socket buffer a moment after it started
    rmem = lab.exec("nginx3", ["sysctl", "-n", "net.ipv4.tcp_rmem"]).stdout.split()
    lab.exec("nginx3", ["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 32768 65536"])
    # a download nginx3 may make, slowed to take ~8 s if nothing stops it
    download = subprocess.Popen(
        [
            "ip", "netns", "exec", lab.pod("nginx3").netns, "curl", "-sS", "-o", "/dev/null",
            "-w", "%{size_download}", "--limit-rate", "1M", "--max-time", "20",
            f"http://{lab.pod('nginx2').ip}:8080/blob",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(2)  # the download is under way (its bytes are checked below)
        apply(lab, [ONLY_NGINX1_ON_8080, *tunnel_example()])  # nginx3's allow rule removed
        if patched(lab):  # the receiving proxy blocked the download's flow
            assert status(lab, "nginx2")["network_policy"]["blocked_flows"] >= 1
        # new connections: nginx3 denied, nginx1 still allowed
        assert not reach(lab, "nginx3", f"http://{lab.pod('nginx2').ip}:8080/")
        assert reach(lab, "nginx1", f"http://{lab.pod('nginx2').ip}:8080/")
        out, _ = download.communicate(timeout=30)
    finally:
        download.kill()
        download.wait()
        lab.exec("nginx3", ["sysctl", "-qw", f"net.ipv4.tcp_rmem={' '.join(rmem)}"])
    # the download ended with the rule that allowed it: cut short (it stalls until curl's
    # --max-time), where it would have finished in ~8 s
    assert download.returncode == 28, download.returncode
    assert 0 < int(out or 0) < 8 << 20, out
    # the policy removed: nginx3 may again
    apply(lab, [])
    assert reach(lab, "nginx3", f"http://{lab.pod('nginx2').ip}:8080/")


def test_default_deny_with_and_without_the_tunnel_example(lab: Lab):
    default_deny = policy(
        "default-deny-but-http",
        None,
        ["Ingress"],
        ingress=[{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}],
    )
    apply(lab, [default_deny, *tunnel_example()])
    assert reach(lab, "nginx1", "http://nginx2:8080/")
    assert not reach(lab, "nginx1", f"http://{lab.pod('nginx2').ip}:9090/")
    apply(lab, [default_deny])  # without the tunnel port
    if not patched(lab):
        assert reach(lab, "nginx1", "http://nginx2:8080/")  # plaintext needs only 8080
        return
    # the CNI drops the tunnel: the outage the example prevents, and it is reported
    assert not reach(lab, "nginx1", "http://nginx2:8080/")
    assert metric(lab, "nginx2", "tencrypt_netpol_tunnel_blocked") >= 1
    blocked = status(lab, "nginx2")["network_policy"]["tunnel_blocked"]
    assert {"direction": "ingress", "policy": "default-deny-but-http"} in blocked
    log = lab.log_file("nginx2.tencrypt").read_text()
    assert "default-deny-but-http (ingress) drops the tunnel" in log

    # nginx1 keeps asking nginx2, which never answers: its status says so (once its session's
    # silence starts a handshake, as WireGuard's timers do)
    def unanswered() -> bool:
        lab.exec("nginx1", ["curl", "-s", "--max-time", "1", "http://nginx2:8080/"], check=False)
        peers = {p["pod_ip"]: p for p in status(lab, "nginx1")["peers"]}
        return peers.get(lab.pod("nginx2").ip, {}).get("unanswered_for") is not None

    wait_for(unanswered, timeout=60, interval=1, what="nginx1's status to show nginx2 unanswered")
    shown = lab.exec("nginx1", [str(ROOT / ".venv" / "bin" / "tencrypt"), "status"]).stdout
    assert "UNANSWERED" in shown or "handshaking" in shown, shown
