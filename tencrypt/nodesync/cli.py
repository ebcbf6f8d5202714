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
  the last successful sync) while watching, and ``/healthz`` and ``/readyz`` for the
  kubelet (linux/probes.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path

from tencrypt import argtypes, fastpath
from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError, UsageError
from tencrypt.kube.objects import add_kubeconfig_argument
from tencrypt.linux import probes
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
        type=argtypes.port_number,
        default=TUNNEL_PORT,
        help=f"the tunnel port forwarded from VIP to pod, udp and tcp (default: {TUNNEL_PORT})",
    )
    p.add_argument(
        "--resync",
        type=argtypes.seconds,
        default=300.0,
        metavar="SECONDS",
        help="re-apply the rules from memory this often, repairing hand edits (default: 300)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="with --from-file: program the file even if it lacks Namespaces, Services or "
        "endpoints or enables no Service, which removes every forwarding this node has "
        "(default: refuse such a file)",
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
        type=argtypes.address,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics while watching "
        "(sync duration, programmed elements, last successful sync), and the kubelet's "
        "probes: /healthz (the process serves), /readyz (a sync has programmed the node "
        "and the last one succeeded; 503 with the reason otherwise)",
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
    stats = Stats()
    if args.cleanup:
        return _cleanup(args, stats)
    backend = args.backend
    if args.dry_run and backend == "auto" and shutil.which("nft"):
        backend = "nft"  # unprivileged, the kernel cannot be asked: show what nft would do
    applier = backends.make_applier(backend, args.netns, args.iptables, args.port, stats)
    log.info("backend: %s", applier.name)
    if args.once:
        if args.from_file:
            state = read_file(args.from_file, stats, allow_empty=args.allow_empty)
        else:
            state = _list_api(args, stats)
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


NEEDED_KINDS = {  # what a snapshot must hold for its absence of a Service to mean something
    "Namespace": "Namespace",
    "Service": "Service",
    "EndpointSlice or Endpoints": ("EndpointSlice", "Endpoints"),
}


def read_file(path: str, stats: Stats, allow_empty: bool = False) -> ClusterState:
    """The cluster state in a ``kubectl get ... -o json`` file. Applied in full, it replaces
    whatever the node forwards: a file that lacks a kind of object it needs, or that enables
    no Service at all, is refused (UsageError) unless ``allow_empty``: one wrong `kubectl get`
    would otherwise wipe every VIP:1337 forwarding of the node without a word."""
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
    state = load_list(doc, stats)
    if allow_empty:
        return state
    kinds = {item.get("kind") for item in doc["items"] if isinstance(item, dict)}
    missing = [
        name
        for name, kind in NEEDED_KINDS.items()
        if not kinds.intersection((kind,) if isinstance(kind, str) else kind)
    ]
    if missing:
        raise UsageError(
            f"{path} holds no {' and no '.join(missing)} objects: programmed, it would remove "
            "every forwarding of this node. Export all three kinds (`kubectl get "
            "namespaces,services,endpointslices -A -o json`), or pass --allow-empty"
        )
    if not state.desired():
        raise UsageError(
            f"{path} enables no Service with endpoints (no Namespace labelled "
            "tencrypt.io/enabled=true has one): programmed, it would remove every forwarding "
            "of this node; pass --allow-empty if that is what you want"
        )
    return state


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
    if args.metrics:  # with the kubelet's probes (daemonset.yaml)
        loops = fastpath.built()  # build info: the extension
        probes.serve(
            args.metrics,
            lambda: render(metrics, stats, loops),
            stop,
            {"/healthz": lambda: (True, "ok"), "/readyz": metrics.ready},
        )
    api = new_api_client(args.kubeconfig)
    log.info("watching %s", api.configuration.host)
    watch.watch_and_sync(api, applier, stats, stop, resync=args.resync, metrics=metrics)
    log.info("stopped; rules left in place (use --cleanup to remove them)")
    return 0
