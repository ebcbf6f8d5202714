"""Services as Kubernetes defines them, through the tunnel (issue 21): one endpoint per
connection, port != targetPort (by number and by name, resolved per pod), several Services in
front of one pod, pod IP after a Service, a headless Service, endpoints changing under
traffic, ClientIP affinity, and a Service CIDR setup did not route reported loudly.

    [nginx1] client ---+                       +--- [nginx2] :8080 (http, app)
                       |  node1 br0, kube-proxy-style random DNAT per connection
    [cakephp] project2-+                       +--- [nginx3] :8080 (http), :9090 (app)
    Services of myproject (plus each pod's own, port 8080):
      web    80 -> targetPort "app"  : nginx2 (8080), nginx3 (9090)
      alt    81 -> targetPort 8080   : nginx2
      front  80 -> targetPort "http" : nginx2         (a second Service in front of it)
      sticky 80 -> "http", ClientIP  : nginx2, nginx3
      db     headless                : nginx3

Every sealed check also captures the node's bridge and asserts the request's marker never
crossed it in the clear.
"""

from __future__ import annotations

import collections
import re
import secrets
from collections.abc import Iterator

import pytest

from tencrypt.lab.capture import Capture
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS, proxy_pid
from tencrypt.lab.topology import PodSpec, ServiceSpec, Topology
from tencrypt.linux.netns import wait_for
from tests.netns.conftest import built_lab

pytestmark = pytest.mark.netns

TOPOLOGY = Topology(
    pods=[
        PodSpec("nginx1", "myproject"),
        PodSpec("nginx2", "myproject", ports={"http": 8080, "app": 8080}),
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
        ServiceSpec(
            "alt", "myproject", ["nginx2"], [{"name": "h", "port": 81, "targetPort": 8080}]
        ),
        ServiceSpec("front", "myproject", ["nginx2"]),
        ServiceSpec("sticky", "myproject", ["nginx2", "nginx3"], affinity=600),
        ServiceSpec("db", "myproject", ["nginx3"], headless=True),
    ],
)
HELLO = re.compile(r"Hello from (\w+)")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(1, TOPOLOGY, prefix="s") as built:
        yield built


def patched(lab: Lab, *pods: str) -> None:
    """Exactly ``pods`` of myproject patched, each proxy fresh (no session, no flow)."""
    for name in ("nginx1", "nginx2", "nginx3"):
        if proxy_pid(lab, lab.pod(name)):
            lab.unpatch(name)
    lab.exec("node1", ["conntrack", "-F"], check=False)
    for name in pods:
        lab.patch(name)


def get(lab: Lab, url: str, pod: str = "nginx1", marker: str = "", timeout: int = 10) -> str | None:
    """Who answered ``url`` from ``pod`` (a pod name), or None if it failed."""
    proc = lab.exec(
        pod,
        ["curl", "-sS", "--max-time", str(timeout), "-H", f"X-Marker: {marker or 'm'}", url],
        check=False,
        timeout=timeout + 15,
    )
    found = HELLO.search(proc.stdout)
    return found.group(1) if proc.returncode == 0 and found else None


def many(lab: Lab, url: str, n: int) -> collections.Counter[str | None]:
    """``n`` new connections, in one process (one ``curl`` per connection would cost a
    namespace entry each): who answered each."""
    script = (
        f'for i in $(seq {n}); do curl -sS --max-time 5 -H "X-Marker: $MARKER" {url} '
        "|| echo FAILED; echo; done"
    )
    marker = f"tencrypt-lb-{secrets.token_hex(4)}"
    proc = lab.exec("nginx1", ["env", f"MARKER={marker}", "sh", "-c", script], timeout=n * 6 + 30)
    answers = [m.group(1) for m in HELLO.finditer(proc.stdout)]
    return collections.Counter(answers + [None] * proc.stdout.count("FAILED"))


def sealed_on_the_bridge(lab: Lab, action, marker: str) -> object:
    """Run ``action``; assert ``marker`` never crossed the bridge in the clear and nothing but
    UDP :1337 went between myproject's pods."""
    node = lab.nodes["node1"]
    project = {p.ip for p in lab.pods.values() if p.project == "myproject"}
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        result = action()
        frames = cap.stop()
    assert marker.encode() not in cap.data
    between = [f for f in frames if f.src in project and f.dst in project]
    assert between and all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in between)
    return result


def metric(lab: Lab, pod: str, name: str) -> float:
    text = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"]).stdout
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rpartition(" ")[2])
    return 0.0


@pytest.mark.parametrize("patch", [False, True], ids=["unpatched", "patched"])
def test_forty_new_connections_spread_over_both_replicas(lab: Lab, patch: bool):
    patched(lab, *(("nginx1", "nginx2", "nginx3") if patch else ()))
    if patch:
        seen = sealed_on_the_bridge(lab, lambda: many(lab, "http://web/", 40), "tencrypt-lb-")
    else:
        seen = many(lab, "http://web/", 40)
    assert seen[None] == 0, seen
    assert seen["nginx2"] >= 8 and seen["nginx3"] >= 8, seen  # each replica >= 20 %
    print(f"\n40 connections to web ({'patched' if patch else 'unpatched'}): {dict(seen)}")


def test_port_to_target_port_by_number_and_by_name_by_name_and_literal_vip(lab: Lab):
    patched(lab, "nginx1", "nginx2", "nginx3")
    alt, web = (lab.services_by_name[n].vip for n in ("alt", "web"))
    marker = f"tencrypt-tp-{secrets.token_hex(4)}"

    def calls() -> list[str | None]:
        return [
            get(lab, "http://alt:81/", marker=marker),
            get(lab, f"http://{alt}:81/", marker=marker),
            get(lab, "http://web/", marker=marker),  # 80 -> "app": 8080 on nginx2, 9090 on nginx3
            get(lab, f"http://{web}/", marker=marker),
        ]

    answers = sealed_on_the_bridge(lab, calls, marker)
    assert answers[:2] == ["nginx2", "nginx2"] and None not in answers, answers
    # a port the Service does not list: refused at once (port unreachable), as kube-proxy does
    proc = lab.exec(
        "nginx1", ["curl", "-sS", "--max-time", "5", f"http://{alt}:8080/"], check=False
    )
    assert proc.returncode == 7, proc.stderr  # connection refused, not a time-out
    assert metric(lab, "nginx1", 'tencrypt_drops_total{reason="service_no_endpoint"}') >= 1


@pytest.mark.parametrize(
    "first", ["nginx2:8080", "front"], ids=["own-then-front", "front-then-own"]
)
def test_two_services_in_front_of_one_pod_in_both_orders(lab: Lab, first: str):
    patched(lab, "nginx1", "nginx2")
    second = "front" if first == "nginx2:8080" else "nginx2:8080"
    assert get(lab, f"http://{first}/") == "nginx2"
    assert get(lab, f"http://{second}/") == "nginx2"
    assert metric(lab, "nginx2", 'tencrypt_drops_total{reason="claim_rebind"}') == 0


@pytest.mark.parametrize(
    ("caller", "callee"),
    [("nginx1", "nginx2"), ("nginx2", "nginx1")],
    ids=["client-to-server-pod-ip", "server-back-to-client-pod-ip"],
)
def test_a_pod_ip_is_reached_after_a_session_through_a_service(lab: Lab, caller, callee):
    patched(lab, "nginx1", "nginx2")
    marker = f"tencrypt-vp-{secrets.token_hex(4)}"

    def calls() -> tuple[str | None, str | None]:
        return (
            get(lab, "http://front/", marker=marker),
            get(lab, f"http://{lab.pod(callee).ip}:8080/", pod=caller, marker=marker),
        )

    assert sealed_on_the_bridge(lab, calls, marker) == ("nginx2", callee)


GET_FROM_PORT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(5)
s.bind(("", int(sys.argv[3])))
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode(errors="replace").splitlines()[-1])
"""


def test_the_same_source_port_to_a_service_then_straight_to_its_pod(lab: Lab):
    """The kernel picks source ports per destination, so one port may go to a cluster IP and,
    a moment later, to the pod behind it: the same tuple on the wire. The second connection
    must get its own answers (conntrack.py rule 8), not the closed Service flow's."""
    patched(lab, "nginx1", "nginx2")
    front, nginx2 = lab.services_by_name["front"].vip, lab.pod("nginx2").ip
    answers = [
        lab.exec("nginx1", ["python3", "-c", GET_FROM_PORT, host, str(port), "45123"], check=False)
        for host, port in ((front, 80), (nginx2, 8080))
    ]
    assert [a.stdout.strip() for a in answers] == ["Hello from nginx2 (myproject)"] * 2, [
        a.stderr[-300:] for a in answers
    ]
    assert metric(lab, "nginx1", "tencrypt_service_flows_reused_total") == 1


def test_a_headless_service_reaches_its_pod_by_pod_ip_sealed(lab: Lab):
    patched(lab, "nginx1", "nginx3")
    marker = f"tencrypt-hl-{secrets.token_hex(4)}"
    resolved = lab.exec("nginx1", ["getent", "hosts", "db"]).stdout.split()[0]
    assert resolved == lab.pod("nginx3").ip
    assert (
        sealed_on_the_bridge(lab, lambda: get(lab, "http://db:8080/", marker=marker), marker)
        == "nginx3"
    )


def test_an_endpoint_removed_under_traffic_gets_no_new_connection(lab: Lab):
    patched(lab, "nginx1", "nginx2", "nginx3")
    try:
        assert set(many(lab, "http://web/", 20)) == {"nginx2", "nginx3"}
        loads = metric(lab, "nginx1", "tencrypt_membership_loads_total")
        lab.set_endpoints("web", ["nginx2"])
        # the proxy reads the agent's file within its sweep (a second); connections started
        # meanwhile still reach nginx3, which keeps serving while it terminates
        wait_for(
            lambda: metric(lab, "nginx1", "tencrypt_membership_loads_total") > loads,
            timeout=10,
            what="nginx1's proxy to load the new membership",
        )
        seen = many(lab, "http://web/", 20)
        assert seen == {"nginx2": 20}, seen
    finally:
        lab.set_endpoints("web", ["nginx2", "nginx3"])


def test_client_ip_affinity_keeps_one_replica(lab: Lab):
    patched(lab, "nginx1", "nginx2", "nginx3")
    seen = many(lab, "http://sticky/", 20)
    assert len(seen) == 1 and None not in seen, seen


def test_a_service_cidr_setup_did_not_route_is_reported_loudly(lab: Lab):
    patched(lab)
    try:
        lab.patch("nginx1", setup_args=("--service-cidr", "10.96.0.0/12"))
        log = lab.log_file("nginx1.tencrypt").read_text()
        assert "ERROR" in log and "Service CIDR mismatch" in log and "172.30.0.0/16" in log
        assert metric(lab, "nginx1", "tencrypt_service_cidr_mismatch") == 1
    finally:
        patched(lab)
