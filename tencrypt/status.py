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
from pathlib import Path
from typing import Any, TextIO

from tencrypt.core.peer import UNANSWERED_AFTER
from tencrypt.core.stats import Counter
from tencrypt.errors import UsageError
from tencrypt.linux.metrics import SOCKET_FILE, get_unix, parse_address

DEFAULT_ADDRESS = "127.0.0.1:9137"
TIMEOUT = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        default=DEFAULT_ADDRESS,
        help="where the proxy serves /metrics and /status, as given to "
        f"`tencrypt run --metrics`, run inside the pod's network namespace (default: "
        f"{DEFAULT_ADDRESS})",
    )
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="read the proxy's status from its Unix socket instead (every proxy serves "
        f"STATE_DIR/netns-INODE/{SOCKET_FILE}; from the node, no namespace to enter)",
    )
    where.add_argument(
        "--node",
        action="store_true",
        help="one line for every proxy of this node, read from the sockets under "
        "--state-dir: pod IP, project, mode, peers up, sessions, drops, plaintext fallback "
        "(on a cluster: kubectl exec -n tencrypt-system POD -c agent -- tencrypt status --node)",
    )
    where.add_argument(
        "--cluster",
        action="store_true",
        help="every enabled project of the cluster, from the node agents' reports (ConfigMaps "
        "tencrypt-keys-NODE): per project its nodes, its pods with a proxy and how many of "
        "them run with a loaded key (sealed), the rings in use; agents silent for 3 minutes "
        "are named. Uses your kubeconfig (--kubeconfig)",
    )
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="with --cluster: the kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config)",
    )
    p.add_argument(
        "--agent-namespace",
        default="tencrypt-system",
        help="with --cluster: where the agents publish their reports (default: tencrypt-system)",
    )
    p.add_argument(
        "--state-dir",
        default="/run/tencrypt",
        help="with --node: the state directory `tencrypt setup` used (default: /run/tencrypt)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["text", "json", "yaml"],
        default="text",
        help="text (default), or the raw document(s) as JSON or YAML",
    )
    p.add_argument("--json", action="store_true", help="the same as -o json")


def fetch_socket(path: Path) -> dict[str, Any]:
    """GET /status over the proxy's Unix socket; UsageError with what to check."""
    try:
        code, body = get_unix(path, "/status", TIMEOUT)
        doc = json.loads(body) if code == 200 else None
    except (OSError, ValueError) as exc:
        raise UsageError(f"no proxy status at {path} ({exc}): is its proxy running?") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"{path}/status answered {code} or not a JSON object")
    return doc


def node_rows(state_dir: Path) -> list[dict[str, Any]]:
    """Every proxy of the node: each namespace's state directory with a socket, and what
    its /status says (or why it cannot be read)."""
    rows: list[dict[str, Any]] = []
    for directory in sorted(state_dir.glob("netns-*")):
        socket_path = directory / SOCKET_FILE
        if not socket_path.exists():
            continue  # set up, but no proxy runs (or one too old to serve it)
        try:
            rows.append({"state": str(directory), "status": fetch_socket(socket_path)})
        except UsageError as exc:
            rows.append({"state": str(directory), "error": str(exc)})
    return rows


def render_node(rows: list[dict[str, Any]], out: TextIO) -> None:
    print(
        f"{'POD IP':<16} {'PROJECT':<32} {'MODE':<10} {'PEERS UP':>8} {'SESSIONS':>8} "
        f"{'DROPS':>8} {'CLEAR':>6}",
        file=out,
    )
    for row in rows:
        doc = row.get("status")
        if doc is None:
            print(f"{'?':<16} {row['state']}: {row['error']}", file=out)
            continue
        totals = doc.get("totals") or {}
        counters = doc.get("counters") or {}
        print(
            f"{doc.get('pod_ip', '?'):<16} {_project(doc)[:32]:<32} "
            f"{str(doc.get('mode', '?'))[:10]:<10} "
            f"{totals.get('peers_up', 0):>4}/{totals.get('peers', 0):<3} "
            f"{totals.get('sessions', 0):>8} {sum((doc.get('drops') or {}).values()):>8} "
            f"{counters.get(Counter.PLAINTEXT_FALLBACK, 0):>6}",
            file=out,
        )
    if not rows:
        print("(no proxy serves a status socket on this node)", file=out)


def _project(doc: dict[str, Any]) -> str:
    """The membership's project, else the pod's DNS domain (standalone)."""
    return str((doc.get("membership") or {}).get("project") or doc.get("domain") or "?")


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
    claimed = peer.get("claimed_pod_ip")
    if claimed and claimed != name:  # through a Service VIP: the pod behind it
        name = f"{name} (pod {claimed})"
    if peer.get("paired_pod_ip"):  # a dual-stack pod: its other family's address, same session
        name = f"{name} + {peer['paired_pod_ip']}"
    unanswered = peer.get("unanswered_for")
    print(
        f"  peer {name}  endpoint {peer.get('endpoint', '?')}  "
        f"addresses {','.join(peer.get('addresses') or []) or '-'}  "
        f"{' '.join(flags) or 'down'}  queued {peer.get('queued', 0)}"
        + (
            f"  UNANSWERED for {unanswered:.0f}s"
            if unanswered and unanswered >= UNANSWERED_AFTER
            else ""
        ),
        file=out,
    )
    sent, received = peer.get("sent"), peer.get("received")
    ago = peer.get("last_handshake_ago")
    if sent is not None or received is not None or ago is not None:
        print(
            f"    transfer: {_amount(received)} received, {_amount(sent)} sent; latest "
            f"handshake: {'never' if ago is None else f'{ago:.0f}s ago'}",
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


def _amount(d: dict[str, int] | None) -> str:
    """``{"packets": n, "bytes": b}`` as wg show says it, in binary units."""
    if not d:
        return "0 B"
    size, unit = float(d.get("bytes", 0)), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    text = f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
    return f"{text} ({d.get('packets', 0)} packets)"


def cluster_rows(kubeconfig: str | None, agent_namespace: str) -> dict[str, Any]:
    """The cluster view (core/rotation.py ``cluster_view``) read with the user's kubeconfig."""
    import time

    from kubernetes import client

    from tencrypt.core.rotation import REPORT_KEY, REPORT_LABEL, cluster_view, parse_report
    from tencrypt.keyrotate import enabled_namespaces
    from tencrypt.kube.client import api_failures, brief, new_api_client

    api: Any = client.CoreV1Api(new_api_client(kubeconfig))
    try:
        maps = json.loads(
            api.list_namespaced_config_map(
                agent_namespace, label_selector="=".join(REPORT_LABEL), _preload_content=False
            ).data
        )
        enabled = enabled_namespaces(api)
    except api_failures() as exc:
        raise UsageError(f"cannot read the agents' reports: {brief(exc)}") from None
    reports = [
        r
        for item in maps.get("items") or []
        if (r := parse_report((item.get("data") or {}).get(REPORT_KEY))) is not None
    ]
    views, stale = cluster_view(reports, enabled, time.time())
    return {
        "nodes": len(reports),
        "stale_nodes": stale,
        "projects": [
            {
                "project": v.project,
                "nodes": v.nodes,
                "pods": v.pods,
                "sealed": v.sealed,
                "unsealed": v.pods - v.sealed,
                "rings": v.rings,
            }
            for v in views
        ],
    }


def render_cluster(doc: dict[str, Any], out: TextIO) -> None:
    print(f"{doc['nodes']} nodes report", file=out)
    for node in doc["stale_nodes"]:
        print(f"WARNING: the agent of node {node} has not reported for 3 minutes", file=out)
    print(f"{'PROJECT':<32} {'NODES':>5} {'PODS':>5} {'SEALED':>6} {'NOT':>5}  RINGS", file=out)
    for row in doc["projects"]:
        rings = ", ".join(f"{ring} ({n})" for ring, n in sorted(row["rings"].items())) or "-"
        print(
            f"{row['project'][:32]:<32} {row['nodes']:>5} {row['pods']:>5} {row['sealed']:>6} "
            f"{row['unsealed']:>5}  {rings}",
            file=out,
        )


def main(args: argparse.Namespace) -> int:
    output = "json" if args.json else args.output
    if args.cluster:
        doc = cluster_rows(args.kubeconfig, args.agent_namespace)
        if not dump(doc, output):
            render_cluster(doc, sys.stdout)
        return 0
    if args.node:
        rows = node_rows(Path(args.state_dir))
        if not dump(rows, output):
            render_node(rows, sys.stdout)
        return 0 if all("status" in r for r in rows) else 1
    doc = fetch_socket(Path(args.socket)) if args.socket else fetch(args.metrics)
    if not dump(doc, output):
        render(doc, sys.stdout)
    return 0


def dump(doc: object, output: str) -> bool:
    """``doc`` as JSON or YAML on stdout (True), or nothing for ``text`` (False)."""
    if output == "json":
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
        return True
    if output == "yaml":
        try:
            import yaml
        except ImportError:  # PyYAML comes with the kubernetes client: node images have it
            raise UsageError(
                "-o yaml needs PyYAML (pip install pyyaml); -o json does not"
            ) from None
        yaml.safe_dump(doc, sys.stdout, sort_keys=True)
        return True
    return False
