"""``tencrypt node-sync``: flags and the entry point (``tencrypt.nodesync.cli:main``).

Backends (``--backend``, ``backends.py``): ``nft`` (table ``inet tencrypt``: one map lookup
per packet, a change is one small transaction), ``iptables`` (chain TENCRYPT of the nat
table, partial restores), ``auto`` (default): nft where the kernel has nf_tables.

Modes:
- watch (default): list and watch the API, keep the node's rules in step until SIGTERM; the
  rules stay in place on exit, so a restarting DaemonSet never cuts a tunnel;
- ``--once``: one snapshot from the API, applied, then exit;
- ``--once --from-file FILE``: the JSON of ``kubectl get namespaces,services,endpointslices
  -A -o json`` (air-gapped nodes, tests, the lab); ``-`` reads standard input;
- ``--cleanup``: remove what either backend programmed (table inet tencrypt; chain
  TENCRYPT, its sub-chains and the jumps), then exit;
- ``--dry-run`` (with ``--once``): print the transaction (``nft -f`` input, or
  ``iptables-restore`` input) instead of applying it;
- ``--metrics ADDR:PORT``: serve Prometheus metrics (sync durations, what is programmed,
  the last successful sync) while watching.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tencrypt import fastpath
from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError, UsageError
from tencrypt.kube.objects import add_kubeconfig_argument
from tencrypt.linux.metrics import parse_address
from tencrypt.nodesync import backends
from tencrypt.nodesync.cluster import ClusterState, load_list
from tencrypt.nodesync.metrics import SyncMetrics, render
from tencrypt.nodesync.rules import TUNNEL_PORT

log = logging.getLogger("tencrypt.nodesync")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--once",
        action="store_true",
        help="read the cluster once, program the node, exit (default: watch)",
    )
    p.add_argument(
        "--from-file",
        metavar="FILE",
        help="with --once: read the JSON of `kubectl get namespaces,services,"
        "endpointslices -A -o json` (or endpoints) from FILE ('-': stdin) "
        "instead of the API",
    )
    add_kubeconfig_argument(p)
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="program the nat table of this named network namespace (the lab's "
        "node) instead of the current one",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=list(backends.BACKENDS),
        help="how to program the node: nft (table inet tencrypt), iptables (chain "
        "TENCRYPT of the nat table), auto = nft where the kernel has nf_tables "
        "(default: auto)",
    )
    p.add_argument(
        "--iptables",
        default="iptables",
        choices=["iptables", "iptables-nft", "iptables-legacy"],
        help="with the iptables backend, the iptables kube-proxy uses on this node; "
        "with nft, the one whose chain TENCRYPT to remove (default: iptables)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=TUNNEL_PORT,
        help=f"the tunnel port forwarded from VIP to pod, udp and tcp (default: {TUNNEL_PORT})",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="re-apply the rules from memory this often, repairing hand edits (default: 300)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --once: print the transaction (nft -f or iptables-restore input) "
        "instead of applying it",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove what either backend programmed (table inet tencrypt; chain "
        "TENCRYPT, its sub-chains and the jumps to it), then exit",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics while watching "
        "(sync duration, programmed elements, last successful sync)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level",
    )


def main(args: argparse.Namespace) -> int:
    if args.from_file and not args.once:
        raise UsageError(
            "--from-file needs --once: a file does not change, there is nothing to watch"
        )
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    stats = Stats()
    if args.cleanup:
        return _cleanup(args, stats)
    backend = args.backend
    if args.dry_run and backend == "auto" and shutil.which("nft"):
        backend = "nft"  # unprivileged, the kernel cannot be asked: show what nft would do
    applier = backends.make_applier(backend, args.netns, args.iptables, args.port, stats)
    log.info("backend: %s", applier.name)
    if args.once:
        state = read_file(args.from_file, stats) if args.from_file else _list_api(args, stats)
        return _apply_once(state, applier, args.dry_run)
    return _watch(args, applier, stats)


def _cleanup(args: argparse.Namespace, stats: Stats) -> int:
    for name in ("nft", "iptables"):
        if name == "nft" and backends.choose("auto", args.netns) != "nft":
            continue  # no nf_tables here: nothing of the nft backend either
        try:
            backends.make_applier(name, args.netns, args.iptables, args.port, stats).cleanup()
        except SetupError as exc:
            if name == "nft" or args.backend == "iptables":
                raise
            log.info("iptables backend not cleaned (%s)", str(exc).splitlines()[0])
    log.info("removed table inet tencrypt and chain TENCRYPT with its sub-chains")
    return 0


def read_file(path: str, stats: Stats) -> ClusterState:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON (want `kubectl get ... -o json`): {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise UsageError(f'{path}: expected a kubectl List document with "items"')
    return load_list(doc, stats)


def _apply_once(state: ClusterState, applier: backends.Applier, dry_run: bool) -> int:
    desired = state.desired()
    if state.stats.get("nodesync_bad_object"):
        log.warning("ignored %d malformed objects", state.stats.get("nodesync_bad_object"))
    if dry_run:
        sys.stdout.write(applier.plan(desired, full=True))
        return 0
    applier.apply(desired, full=True)
    log.info(
        "programmed %d VIPs, %d endpoints", len(desired), sum(len(b.endpoints) for b in desired)
    )
    return 0


def _list_api(args: argparse.Namespace, stats: Stats) -> ClusterState:
    from tencrypt.kube.client import new_api_client  # the kubernetes client is slow to import
    from tencrypt.nodesync import watch

    return watch.list_once(new_api_client(args.kubeconfig), stats)


def _watch(args: argparse.Namespace, applier: backends.Applier, stats: Stats) -> int:
    from tencrypt.kube.client import new_api_client
    from tencrypt.nodesync import watch

    if args.dry_run:
        raise UsageError("--dry-run needs --once")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = SyncMetrics(applier.name)
    if args.metrics:
        loops = "c" if fastpath.compiled() is not None else "python"  # build info: the extension
        serve_metrics(args.metrics, lambda: render(metrics, stats, loops), stop)
    api = new_api_client(args.kubeconfig)
    log.info("watching %s", api.configuration.host)
    watch.watch_and_sync(api, applier, stats, stop, resync=args.resync, metrics=metrics)
    log.info("stopped; rules left in place (use --cleanup to remove them)")
    return 0


def serve_metrics(address: str, render: Any, stop: threading.Event) -> ThreadingHTTPServer:
    """Prometheus text at /metrics (and /) on ``address``, in a thread, until ``stop``."""
    host, port = parse_address(address)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            ok = self.path in ("/metrics", "/")
            body = (render() if ok else "not found; try /metrics\n").encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def shut_down_when_stopped() -> None:
        stop.wait()
        server.shutdown()

    threading.Thread(target=shut_down_when_stopped, daemon=True).start()
    return server
