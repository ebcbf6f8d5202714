"""``tencrypt node-sync``: flags and the entry point (``tencrypt.nodesync.cli:main``).

Modes:
- watch (default): list and watch the API, keep chain TENCRYPT in step until SIGTERM; the
  rules stay in place on exit, so a restarting DaemonSet never cuts a tunnel;
- ``--once``: one snapshot from the API, applied, then exit;
- ``--once --from-file FILE``: the JSON of ``kubectl get namespaces,services,endpointslices
  -A -o json`` (air-gapped nodes, tests, the lab); ``-`` reads standard input;
- ``--cleanup``: remove chain TENCRYPT, its sub-chains and the jumps, then exit;
- ``--dry-run``: print the ``iptables-restore`` text instead of applying it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from tencrypt.core.stats import Stats
from tencrypt.errors import UsageError
from tencrypt.nodesync.cluster import ClusterState, load_list
from tencrypt.nodesync.iptables import IptablesApplier
from tencrypt.nodesync.rules import TUNNEL_PORT, build_restore

log = logging.getLogger("tencrypt.nodesync")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true",
                   help="read the cluster once, program the node, exit (default: watch)")
    p.add_argument("--from-file", metavar="FILE",
                   help="with --once: read the JSON of `kubectl get namespaces,services,"
                        "endpointslices -A -o json` (or endpoints) from FILE ('-': stdin) "
                        "instead of the API")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="kubeconfig to use (default: in-cluster service account, else "
                        "$KUBECONFIG or ~/.kube/config)")
    p.add_argument("--netns", metavar="NAME",
                   help="program the nat table of this named network namespace (the lab's "
                        "node) instead of the current one")
    p.add_argument("--iptables", default="iptables",
                   choices=["iptables", "iptables-nft", "iptables-legacy"],
                   help="the iptables backend kube-proxy uses on this node (default: iptables)")
    p.add_argument("--port", type=int, default=TUNNEL_PORT,
                   help=f"the tunnel port forwarded from VIP to pod, udp and tcp "
                        f"(default: {TUNNEL_PORT})")
    p.add_argument("--resync", type=float, default=300.0, metavar="SECONDS",
                   help="re-apply the rules from memory this often, repairing hand edits "
                        "(default: 300)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the iptables-restore input instead of applying it")
    p.add_argument("--cleanup", action="store_true",
                   help="remove chain TENCRYPT, its sub-chains and the jumps to it, then exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="stderr log level")


def main(args: argparse.Namespace) -> int:
    if args.from_file and not args.once:
        raise UsageError("--from-file needs --once: a file does not change, there is nothing "
                         "to watch")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    stats = Stats()
    applier = IptablesApplier(args.netns, args.iptables, args.port, stats)
    if args.cleanup:
        applier.cleanup()
        log.info("removed chain TENCRYPT and its sub-chains")
        return 0
    if args.once:
        state = read_file(args.from_file, stats) if args.from_file else _list_api(args, stats)
        return _apply_once(state, applier, args.dry_run)
    return _watch(args, applier, stats)


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
        raise UsageError(f"{path}: expected a kubectl List document with \"items\"")
    return load_list(doc, stats)


def _apply_once(state: ClusterState, applier: IptablesApplier, dry_run: bool) -> int:
    desired = state.desired()
    if state.stats.get("nodesync_bad_object"):
        log.warning("ignored %d malformed objects", state.stats.get("nodesync_bad_object"))
    if dry_run:
        try:
            existing = applier.save()
        except Exception:  # noqa: BLE001 - a dry run must work without privileges too
            existing = ""
        sys.stdout.write(build_restore(desired, existing, applier.port))
        return 0
    applier.apply(desired)
    log.info("programmed %d VIPs, %d endpoints", len(desired),
             sum(len(b.endpoints) for b in desired))
    return 0


def _list_api(args: argparse.Namespace, stats: Stats) -> ClusterState:
    from tencrypt.kube.client import new_api_client  # the kubernetes client is slow to import
    from tencrypt.nodesync import watch

    return watch.list_once(new_api_client(args.kubeconfig), stats)


def _watch(args: argparse.Namespace, applier: IptablesApplier, stats: Stats) -> int:
    from tencrypt.kube.client import new_api_client
    from tencrypt.nodesync import watch

    if args.dry_run:
        raise UsageError("--dry-run needs --once")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    api = new_api_client(args.kubeconfig)
    log.info("watching %s", api.configuration.host)
    watch.watch_and_sync(api, applier, stats, stop, resync=args.resync)
    log.info("stopped; rules left in place (use --cleanup to remove them)")
    return 0
