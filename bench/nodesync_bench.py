"""node-sync at cluster scale: ``python -m bench.nodesync_bench [--sizes 100,1000,10000]``.

Root, in a network namespace of its own (run it under the netns lock,
``flock /tmp/tencrypt-netns.lock``); nothing else on the machine is touched. For each size:
a synthetic cluster of one enabled namespace with N Services, each with one IPv4 ClusterIP
and an EndpointSlice of 3 ready endpoints (the shape of issue #15), and for each backend:

- compute: Kubernetes JSON → ``ClusterState`` → desired backends → the transaction text
  (what ``--once --dry-run`` does, in process: no interpreter start-up counted);
- full sync: ``apply(full=True)`` on an empty node, and again on the programmed node (a
  resync), each one transaction;
- one endpoint change: after the full sync, one Service's endpoint replaced and
  ``apply()`` — the partial sync a watch event causes (conntrack delete of the old pair
  included, as on a node); the median of ``--changes`` changes;
- one watch event: after a full sync by node-sync's ``watch.Syncer`` (fed the cluster as
  the reflectors feed it: one ``Listed`` per kind), one EndpointSlice MODIFIED event (a
  Service's endpoint replaced) handed to ``Syncer.fold`` and ``Syncer.sync`` run: the time
  from the event to the backend's transaction returned (conntrack delete left out), and to
  the sync done (with it); the median of ``--changes`` events each;
- RSS: the peak resident set of ``tencrypt node-sync --once --from-file`` (a whole
  process: parse, state, rules, apply) at that size.

Timings are wall clock of one run each (the median for changes): read them with the
machine's load in mind. The markdown goes to ``--out`` (default
bench/results/nodesync.md); targets (issue #15): full sync of 10,000 Services ≤ 3 × its
compute time, one change ≤ 50 ms at any size, RSS ≤ 150 MB at 10,000 Services.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tencrypt.core.stats import Stats
from tencrypt.kube.objects import EventType
from tencrypt.kube.reflector import Changed, Listed
from tencrypt.linux import netns
from tencrypt.nodesync import nftrules, rules
from tencrypt.nodesync.backends import make_applier
from tencrypt.nodesync.cluster import Kind, ServiceBackends, load_list
from tencrypt.nodesync.kubeobjects import (
    build_endpoint_slice,
    build_list,
    build_namespace,
    build_service,
)
from tencrypt.nodesync.watch import Syncer

REPO = Path(__file__).resolve().parents[1]
TARGET_CHANGE_MS = 50.0
TARGET_FULL_FACTOR = 3.0
TARGET_RSS_MB = 150.0


def cluster(n: int) -> dict[str, Any]:
    """N Services × 3 endpoints in namespace ``bench`` (VIPs 172.30/16, pods 10.128/14)."""
    objs = [build_namespace("bench")]
    for i in range(n):
        vip = f"172.30.{i // 250}.{i % 250 + 1}"
        eps = [f"10.{128 + k}.{i // 250}.{i % 250 + 1}" for k in range(3)]
        objs.append(build_service("bench", f"s{i}", vip))
        objs.append(build_endpoint_slice("bench", f"s{i}", eps, suffix="x"))
    return build_list(objs)


def compute(text: str, backend: str) -> tuple[float, list[ServiceBackends]]:
    start = time.perf_counter()
    desired = load_list(json.loads(text), Stats()).desired()
    if backend == "nft":
        nftrules.full_text(nftrules.program_of(desired))
    else:
        rules.build_restore(desired, "")
    return time.perf_counter() - start, desired


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def changed(desired: list[ServiceBackends], k: int) -> list[ServiceBackends]:
    """One Service's last endpoint replaced by a new pod."""
    i = (k * 7919) % len(desired)
    out = list(desired)
    b = out[i]
    out[i] = ServiceBackends(
        b.namespace, b.name, b.vip, (*b.endpoints[:2], f"10.200.{k}.{i % 250}")
    )
    return out


def event_to_kernel(node: str, doc: dict[str, Any], backend: str, changes: int) -> dict[str, Any]:
    """Median ms from one EndpointSlice event handed to the watch's ``Syncer`` to its
    transaction returned (``event_ms``, conntrack delete left out) and to the sync done
    (``event_sync_ms``, with it)."""
    kinds = (Kind.NAMESPACE, Kind.SERVICE, Kind.ENDPOINT_SLICE)
    applier = make_applier(backend, netns=node)
    syncer = Syncer(applier, Stats(), kinds)
    for kind in kinds:
        syncer.fold(Listed(kind, [o for o in doc["items"] if o["kind"] == kind.value]))
    syncer.sync()  # the first, full sync

    def one_event(k: int) -> float:
        i = (k * 7919) % (len(doc["items"]) // 2)
        eps = [f"10.{128 + j}.{i // 250}.{i % 250 + 1}" for j in range(2)]
        obj = build_endpoint_slice("bench", f"s{i}", [*eps, f"10.201.{k}.{i % 250}"], suffix="x")
        start = time.perf_counter()
        syncer.fold(Changed(Kind.ENDPOINT_SLICE, EventType.MODIFIED, obj))
        assert syncer.sync()
        return time.perf_counter() - start

    synced = [one_event(k) for k in range(changes)]
    owner: Any = getattr(applier, "xtables", applier)  # the xtables backend keeps it
    owner.flush_conntrack = lambda vip, ip: None
    bare = [one_event(k) for k in range(changes, 2 * changes)]
    applier.cleanup()
    return {
        "event_ms": statistics.median(bare) * 1000,
        "event_max_ms": max(bare) * 1000,
        "event_sync_ms": statistics.median(synced) * 1000,
    }


def peak_rss_mb(node: str, path: Path, backend: str) -> float:
    """Peak RSS of one ``node-sync --once`` process (ru_maxrss of a child that is the only
    one this helper waits for, measured in a fresh interpreter so children before it do not
    count)."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    argv = [
        sys.executable,
        "-c",
        probe,
        sys.executable,
        "-m",
        "tencrypt.nodesync",
        "--once",
        "--from-file",
        str(path),
        "--netns",
        node,
        "--backend",
        backend,
        "--log-level",
        "warning",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return int(out.split()[-1]) / 1024


def run_size(
    node: str, n: int, backend: str, changes: int, tmp: Path, rss: bool = True, events: bool = True
) -> dict[str, Any]:
    text = json.dumps(cluster(n))
    path = tmp / f"cluster-{n}.json"
    path.write_text(text)
    compute_s, desired = compute(text, backend)
    applier = make_applier(backend, netns=node)
    applier.cleanup()
    first = timed(lambda: applier.apply(desired, full=True))
    again = timed(lambda: applier.apply(desired, full=True))
    restarted = make_applier(backend, netns=node)  # a new process: reads what the node holds
    restart = timed(lambda: restarted.apply(desired, full=True))
    times, current = [], desired
    for k in range(changes):
        nxt = changed(current, k)
        times.append(timed(lambda nxt=nxt: applier.apply(nxt)))
        current = nxt
    # the same, the conntrack delete left out: what the rules alone cost
    owner: Any = getattr(applier, "xtables", applier)  # the xtables backend keeps it
    owner.flush_conntrack = lambda vip, ip: None
    bare = []
    for k in range(changes, 2 * changes):
        nxt = changed(current, k)
        bare.append(timed(lambda nxt=nxt: applier.apply(nxt)))
        current = nxt
    size = applier.size
    applier.cleanup()
    nan = float("nan")
    no_events = {"event_ms": nan, "event_max_ms": nan, "event_sync_ms": nan}
    ev = event_to_kernel(node, json.loads(text), backend, changes) if events else no_events
    rss_mb = peak_rss_mb(node, path, backend) if rss else float("nan")
    applier.cleanup()
    return {
        "services": n,
        "backend": backend,
        "compute_s": compute_s,
        "full_s": first,
        "resync_s": again,
        "restart_s": restart,
        "change_ms": statistics.median(times) * 1000,
        "change_max_ms": max(times) * 1000,
        "rules_ms": statistics.median(bare) * 1000,
        "programmed": size,
        "rss_mb": rss_mb,
        **ev,
    }


def report(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    load = os.getloadavg()
    lines = [
        "# node-sync at cluster scale (issue #15)",
        "",
        f"`python -m bench.nodesync_bench` on {platform.node()} ({os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"{nft_version()}, {iptables_version()}); load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        "Synthetic cluster: one enabled namespace, N Services × 3 ready endpoints. "
        "compute = JSON → state → transaction text in process; full = first sync of an "
        "empty node; resync = a full sync of a programmed node by the same process; "
        "restart = the first (full) sync of a new process on a programmed node, which "
        "reads the node's rules first; change = one Service's "
        "endpoint replaced, partial sync with its conntrack delete (one `conntrack -D` "
        "run), median (max) of several; rules only = the same without the conntrack "
        "delete; event → nft = one EndpointSlice watch event handed to node-sync's "
        "`Syncer` until the backend's transaction returned (state updated, rules "
        "recomputed, diffed, applied; conntrack delete left out), median (max); event → "
        "synced = the same with the conntrack delete; RSS = peak of one `node-sync --once` "
        "process.",
        "",
        "| Services | backend | compute | full sync | full ÷ compute | resync | restart | "
        "one change | rules only | event → nft | event → synced | programmed | RSS |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['services']:,} | {r['backend']}{' †' if r.get('reused') else ''} | "
            f"{r['compute_s']:.3f} s | "
            f"{r['full_s']:.3f} s | {r['full_s'] / r['compute_s']:.1f} | "
            f"{r['resync_s']:.3f} s | {r['restart_s']:.3f} s | {r['change_ms']:.1f} ms "
            f"({r['change_max_ms']:.1f}) | {r['rules_ms']:.1f} ms | "
            f"{r['event_ms']:.1f} ms ({r['event_max_ms']:.1f}) | {r['event_sync_ms']:.1f} ms | "
            f"{r['programmed']:,} | {r['rss_mb']:.0f} MB |".replace("nan MB", "–")
            .replace("nan ms (nan)", "–")
            .replace("nan ms", "–")
        )
    if any(r.get("reused") for r in rows):
        lines += ["", "† from an earlier run of this script (`--reuse`), not measured again."]
    lines += ["", "Targets (issue #15), nft backend:"]
    big = [r for r in rows if r["backend"] == "nft" and r["services"] == max(sizes)]
    for r in big:
        factor = r["full_s"] / r["compute_s"]
        lines.append(
            f"- full sync of {r['services']:,} Services ≤ {TARGET_FULL_FACTOR:.0f} × "
            f"compute: {factor:.1f} × — {'met' if factor <= TARGET_FULL_FACTOR else 'NOT met'}"
        )
        lines.append(
            f"- RSS ≤ {TARGET_RSS_MB:.0f} MB at {r['services']:,} Services: "
            f"{r['rss_mb']:.0f} MB — {'met' if r['rss_mb'] <= TARGET_RSS_MB else 'NOT met'}"
        )
    nft = [r for r in rows if r["backend"] == "nft"]
    for what, key in (
        ("programming (one change)", "change_ms"),
        ("watch event → nft transaction returned", "event_ms"),
        ("watch event → sync done, conntrack delete included", "event_sync_ms"),
    ):
        worst = max((r[key] for r in nft), default=0.0)
        lines.append(
            f"- one change ≤ {TARGET_CHANGE_MS:.0f} ms at any size (median), {what}: worst "
            f"{worst:.1f} ms — {'met' if worst <= TARGET_CHANGE_MS else 'NOT met'}"
        )
    return "\n".join(lines) + "\n"


def reused_rows(path: str | None, wanted: str) -> dict[tuple[int, str], dict[str, Any]]:
    """The rows of ``path`` (JSON lines) named in ``wanted`` (``SERVICES:BACKEND,...``)."""
    if not path or not wanted:
        return {}
    keys = {(int(k.split(":")[0]), k.split(":")[1]) for k in wanted.split(",")}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line[:1] == "{"]
    found = {(r["services"], r["backend"]): r for r in rows if "compute_s" in r}
    return {k: found[k] for k in keys}


def nft_version() -> str:
    return _first_line(["nft", "--version"])


def iptables_version() -> str:
    return _first_line(["iptables", "--version"])


def _first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return f"{argv[0]}: ?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--backends", default="nft,iptables")
    p.add_argument("--changes", type=int, default=7, help="one-endpoint changes per size")
    p.add_argument(
        "--rss-backends",
        default="nft,iptables",
        help="measure node-sync's RSS with these backends (one more full sync each)",
    )
    p.add_argument(
        "--event-backends",
        default="nft",
        help="measure watch event → kernel with these backends (iptables at 10,000 "
        "Services costs minutes more and is the change time plus the compute)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "nodesync.md"))
    p.add_argument(
        "--reuse",
        metavar="FILE",
        help="JSON lines of an earlier run (this script's stdout) whose rows of "
        "SERVICES:BACKEND pairs named by --reuse-rows are reported instead of measured "
        "again (marked † in the table)",
    )
    p.add_argument("--reuse-rows", default="", help="e.g. 10000:iptables")
    p.add_argument(
        "--events-only",
        action="store_true",
        help="measure only the watch event → kernel times (JSON lines, no markdown)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a network namespace of its own)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    reused = reused_rows(args.reuse, args.reuse_rows)
    node = f"nsb{netns.unique_suffix()}"
    rows = []
    netns.create(node)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in sizes:
                for backend in args.backends.split(","):
                    if args.events_only:
                        ev = event_to_kernel(node, cluster(n), backend, args.changes)
                        print(json.dumps({"services": n, "backend": backend, **ev}), flush=True)
                        continue
                    if (n, backend) in reused:
                        rows.append({**reused[(n, backend)], "reused": True})
                        continue
                    row = run_size(
                        node,
                        n,
                        backend,
                        args.changes,
                        Path(tmp),
                        backend in args.rss_backends.split(","),
                        backend in args.event_backends.split(","),
                    )
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        netns.delete(node)
    if args.events_only:
        return 0
    text = report(rows, sizes)
    Path(args.out).write_text(text)
    print(text)
    print(
        f"peak RSS of this harness: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
