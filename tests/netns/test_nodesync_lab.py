"""node-sync drives the lab under load: a Service's endpoint moves during an iperf3 stream
through real Tencrypt proxies, and the tunnel follows (issue 15). The proxies run standalone
(no membership): that is the path node-sync serves, sealing to ``VIP:1337`` and letting the
node's DNAT pick the pod; proxies fed by the agent resolve Services themselves
(tests/netns/test_services.py has their endpoint change under traffic).

    [nginx1]--veth--+                                   +--veth--[nginx2]   myproject,
      iperf3 -c     |   node1: br0 (tcpdump: all        |   iperf3 -s        all patched
      curl          |   but udp 1337), table inet       |
                    |   tencrypt programmed by          +--veth--[nginx3]
                    |   `tencrypt node-sync --netns     |   iperf3 -s
                    |   <lab>-node1 --backend nft`      |
                    |   watching the API double         |

The lab's Services are served by the Kubernetes API double (tests/kubefakes) as the objects a
cluster holds (``kubeobjects.lab_objects``); node-sync watches it through the real
``kubernetes`` client and programs node1 with its nft backend (the first sync full, the move a
partial one). While iperf3 streams (10 s, 50 Mbit/s) from nginx1 to a Service VIP, the
Service's EndpointSlice is rewritten to name another patched pod of the project:

- upload: Service nginx2 (172.30.0.12) moves nginx2 → nginx3, nginx1 sends;
- download (``iperf3 -R``): Service nginx3 (172.30.0.13) moves nginx3 → nginx2, the old pod
  sends. Once node-sync deleted the conntrack entry that un-NATed it to the VIP, the old pod's
  datagrams reach the client from its own IP. The client's proxy still opens them but keeps
  the VIP as the peer's endpoint (core/session.py rule 11: a peer reached through a VIP never
  roams, and its traffic from elsewhere does not keep the session alive), so the stale
  session is re-keyed through the VIP and later connections reach the new pod. Before that
  rule the proxy roamed to the old pod and the tunnel stayed there.

What must hold, and what cannot:
- A TCP connection is state in one pod's kernel. The stream that was running to nginx2 when
  its endpoint went away cannot continue on nginx3's TCP stack: nginx3 has no socket for it.
  So the old stream is not expected to survive the move; it must end (bounded: it is never
  left hanging) and leak nothing in the clear while it ends. Seen in the upload case: the
  new pod drops the old session's datagrams (unknown_index, ~200), the client's proxy finds
  the session stale (5 s without an answer) and shakes hands again through the VIP, and the
  new pod's kernel answers the old connection's next segment with a reset: iperf3 ends with
  "Connection reset by peer" ~6.5 s after the move.
- The tunnel follows: connections opened after the move reach nginx3 (curl is answered "Hello
  from nginx3", a second iperf3 stream is received by nginx3's server), and nginx3's proxy
  opens the datagrams (its opened count grows).
- node-sync moved the rule in one partial sync and deleted the conntrack entry that pinned
  the tunnel's UDP flow (client:1337 → VIP:1337) to nginx2: afterwards no UDP entry for the
  VIP is DNATed to nginx2, and the one the tunnel uses is DNATed to nginx3.
- Nothing but sealed UDP :1337 crosses the bridge between the pods: a capture of everything
  else holds no TCP of iperf3 or HTTP, no iperf3 payload pattern and no request marker.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tencrypt.lab.cluster import Lab
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.linux import netns
from tencrypt.nodesync import nftrules
from tencrypt.nodesync.kubeobjects import build_endpoint_slice, lab_objects, stable_uid
from tests.kubefakes.fakeapi import FakeApiServer
from tests.netns.conftest import built_lab, curl, metrics

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
MARKER = "tencrypt-nodesync-move-9b2e"
IPERF_PORT = 5201
STREAM_SECONDS = 10
RATE = "50M"  # bounded: the stream is load, not a benchmark, and the capture stays small
# iperf3 --repeating-payload fills every buffer with "0123456789" repeated
PAYLOAD = b"0123456789" * 4
OPENED = "tencrypt_packets_opened_total"
UNKNOWN_INDEX = 'tencrypt_drops_total{reason="unknown_index"}'


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab of its own per case: what one move leaves behind (the old stream's kernel sockets
    retransmitting, now between pod IPs) makes direct sessions whose conntrack entries clash
    with the next case's VIP sessions - standalone's known limit (a pod reached through a
    Service cannot also be reached by its pod IP) - and would decide the next case."""
    topology = Topology(
        pods=[
            PodSpec("nginx1", "myproject"),
            PodSpec("nginx2", "myproject"),
            PodSpec("nginx3", "myproject"),
        ]
    )
    with built_lab(1, topology, prefix="s") as lab:
        for pod in ("nginx2", "nginx3", "nginx1"):
            lab.patch(pod, members=False)  # standalone: the VIP path node-sync serves
        yield lab


class NodeSync:
    """``python -m tencrypt.nodesync`` watching ``api`` and programming the lab's node1."""

    def __init__(self, lab: Lab, api: FakeApiServer, tmp: Path) -> None:
        self.log = tmp / "node-sync.log"
        argv = [
            sys.executable,
            "-m",
            "tencrypt.nodesync",
            "--netns",
            lab.nodes["node1"].netns,
            "--backend",
            "nft",
            "--log-level",
            "debug",
            "--kubeconfig",
            str(api.write_kubeconfig(tmp / "kubeconfig")),
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def programmed(lab: Lab) -> set[tuple[str, str]]:
    """(VIP, endpoint) pairs node1's table inet tencrypt forwards."""
    proc = lab.exec("node1", ["nft", "list", "table", "inet", "tencrypt"], check=False)
    return nftrules.pairs(nftrules.parse_listing(proc.stdout)) if proc.returncode == 0 else set()


def udp_flows_to(lab: Lab, vip: str) -> list[str]:
    """node1's UDP conntrack entries whose original destination is ``vip``:1337."""
    proc = lab.exec(
        "node1",
        ["conntrack", "-L", "-p", "udp", "--orig-dst", vip, "--orig-port-dst", "1337"],
        check=False,
    )
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("udp")]


def opened(lab: Lab, pod: str) -> float:
    """Datagrams ``pod``'s proxy opened (authenticated, accepted) so far."""
    return metrics(lab, pod).get(OPENED, 0.0)


def iperf_client(
    lab: Lab, vip: str, seconds: int, log: Path, reverse: bool = False
) -> subprocess.Popen[bytes]:
    argv = ["iperf3", "-c", vip, "-p", str(IPERF_PORT), "-t", str(seconds), "-b", RATE]
    argv += ["-R"] if reverse else []
    argv += ["-J", "--repeating-payload", "--connect-timeout", "5000"]
    return netns.spawn(lab.pod("nginx1").netns, argv, log=log)


def iperf_report(log: Path) -> dict:
    text = log.read_text(errors="replace")
    return json.loads(text[text.index("{") :]) if "{" in text else {"error": text}


@pytest.mark.parametrize(
    ("direction", "service", "target"),
    [
        ("upload", "nginx2", "nginx3"),
        ("download", "nginx3", "nginx2"),
    ],
)
def test_endpoint_moves_under_an_iperf3_stream_and_the_tunnel_follows(
    lab, capture, tmp_path, direction, service, target
):
    n2, n3 = lab.pod(service), lab.pod(target)
    reverse = direction == "download"
    vip = n2.vip  # Service myproject/<service>, moving from its own pod to <target>
    api = FakeApiServer(lab_objects(lab.services))
    api.start()
    sync = NodeSync(lab, api, tmp_path)
    servers = {
        pod: netns.spawn(lab.pod(pod).netns, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        for pod in ("nginx2", "nginx3")
    }
    logs = {name: tmp_path / f"iperf3-{name}.json" for name in ("old", "new")}
    clients: list[subprocess.Popen[bytes]] = []
    try:
        netns.wait_for(lambda: "(full sync" in sync.text(), timeout=30, what="the first sync")
        assert programmed(lab) >= {(vip, n2.ip)}
        for pod in servers:
            netns.wait_for(
                lambda p=pod: f":{IPERF_PORT}" in lab.exec(p, ["ss", "-ltn"]).stdout,
                what=f"iperf3 -s in {pod}",
            )
        node = lab.nodes["node1"]
        with capture(node.netns, node.bridge, "not udp port 1337", seconds=90) as cap:
            before = {p: opened(lab, p) for p in ("nginx2", "nginx3")}
            old = iperf_client(lab, vip, STREAM_SECONDS, logs["old"], reverse)
            clients.append(old)
            netns.wait_for(
                lambda: opened(lab, n2.name) > before[n2.name] + 1000,
                timeout=15,
                what=f"the stream to reach {n2.name} through the tunnel",
            )
            pinned = udp_flows_to(lab, vip)
            assert any(f"src={n2.ip}" in ln for ln in pinned), pinned
            # the move: the Service's one EndpointSlice now names nginx3 (the same slice,
            # MODIFIED, as the EndpointSlice controller writes it)
            suffix = stable_uid(n2.project, service)[:5]
            api.put(build_endpoint_slice(n2.project, service, [n3.ip], suffix=suffix))
            netns.wait_for(
                lambda: (vip, n3.ip) in programmed(lab) and (vip, n2.ip) not in programmed(lab),
                timeout=30,
                what=f"node-sync to move the VIP to {n3.name}",
            )
            moved_at, t_moved = opened(lab, n3.name), time.monotonic()
            old.wait(timeout=STREAM_SECONDS + 60)  # bounded: iperf3 ends by itself
            old_took = time.monotonic() - t_moved
            n3_drops = metrics(lab, n3.name)
            # after the move: a new request and a new stream, both to the VIP
            page = curl(lab, "nginx1", f"http://{vip}:8080/", MARKER)
            new = iperf_client(lab, vip, 3, logs["new"], reverse)
            clients.append(new)
            new_rc = new.wait(timeout=60)
        after = opened(lab, n3.name)
        flows = udp_flows_to(lab, vip)
        log = sync.text()
    finally:
        for proc in [*clients, *servers.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        sync.stop()
        api.stop()

    old_report = iperf_report(logs["old"])
    print(
        f"\n{direction}: the old stream ended {old_took:.1f} s after the move:",
        old_report.get("error")
        or f"completed, {old_report['end']['sum_received']['bytes']} bytes received",
        f"; {n3.name} dropped {n3_drops.get(UNKNOWN_INDEX, 0):.0f} datagrams of the old "
        f"session; after the move the VIP answered {page.stdout.strip()!r}; flows {flows}",
    )
    # nothing in the clear on the bridge, whatever happened to the streams
    frames = cap.frames()
    pods = {n2.ip, n3.ip, lab.pod("nginx1").ip, vip}
    leaked = [f for f in frames if f.proto in (6, 17) and f.src in pods and f.dst in pods]
    assert leaked == [], leaked[:5]
    assert PAYLOAD not in cap.data and MARKER.encode() not in cap.data
    # node-sync: one full sync at start, the move as one partial sync, and the UDP flow that
    # pinned the tunnel to the old pod deleted from conntrack by it
    assert log.count("(full sync") == 1 and "(partial sync" in log, log
    forgot = rf"forgot [1-9]\d* UDP flows {re.escape(vip)}:1337 -> {re.escape(n2.ip)}$"
    assert re.search(forgot, log, re.MULTILINE), log
    # the old stream ended (bounded by the wait above): reset by the new pod's kernel once
    # its segments reached it (iperf3 says "reset", or "Broken pipe" when it wrote to the
    # connection after the reset), or completed; never hung
    error = old_report.get("error", "")
    assert not error or "reset" in error or "Broken pipe" in error, error
    # the tunnel follows: new connections are served by the new pod, through its proxy,
    # and the tunnel's UDP flow to the VIP is DNATed to the new pod only (the entry that
    # pinned it to the old one was deleted)
    assert page.returncode == 0 and f"Hello from {n3.name}" in page.stdout, page.stderr
    report = iperf_report(logs["new"])
    assert new_rc == 0 and "error" not in report, report.get("error")
    assert report["end"]["sum_received"]["bytes"] > 0
    assert after > moved_at
    assert flows and not [ln for ln in flows if f"src={n2.ip}" in ln], flows
    assert any(f"src={n3.ip}" in ln for ln in flows), flows
