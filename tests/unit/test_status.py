"""``tencrypt status``: Tunnel.status, the /status endpoint beside /metrics, and the printout."""

from __future__ import annotations

import asyncio
import io
import json
import threading

from tencrypt.core.exposition import render_prometheus
from tencrypt.core.psk import fingerprint
from tencrypt.core.stats import Counter, DropReason, Stats, snapshot
from tencrypt.linux import metrics
from tencrypt.status import fetch, render
from tests.unit.linked import PSK, A, B, connect, new_net


def proxy_document(net) -> dict:
    a = net.pods[A]
    a.stats.drop(DropReason.BAD_MAC, 7)
    a.stats.inc(Counter.PLAINTEXT_FALLBACK, 3)
    return {
        **a.status(net.now),
        **snapshot(a.stats),
        "strict": False,
        "classification": {"internal": 2, "external": 1},
    }


def test_tunnel_status_is_json_and_says_what_the_tunnel_holds():
    net = new_net()
    connect(net)
    net.advance(2.0)
    doc = json.loads(json.dumps(net.pods[A].status(net.now)))
    assert doc["pod_ip"] == A and doc["totals"]["peers"] == 1 and doc["totals"]["sessions"] == 1
    (peer,) = doc["peers"]
    assert peer["pod_ip"] == B and peer["endpoint"] == f"{B}:1337" and peer["up"]
    (session,) = peer["sessions"]
    assert session["slot"] == "current" and session["initiator"] and session["confirmed"]
    assert session["sent"] >= 1 and session["age"] == 2.0


def test_snapshot_names_drops_by_reason():
    stats = Stats()
    stats.drop(DropReason.CLAIM_REBIND, 2)
    stats.inc(Counter.PACKETS_SEALED, 5)
    assert snapshot(stats) == {"counters": {"packets_sealed": 5}, "drops": {"claim_rebind": 2}}


def test_render_prints_warning_peers_sessions_classes_and_drops():
    net = new_net()
    connect(net)
    out = io.StringIO()
    render(proxy_document(net), out)
    text = out.getvalue()
    assert text.startswith("WARNING: 3 packets")
    assert f"pod {A} (not strict): 1 peers (1 up), 1 sessions" in text
    assert f"peer {B}  endpoint {B}:1337" in text and "current " in text
    assert "classification: external 1, internal 2" in text
    assert "bad_mac" in text.split("drops:")[1]
    fp = fingerprint(PSK)
    assert f"key {fp}  current   1 sessions, 1 handshakes" in text  # the ring, by fingerprint
    assert text.count(f"key {fp}") == 2  # and the session's key
    # wg show's figures per peer: what went each way, and when the last handshake was
    assert "    transfer: " in text and "received" in text and "latest handshake: 0s ago" in text
    render({}, io.StringIO())  # an empty document still prints
    out = io.StringIO()
    peer = {
        "pod_ip": "172.30.0.10",
        "claimed_pod_ip": "10.0.0.2",  # reached through a Service VIP: the pod behind it
        "sent": {"packets": 3, "bytes": 2048},
        "received": {"packets": 5, "bytes": 3 * 1024 * 1024},
        "last_handshake_ago": 12.4,
    }
    render({"peers": [peer]}, out)
    assert "peer 172.30.0.10 (pod 10.0.0.2)" in out.getvalue()
    assert (
        "transfer: 3.00 MiB (5 packets) received, 2.00 KiB (3 packets) sent; latest handshake: "
        "12s ago" in out.getvalue()
    )
    out = io.StringIO()  # a dual-stack pod: one peer, its two addresses on one line
    dual = {"pod_ip": "10.0.0.2", "paired_pod_ip": "fd00::2", "addresses": ["10.0.0.2", "fd00::2"]}
    render({"peers": [dual]}, out)
    assert "peer 10.0.0.2 + fd00::2  endpoint ?  addresses 10.0.0.2,fd00::2" in out.getvalue()
    out = io.StringIO()
    render({"key_mismatch": [{"source": "10.0.0.9", "refused": 4}]}, out)
    assert out.getvalue().startswith("WARNING: 10.0.0.9 (a member of this project) uses a key")


def test_metrics_endpoint_serves_status_beside_metrics():
    net = new_net()
    connect(net)
    doc = proxy_document(net)
    stats = net.pods[A].stats
    ready, stop = threading.Event(), threading.Event()
    where: dict[str, int] = {}

    async def serve() -> None:
        server = await metrics.serve("127.0.0.1:0", lambda: render_prometheus(stats), lambda: doc)
        where["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        server.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(5)
        assert fetch(f"127.0.0.1:{where['port']}") == json.loads(json.dumps(doc))
    finally:
        stop.set()
        thread.join(5)


def test_respond_routes():
    code, kind, body = metrics.respond(b"/status", lambda: "m\n", lambda: {"a": 1})
    assert (code, kind, json.loads(body)) == ("200 OK", "application/json", {"a": 1})
    assert metrics.respond(b"/metrics", lambda: "m\n", None)[2] == b"m\n"
    assert metrics.respond(b"/status", lambda: "m\n", None)[0] == "404 Not Found"
