"""``tencrypt status``: what a running proxy knows, read from its ``/status`` endpoint.

The proxy serves ``http://ADDR:PORT/status`` beside ``/metrics`` (``tencrypt run --metrics
ADDR:PORT``; linux/metrics.py). The document is JSON; every key is optional so that an older
or newer proxy still prints::

    {"pod_ip": "10.128.0.5", "strict": true,
     "peers": [{"pod_ip": ..., "addresses": [...], "endpoint": "ip:port", "up": true,
                "confirmed": true, "handshake_pending": false, "queued": 0,
                "sessions": [{"slot": "current", "local_index": 1, "age": 12.5,
                              "expires_in": 167.5, "initiator": true, "confirmed": true,
                              "live": true, "sent": 42, "key": "ab12cd34"}]}],
     "totals": {"peers": 1, "peers_up": 1, "sessions": 1, "handshakes_pending": 0, "queued": 0},
     "keys": [{"role": "current", "fingerprint": "ab12cd34", "sessions": 1, "handshakes": 3},
              {"role": "previous", "fingerprint": "9f00e1c2", "sessions": 0, "handshakes": 9}],
     "classification": {"internal": 3, "external": 2},
     "counters": {"packets_sealed": 42, "plaintext_fallback": 0},
     "drops": {"bad_mac": 7}}

``peers``, ``totals`` and ``keys`` (the key ring by fingerprint, with the live sessions and the
handshakes made under each key; a "retired" key is one the ring dropped that sessions still
use until their re-key) come from ``Tunnel.status(now)``, ``counters`` and ``drops`` from
``core.stats.snapshot``. A non-zero ``plaintext_fallback`` (``--no-strict`` sent packets of
this project in the clear because no proxy answered) is printed first, as a warning.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Any, TextIO

from tencrypt.core.stats import Counter
from tencrypt.errors import UsageError
from tencrypt.linux.metrics import parse_address

DEFAULT_ADDRESS = "127.0.0.1:9137"
TIMEOUT = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        default=DEFAULT_ADDRESS,
        help="where the proxy serves /metrics and /status, as given to "
        f"`tencrypt run --metrics` (default: {DEFAULT_ADDRESS})",
    )
    p.add_argument("--json", action="store_true", help="print the raw /status document")


def fetch(address: str) -> dict[str, Any]:
    """GET /status from the proxy; UsageError with what to check if it cannot be had."""
    host, port = parse_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/status")
        reply = conn.getresponse()
        body = reply.read()
    except OSError as exc:
        raise UsageError(
            f"no proxy status at {address} ({exc}): is `tencrypt run --metrics "
            f"{address}` running in this network namespace?"
        ) from exc
    finally:
        conn.close()
    if reply.status != 200:
        raise UsageError(
            f"{address}/status answered {reply.status} {reply.reason}: a proxy "
            "without the status endpoint (an older version?)"
        )
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise UsageError(f"{address}/status is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{address}/status is not a JSON object")
    return doc


def render(doc: dict[str, Any], out: TextIO) -> None:
    """The document, readably: warnings, totals, peers and sessions, classes, drops."""
    counters: dict[str, int] = doc.get("counters") or {}
    fallback = counters.get(Counter.PLAINTEXT_FALLBACK, 0)
    if fallback:
        print(
            f"WARNING: {fallback} packets to this project's pods went in the clear "
            "(--no-strict fallback: no proxy answered)",
            file=out,
        )
    for row in doc.get("key_mismatch") or []:
        print(
            f"WARNING: {row.get('source', '?')} (a member of this project) uses a key this "
            f"proxy does not hold: {row.get('refused', 0)} handshakes refused (a pod that "
            "missed a key rotation phase?)",
            file=out,
        )
    netpol = doc.get("network_policy")
    for row in (netpol or {}).get("tunnel_blocked") or []:
        print(
            f"WARNING: NetworkPolicy {row.get('policy', '?')} ({row.get('direction', '?')}) "
            "drops the tunnel's UDP between this pod and its project's pods (the agent's "
            "report): admit the tunnel port (scripts/k8s/networkpolicy-tunnel.yaml)",
            file=out,
        )
    totals = doc.get("totals") or {}
    strict = doc.get("strict")
    mode = "strict" if strict is True else "not strict" if strict is False else ""
    print(
        f"pod {doc.get('pod_ip', '?')}{' (' + mode + ')' if mode else ''}: "
        f"{totals.get('peers', 0)} peers ({totals.get('peers_up', 0)} up), "
        f"{totals.get('sessions', 0)} sessions, {totals.get('handshakes_pending', 0)} "
        f"handshakes pending, {totals.get('queued', 0)} packets queued",
        file=out,
    )
    for key in doc.get("keys") or []:
        print(
            f"key {key.get('fingerprint', '?')}  {key.get('role', '?'):<8}  "
            f"{key.get('sessions', 0)} sessions, {key.get('handshakes', 0)} handshakes",
            file=out,
        )
    for peer in doc.get("peers") or []:
        _peer(peer, out)
    _netpol(netpol, out)
    classes = doc.get("classification") or {}
    if classes:
        print(
            "classification: " + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())), file=out
        )
    if counters:
        print("counters:", file=out)
        for name, value in sorted(counters.items()):
            print(f"  {name:<32} {value}", file=out)
    drops = {k: v for k, v in (doc.get("drops") or {}).items() if v}
    print("drops:" + ("" if drops else " none"), file=out)
    for name, value in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name:<32} {value}", file=out)


def _netpol(netpol: dict[str, Any] | None, out: TextIO) -> None:
    if netpol is None:
        print("network policy: none enforced (no policy from the node agent)", file=out)
        return
    ways = []
    for way in ("ingress", "egress"):
        d = netpol.get(way) or {}
        policies = ", ".join(d.get("policies") or [])
        ways.append(f"{way} isolated by {policies}" if d.get("isolated") else f"{way} open")
    print(
        f"network policy: {'; '.join(ways)}; {netpol.get('flows', 0)} flows "
        f"({netpol.get('blocked_flows', 0)} blocked by a policy change)",
        file=out,
    )
    if netpol.get("malformed"):
        print(f"  unreadable policies (deny): {', '.join(netpol['malformed'])}", file=out)
    for peer, n in sorted((netpol.get("denied_by_peer") or {}).items(), key=lambda kv: -kv[1]):
        print(f"  denied from/to {peer}: {n} packets", file=out)


def _peer(peer: dict[str, Any], out: TextIO) -> None:
    flags = [
        word
        for word, on in (
            ("up", peer.get("up")),
            ("confirmed", peer.get("confirmed")),
            ("handshaking", peer.get("handshake_pending")),
        )
        if on
    ]
    name = peer.get("pod_ip") or "(pod IP not known yet)"
    unanswered = peer.get("unanswered_for")
    print(
        f"  peer {name}  endpoint {peer.get('endpoint', '?')}  "
        f"addresses {','.join(peer.get('addresses') or []) or '-'}  "
        f"{' '.join(flags) or 'down'}  queued {peer.get('queued', 0)}"
        + (f"  UNANSWERED for {unanswered:.0f}s" if unanswered and unanswered >= 5 else ""),
        file=out,
    )
    for s in peer.get("sessions") or []:
        role = "initiator" if s.get("initiator") else "responder"
        state = "confirmed" if s.get("confirmed") else "unconfirmed"
        if not s.get("live", True):
            state += ", expired"
        print(
            f"    {s.get('slot', '?'):<8} index {s.get('local_index', 0):#010x}  "
            f"age {s.get('age', 0):.1f}s  expires in {s.get('expires_in', 0):.1f}s  "
            f"{role}, {state}  sent {s.get('sent', 0)}"
            f"{'  key ' + s['key'] if s.get('key') else ''}",
            file=out,
        )


def main(args: argparse.Namespace) -> int:
    doc = fetch(args.metrics)
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        render(doc, sys.stdout)
    return 0
