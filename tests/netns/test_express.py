"""The express lane (``tencrypt run --express``: core/express.py, tencrypt/_lane.c) on a
one-node lab, every proxy with the lane on:

    [nginx1] client --+   node1 br0   +-- [nginx2] :8080 http, :7000 echo
                      |               +-- [nginx3] :8080 http
    Services of myproject: web 80 -> 8080 (nginx2, nginx3), echo 7000 -> 7000 (nginx2)

- curl through ``web`` and 40 new connections spread over both replicas, nothing in the clear
  on the bridge, and the lanes took packets both ways (``/status`` ``express``);
- replayed, flipped and forged copies of captured data messages: one counted drop each;
- a request/response stream through ``echo`` across several re-keys (a short
  ``--session-lifetime``): no request lost, the lane carried most of it, and its packets
  woke the proxies straight into C (the lane's ``wait``, ``woken_in_c``);
- ping (ICMP echo) from nginx1 to nginx2's pod IP and to ``web``'s cluster IP: every reply
  back, the lanes of both ends took the requests and the replies, no clear ICMP on the bridge;
  most of the client's were admitted under a lease (core/express.py rule 6: ``leased_*``).
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import sys
import time
from collections.abc import Iterator

import pytest

from tencrypt.lab.capture import Capture
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS
from tencrypt.lab.topology import PodSpec, ServiceSpec, Topology
from tencrypt.linux import netns
from tests.netns.conftest import (
    built_lab,
    forgeries_are_counted,
    line_echo_client,
    line_echo_server,
    metrics,
)

pytestmark = pytest.mark.netns

LIFETIME = 6.0  # --session-lifetime: re-key after 4 s
ECHO_PORT = 7000
TOPOLOGY = Topology(
    pods=[
        PodSpec("nginx1", "myproject"),
        PodSpec("nginx2", "myproject", ports={"http": 8080}),
        PodSpec("nginx3", "myproject", ports={"http": 8080}),
    ],
    services=[
        ServiceSpec(
            "web",
            "myproject",
            ["nginx2", "nginx3"],
            [{"name": "h", "port": 80, "targetPort": 8080}],
        ),
        ServiceSpec(
            "echo",
            "myproject",
            ["nginx2"],
            [{"name": "e", "port": ECHO_PORT, "targetPort": ECHO_PORT}],
        ),
    ],
)
HELLO = re.compile(r"Hello from (\w+)")
MARKER = f"tencrypt-express-{secrets.token_hex(4)}"

ECHO_SERVER = line_echo_server(ECHO_PORT)

ECHO_CLIENT = line_echo_client(ECHO_PORT, MARKER)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(1, TOPOLOGY, prefix="x") as built:
        for pod in ("nginx1", "nginx2", "nginx3"):
            built.patch(pod, run_args=("--express", "--session-lifetime", str(LIFETIME)))
        yield built


def status(lab: Lab, pod: str) -> dict:
    out = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"]).stdout
    return json.loads(out)


def express(lab: Lab, pod: str) -> dict:
    doc = status(lab, pod).get("express")
    assert doc is not None, f"{pod}: the lane is off"
    return doc


def many(lab: Lab, url: str, n: int) -> collections.Counter[str | None]:
    script = (
        f'for i in $(seq {n}); do curl -sS --max-time 5 -H "X-Marker: {MARKER}" {url} '
        "|| echo FAILED; echo; done"
    )
    proc = lab.exec("nginx1", ["sh", "-c", script], timeout=n * 6 + 30)
    answers = [m.group(1) for m in HELLO.finditer(proc.stdout)]
    return collections.Counter(answers + [None] * proc.stdout.count("FAILED"))


def sealed_on_the_bridge(lab: Lab, action):  # type: ignore[no-untyped-def]
    node = lab.nodes["node1"]
    project = {p.ip for p in lab.pods.values() if p.project == "myproject"}
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        result = action()
        frames = cap.stop()
    assert MARKER.encode() not in cap.data and MARKER.upper().encode() not in cap.data
    between = [f for f in frames if f.src in project and f.dst in project]
    assert between and all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in between)
    return result


def test_forty_connections_through_a_service_spread_sealed_and_the_lane_takes_them(lab: Lab):
    before = {p: express(lab, p) for p in ("nginx1", "nginx2", "nginx3")}
    seen = sealed_on_the_bridge(lab, lambda: many(lab, "http://web/", 40))
    assert seen[None] == 0, seen
    assert seen["nginx2"] >= 8 and seen["nginx3"] >= 8, seen
    after = {p: express(lab, p) for p in before}
    print(f"\n40 connections to web: {dict(seen)}; lanes: {after}")
    assert after["nginx1"]["sealed"] > before["nginx1"]["sealed"]  # requests' later segments
    assert after["nginx1"]["opened"] > before["nginx1"]["opened"]  # replies -> the VIP
    for server in ("nginx2", "nginx3"):
        assert after[server]["sealed"] > before[server]["sealed"]


def test_replayed_flipped_and_forged_datagrams_are_one_counted_drop_each(lab: Lab):
    n1 = lab.pod("nginx1")
    node = lab.nodes["node1"]
    with Capture(node.netns, node.bridge, f"udp and dst host {n1.ip} and dst port 1337") as cap:
        assert many(lab, "http://web/", 3)[None] == 0
        cap.stop()
    data = [f.raw[14 + 28 :] for f in cap.frames() if f.raw[14 + 28 : 14 + 29] == b"\x04"]
    assert data, "no data messages captured"
    forgeries_are_counted(lab, "nginx1", "node1", n1.ip, data)


def test_a_stream_across_re_keys_loses_nothing_and_rides_the_lane(lab: Lab):
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")
    before = {p: (metrics(lab, p), express(lab, p)) for p in ("nginx1", "nginx2")}
    server = netns.spawn(n2.netns, [sys.executable, "-c", ECHO_SERVER])
    log = lab.log_file("express-echo")
    try:
        time.sleep(0.5)  # the server listens
        seconds = 3 * LIFETIME

        def run() -> dict:
            client = netns.spawn(
                n1.netns, [sys.executable, "-c", ECHO_CLIENT, "echo", str(seconds)], log=log
            )
            assert client.wait(timeout=seconds + 60) == 0, log.read_text()[-2000:]
            return dict(json.loads(log.read_text().strip().splitlines()[-1]))

        result = sealed_on_the_bridge(lab, run)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert result["error"] == "" and result["ok"] > 100, result
    for pod in ("nginx1", "nginx2"):
        m0, e0 = before[pod]
        m1, e1 = metrics(lab, pod), express(lab, pod)
        made = sum(
            m1.get(f"tencrypt_handshakes_{k}_total", 0)
            - m0.get(f"tencrypt_handshakes_{k}_total", 0)
            for k in ("completed", "responded")
        )
        took = e1["sealed"] - e0["sealed"]
        print(f"\n{pod}: {result['ok']} requests, {made:.0f} sessions made, lane sealed {took}")
        assert made >= 2  # re-keys happened during the stream
        assert took >= result["ok"] // 2  # most requests (or replies) took the lane
        # the loop's epoll call is the lane's wait (linux/spin.py rule 5): a request's packet
        # woke straight into C and the wait went on without returning to Python
        assert e1["woken_in_c"] - e0["woken_in_c"] >= result["ok"] // 4, (e0, e1)


PINGS = 20
PATTERN = secrets.token_hex(8)  # ping -p: 8 bytes repeated through each echo's payload


def took(lab: Lab, pods: tuple[str, ...], action):  # type: ignore[no-untyped-def]
    """``action()``'s result, and what the lanes of ``pods`` sealed and opened meanwhile."""
    before = {p: express(lab, p) for p in pods}
    result = action()
    after = {p: express(lab, p) for p in pods}
    keys = ("sealed", "opened", "leased_sealed", "leased_opened")
    return result, {p: {k: after[p][k] - before[p][k] for k in keys} for p in pods}


@pytest.mark.parametrize("target", ["pod", "service"])
def test_ping_takes_the_lane_both_ways_at_both_ends_and_stays_sealed(lab: Lab, target: str):
    n2 = lab.pod("nginx2")
    dst = n2.ip if target == "pod" else lab.services_by_name["web"].vip
    assert dst is not None
    argv = ["ping", "-n", "-q", "-c", str(PINGS), "-i", "0.05", "-W", "2", "-p", PATTERN, dst]
    node = lab.nodes["node1"]
    project = {p.ip for p in lab.pods.values() if p.project == "myproject"}
    servers = ("nginx2",) if target == "pod" else ("nginx2", "nginx3")
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        proc, deltas = took(
            lab,
            ("nginx1", *servers),
            lambda: lab.exec("nginx1", argv, check=False, timeout=PINGS + 30),
        )
        frames = cap.stop()
    print(f"\nping {target} {dst}: {proc.stdout.strip().splitlines()[-2:]}; lanes: {deltas}")
    assert f"{PINGS} packets transmitted, {PINGS} received" in proc.stdout, proc.stdout
    between = [f for f in frames if f.src in project and f.dst in project]
    assert between and all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in between)
    assert not any(f.proto == 1 for f in frames if f.src in project or f.dst in project)
    assert bytes.fromhex(PATTERN) not in cap.data
    # The first echo of a flow takes the Python path (and teaches the lanes), so does its
    # first reply on the server; the packet that starts a re-key (every 4 s here) and the
    # first of the new session too: at least three quarters of the rest ride the lane.
    least = (PINGS - 1) * 3 // 4
    assert deltas["nginx1"]["sealed"] >= least and deltas["nginx1"]["opened"] >= least, deltas
    server_opened = sum(deltas[p]["opened"] for p in servers)
    server_sealed = sum(deltas[p]["sealed"] for p in servers)
    assert server_opened >= least and server_sealed >= least, deltas
    # Each echo is a wake-up of its own; between two, Python runs only when a timer (or
    # anything else) returns the lane's wait to it, which ends the leases (core/express.py
    # rule 6): most of the client's echoes and replies are admitted in C, without take/accept.
    half = least // 2
    assert deltas["nginx1"]["leased_sealed"] >= half, deltas
    assert deltas["nginx1"]["leased_opened"] >= half, deltas


BULK = 8 * 1024 * 1024  # bytes the client sends: TSO super-packets out, GRO reads in
BULK_SERVER = f"""
import hashlib, socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {ECHO_PORT})); srv.listen(1); srv.settimeout(60)
conn, _ = srv.accept(); conn.settimeout(60); h = hashlib.sha256(); got = 0
while got < {BULK}:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk); got += len(chunk)
conn.sendall(h.hexdigest().encode())
conn.close()
"""
BULK_CLIENT = f"""
import hashlib, os, socket, sys
data = (b"{MARKER}" + os.urandom(4000)) * ({BULK} // (4000 + len(b"{MARKER}")) + 1)
data = data[:{BULK}]
c = socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout=60)
c.sendall(data)
answer = c.recv(64).decode()
print(answer == hashlib.sha256(data).hexdigest(), answer)
"""


def test_bulk_tcp_rides_the_lane_as_super_packets_and_gro_reads_sealed_and_intact(lab: Lab):
    """8 MiB through the ``echo`` Service in one connection: nginx1's kernel hands tenc0 TSO
    super-packets, which its lane cuts and seals (core/express.py rule 2a); nginx2's socket
    reads them as GRO runs, which its lane opens and coalesces (rule 2b). The bytes arrive
    intact (sha256), nothing of them is in the clear on the bridge, and the two lanes carried
    most of the segments (before rule 2a/2b both were handed back to the Python path)."""
    n2 = lab.pod("nginx2")
    vip = lab.services_by_name["echo"].vip
    server = netns.spawn(n2.netns, [sys.executable, "-c", BULK_SERVER])
    try:
        time.sleep(0.5)  # the server listens

        def send() -> str:
            argv = [sys.executable, "-c", BULK_CLIENT, str(vip)]
            return str(lab.exec("nginx1", argv, timeout=120).stdout)

        out, deltas = took(lab, ("nginx1", "nginx2"), lambda: sealed_on_the_bridge(lab, send))
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    print(f"\nbulk {BULK} bytes: {out.strip()}; lanes: {deltas}")
    assert out.startswith("True"), out
    segments = BULK // 1500  # at least: no segment carries more than the MTU
    assert deltas["nginx1"]["sealed"] >= segments // 2, deltas
    assert deltas["nginx2"]["opened"] >= segments // 2, deltas
