"""Key rotation under load (issue 14): the project's key goes through all three phases while a
30 s iperf3 TCP stream and a long-lived request/response connection cross the tunnel.

    [nginx1]--veth--+                              +--veth--[nginx2]   myproject, patched,
      iperf3 -c     |   node1: br0 (tcpdump:       |   iperf3 -s        --session-lifetime 6
      rr client     |   everything but udp 1337)   |   rr echo server   (re-keys every 4 s)
                    |                              |
    [stale]---veth--+   myproject, patched last with only the old key

The lab plays the agent: it rewrites each pod's key ring file (lab.proxy.write_pod_keys), one
pod at a time, as nodes pick up a Secret at different moments; the proxies re-read it without
a restart. Checks: zero connection errors, zero plaintext on the bridge, every session on the
new key afterwards (/status, /metrics), and a pod holding only the old key refused (counted)
until it catches up.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Iterator

import pytest

from tencrypt.core.psk import KeySet, fingerprint
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS, proxy_pid, write_pod_keys
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab, drops, line_echo_client, line_echo_server, metrics

pytestmark = pytest.mark.netns
MARKER = "tencrypt-rotation-marker-5d1e"
LIFETIME = 6.0  # --session-lifetime: re-key after 4 s, keys gone after 6 s
RR_PORT, IPERF_PORT = 7000, 5201
K1, K2 = os.urandom(32), os.urandom(32)
FP1, FP2 = fingerprint(K1), fingerprint(K2)
KEY_HANDSHAKES_K2 = f'tencrypt_key_handshakes_total{{fingerprint="{FP2}"}}'
PHASES = [
    ("add-next", KeySet(K1, next=K2), ("nginx1", "nginx2")),
    ("promote", KeySet(K2, previous=K1), ("nginx2", "nginx1")),
    ("drop-previous", KeySet(K2), ("nginx1", "nginx2")),
]

RR_SERVER = line_echo_server(RR_PORT)

RR_CLIENT = line_echo_client(RR_PORT, MARKER)


@pytest.fixture(scope="module")
def rlab() -> Iterator[Lab]:
    topology = Topology(
        pods=[
            PodSpec("nginx1", "myproject"),
            PodSpec(  # its Service lists the ports the load uses, as a real one would
                "nginx2",
                "myproject",
                service_ports=[
                    {"name": "http", "port": 8080},
                    {"name": "rr", "port": RR_PORT},
                    {"name": "iperf", "port": IPERF_PORT},
                ],
            ),
            PodSpec("stale", "myproject"),
        ]
    )
    with built_lab(topology=topology, prefix="r") as lab:
        for pod in ("nginx1", "nginx2"):
            write_pod_keys(lab, lab.pod(pod), KeySet(K1))
            lab.patch(pod, run_args=("--session-lifetime", str(LIFETIME)))
        yield lab


def status(lab: Lab, pod: str) -> dict:
    out = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"]).stdout
    return json.loads(out)


def ring(doc: dict) -> list[tuple[str, str]]:
    return [(k["role"], k["fingerprint"]) for k in doc["keys"]]


def load(lab: Lab, pod: str, keys: KeySet) -> None:
    """Play the agent for one pod: write its ring, wait until its proxy runs with it."""
    write_pod_keys(lab, lab.pod(pod), keys)
    want = list(keys.fingerprints().items())
    netns.wait_for(
        lambda: [r for r in ring(status(lab, pod)) if r[0] != "retired"] == want,
        timeout=10,
        interval=0.2,
        what=f"{pod} to load {want}",
    )


def bridge_capture(lab: Lab, capture, seconds: float):
    node = lab.nodes["node1"]
    return capture(node.netns, node.bridge, "not udp port 1337", seconds=seconds)


def test_rotation_under_load_cuts_nothing_and_leaks_nothing(rlab, capture):
    lab = rlab
    n2 = lab.pod("nginx2")
    pids = {p: proxy_pid(lab, lab.pod(p)) for p in ("nginx1", "nginx2")}
    before = {p: metrics(lab, p) for p in pids}
    servers = [
        netns.spawn(n2.netns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]),
        netns.spawn(n2.netns, [sys.executable, "-c", RR_SERVER]),
    ]
    iperf_log, rr_log = lab.log_file("rotation-iperf3"), lab.log_file("rotation-rr")
    try:
        time.sleep(0.5)  # the servers listen (a refused first connect would fail the test)
        with bridge_capture(lab, capture, 90) as cap:
            t0 = time.monotonic()
            iperf = netns.spawn(
                lab.pod("nginx1").netns,
                ["iperf3", "-c", n2.vip, "-p", str(IPERF_PORT), "-t", "30", "-i", "1", "-J"],
                log=iperf_log,
            )
            rr = netns.spawn(
                lab.pod("nginx1").netns, [sys.executable, "-c", RR_CLIENT, n2.vip, "31"], log=rr_log
            )
            events: list[tuple[float, str]] = []
            # a malformed ring first: refused, counted, the old ring kept
            time.sleep(2.0)
            lab.psk_file("myproject").with_name("nginx1.ring").write_text("current not-a-key\n")
            netns.wait_for(
                lambda: metrics(lab, "nginx1").get("tencrypt_key_reload_refusals_total", 0) == 1,
                timeout=10,
                interval=0.2,
                what="the refusal of a malformed ring",
            )
            assert ring(status(lab, "nginx1")) == [("current", FP1)]
            starts = {"add-next": 5.0, "promote": 11.0, "drop-previous": 11.0 + LIFETIME + 3}
            for name, keys, order in PHASES:
                time.sleep(max(0.0, t0 + starts[name] - time.monotonic()))
                for pod in order:  # one node after the other, as a Secret reaches them
                    load(lab, pod, keys)
                events.append((time.monotonic() - t0, name))
            assert iperf.wait(timeout=60) == 0, iperf_log.read_text()[-2000:]
            assert rr.wait(timeout=60) == 0
        assert [proxy_pid(lab, lab.pod(p)) for p in pids] == list(pids.values())  # no restart
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    report = json.loads(iperf_log.read_text()[iperf_log.read_text().index("{") :])
    rr_result = json.loads(rr_log.read_text().strip().splitlines()[-1])
    intervals = [
        (i["sum"]["start"], i["sum"]["bits_per_second"] / 1e6, i["sum"].get("retransmits", 0))
        for i in report["intervals"]
    ]
    _print_figures(intervals, events, rr_result)
    # zero resets: the stream ran its 30 s, the request/response connection never failed
    assert "error" not in report and len(intervals) >= 29
    assert report["end"]["sum_received"]["bytes"] > 0
    assert rr_result["error"] == "" and rr_result["ok"] > 100
    # zero plaintext: nothing of either connection on the bridge outside the tunnel
    assert MARKER.encode() not in cap.data and MARKER.upper().encode() not in cap.data
    leaked = [
        f for f in cap.frames() if f.proto == 6 and {f.sport, f.dport} & {IPERF_PORT, RR_PORT}
    ]
    assert leaked == []
    # re-keys happened during the rotation, and now every session is on the new key
    for pod in pids:
        after = metrics(lab, pod)
        made = sum(
            after.get(f"tencrypt_handshakes_{k}_total", 0)
            - before[pod].get(f"tencrypt_handshakes_{k}_total", 0)
            for k in ("completed", "responded")
        )
        under_k2 = after[KEY_HANDSHAKES_K2]
        print(
            f"{pod}: {made:.0f} sessions made during the test, {under_k2:.0f} of them under "
            "the new key"
        )
        assert made >= 30.0 / LIFETIME  # sessions were replaced throughout the stream
        assert after["tencrypt_key_reloads_total"] == 3
        assert after[f'tencrypt_key{{fingerprint="{FP2}",role="current"}}'] == 1
        assert under_k2 >= 2
        doc = status(lab, pod)
        assert ring(doc) == [("current", FP2)]  # no retired key: no session uses K1
        sessions = [s for p in doc["peers"] for s in p["sessions"] if s["live"]]
        assert sessions and {s["key"] for s in sessions} == {FP2}
        assert doc["keys"][0]["sessions"] == len(sessions)
        assert drops(after, "bad_mac") == drops(before[pod], "bad_mac")


def _print_figures(intervals, events, rr_result) -> None:
    rates = [r for _, r, _ in intervals]
    marks = {round(t): name for t, name in events}
    print("\niperf3 through the rotation (Mbit/s per second; phases marked):")
    cells = [
        f"{t:.0f}s:{r:.0f}"
        + (f"[{marks[round(t)]}]" if round(t) in marks else "")
        + (f"(re{x})" if x else "")
        for t, r, x in intervals
    ]
    print("  " + "  ".join(cells))
    print(
        f"  median {statistics.median(rates):.0f}, min {min(rates):.0f}, max {max(rates):.0f} "
        f"Mbit/s; phases at " + ", ".join(f"{name} {t:.1f}s" for t, name in events)
    )
    print(
        f"request/response: {rr_result['ok']} round trips, worst {rr_result['worst'] * 1e3:.0f}"
        f" ms, error {rr_result['error'] or 'none'}"
    )


def test_a_pod_that_missed_the_rotation_is_refused_until_it_catches_up(rlab, capture):
    """After the rotation, a pod still on the old key only: no handshake either way, no
    plaintext, counted on both sides; once its ring is written, it joins without a restart."""
    lab = rlab
    for pod in ("nginx1", "nginx2"):
        if ring(status(lab, pod)) != [("current", FP2)]:
            load(lab, pod, KeySet(K2))
    write_pod_keys(lab, lab.pod("stale"), KeySet(K1))
    lab.patch("stale", run_args=("--session-lifetime", str(LIFETIME)))
    before = {p: metrics(lab, p) for p in ("nginx2", "stale")}
    url = f"http://{lab.pod('nginx2').vip}:8080/"
    with bridge_capture(lab, capture, 60) as cap:
        refused = lab.exec(
            "stale",
            ["curl", "-sS", "--max-time", "4", "-H", f"X-Marker: {MARKER}", url],
            check=False,
            timeout=30,
        )
        back = lab.exec(
            "nginx2",
            [
                "curl",
                "-sS",
                "--max-time",
                "4",
                "-H",
                f"X-Marker: {MARKER}",
                f"http://{lab.pod('stale').vip}:8080/",
            ],
            check=False,
            timeout=30,
        )
    assert refused.returncode != 0 and back.returncode != 0
    assert MARKER.encode() not in cap.data
    assert [f for f in cap.frames() if f.proto == 6 and 8080 in (f.sport, f.dport)] == []
    after = {p: metrics(lab, p) for p in ("nginx2", "stale")}
    for pod in after:  # each side dropped the other's handshakes by mac1: counted, no DH
        assert drops(after[pod], "bad_mac") > drops(before[pod], "bad_mac")
    assert after["stale"].get("tencrypt_handshakes_completed_total", 0) == 0
    doc = status(lab, "stale")
    assert ring(doc) == [("current", FP1)]
    assert not any(p["up"] for p in doc["peers"]) and doc["totals"]["handshakes_pending"] >= 1
    # each side names the other as a member on a key it does not hold (strict: refused)
    stale_ip, n2_ip = lab.pod("stale").ip, lab.pod("nginx2").ip
    assert [r["source"] for r in status(lab, "nginx2")["key_mismatch"]] == [stale_ip]
    assert [r["source"] for r in doc["key_mismatch"]] == [n2_ip]
    assert after["nginx2"]["tencrypt_handshakes_wrong_key_total"] >= 1
    assert after["nginx2"]["tencrypt_key_mismatch_sources"] == 1
    # caught up: the agent writes the new ring, the same proxy loads it and is let in
    pid = proxy_pid(lab, lab.pod("stale"))
    load(lab, "stale", KeySet(K2))
    ok = lab.exec("stale", ["curl", "-sS", "--max-time", "10", url], check=False, timeout=30)
    assert ok.returncode == 0 and proxy_pid(lab, lab.pod("stale")) == pid
    assert status(lab, "nginx2")["key_mismatch"] == []  # caught up: no longer listed
