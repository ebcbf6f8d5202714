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
  woke the proxies straight into C (the lane's ``wait``, ``woken_in_c``).
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
