"""The proxy's read loop and event loop, A/B on one lab: ``python -m bench.eventloop``.

Issue 26 asks uvloop to be measured again on the sparse shape, and the cold path's syscall
diet (daemon.py READS, linux/spin.py rule 1) to be checked against the same shape and bulk TCP.
On a one-node lab of its own (unique name, always removed), for each variant in turn, both
pods patched with it (nginx1 -> nginx2's Service, cluster mode):
 1. RSS of each proxy when it is ready (``VmRSS`` once `tencrypt: ready` is printed);
 2. ``sparse``: bench/coldpath.py's shape, a 1-byte TCP request every ``--interval-ms`` (20)
    for ``--seconds``, median and p90 round trip; ``perf stat`` of both proxies meanwhile
    (page faults, context switches, CPU per request);
 3. ``syscalls``: the same shape under ``perf trace -s`` on both proxies: system calls per
    request per proxy (its round trip is not the figure: tracing slows it);
 4. ``rr``: back-to-back 1-byte request/response for ``--seconds`` (bench/measure.py), median;
 5. ``tcp``: iperf3 TCP, one stream, ``--seconds``, Gbit/s.
Variants (``--variants``, comma-separated, run ``--rounds`` times in rotation so that drift of
the shared machine spreads over all of them): ``before`` (the tree ``--before-tree`` names,
e.g. a checkout of the commit before a change: the proxies import it through PYTHONPATH), ``asyncio`` (this tree,
``--spin-us 400``, the default), ``asyncio0`` (this tree, ``--spin-us 0``), ``uvloop`` (this
tree on uvloop's loop, which has no polling window: `tencrypt run` has no option for it, so the
proxies run through a shim, ``UVLOOP_SHIM``, written as the lab's ``tencrypt`` executable, that
imports uvloop first and runs ``runcmd.serve`` on it; uvloop must be installed in this
Python, e.g. ``pip install uvloop``; nothing of tencrypt/ changes). ``--faults`` adds, once per
variant, ``perf record -e page-faults -g`` of proxy A during a sparse phase and prints where
its faults come from. Run it under the machine lock:
``flock /tmp/tencrypt-machine.lock python -m bench.eventloop --json out.json``; it prints a
markdown table at the end (``python -m bench.eventloop --summarise out.json`` prints it again;
syscalls, faults and CPU per request there are the first round's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import coldpath, measure

TREE = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {  # name -> (tree, run arguments)
    "before": ("before", ("--spin-us", "400")),
    "asyncio": ("this", ("--spin-us", "400")),
    "asyncio0": ("this", ("--spin-us", "0")),
    "uvloop": ("this", ("--spin-us", "0")),  # through UVLOOP_SHIM
}
UVLOOP_SHIM = """#!{python}
import asyncio, sys
import uvloop  # first: it imports ssl, which cli.keep_out would keep out
from tencrypt import cli, runcmd

def main(args):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(runcmd.serve(args))

runcmd.main = main
sys.exit(cli.main(sys.argv[1:]))
"""
STAT_EVENTS = "task-clock,context-switches,page-faults"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.eventloop", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seconds", type=float, default=10.0, help="per phase (default 10)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="sparse shape's gap (20)")
    p.add_argument("--variants", default="asyncio,asyncio0,uvloop")
    p.add_argument("--before-tree", type=Path, help="a checkout to compare (variant before)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--phases", default="sparse,syscalls,rr,tcp")
    p.add_argument("--faults", action="store_true", help="where proxy A's page faults come from")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; of {','.join(VARIANTS)}")
    if "before" in a.variants.split(",") and a.before_tree is None:
        p.error("--variants before: --before-tree names the checkout to compare")
    return a


def say(text: str) -> None:
    print(f"eventloop: {text}", file=sys.stderr, flush=True)


def round_trips(phase: coldpath.Phase) -> dict[str, float]:
    values = sorted((t1 - t0) / 1000 for t0, t1 in phase.client[coldpath.WARMUP :])
    return {
        "median_us": statistics.median(values),
        "p90_us": coldpath.percentile(values, 90),
        "n": len(values),
    }


def one_variant(
    lab: Any, a: argparse.Namespace, name: str, logs: Path, faults: bool
) -> dict[str, Any]:
    tree_kind, run_args = VARIANTS[name]
    tree = a.before_tree if tree_kind == "before" else TREE
    opts = coldpath.Options(a.seconds, a.interval_ms / 1000, [], [], None)
    phases = a.phases.split(",")
    out: dict[str, Any] = {}
    shim = None
    if name == "uvloop":  # an executable named tencrypt: the lab recognises its proxy by name
        shim = logs / "uvloop" / "tencrypt"
        shim.parent.mkdir(exist_ok=True)
        shim.write_text(UVLOOP_SHIM.format(python=sys.executable))
        shim.chmod(0o755)
    with coldpath.patched(lab, run_args, shim, tree) as pids:
        out["rss_ready_mb"] = {
            n: (measure.status_kb(p, "VmRSS") or 0) / 1024 for n, p in pids.items()
        }
        if "sparse" in phases:
            argvs = {
                n: ["perf", "stat", "-x,", "-e", STAT_EVENTS, "-p", str(p)] for n, p in pids.items()
            }
            ph = coldpath.sparse(lab, opts, logs, lambda: coldpath.observe(argvs, logs))
            n = len(ph.client)
            stats = {k: coldpath.parse_perf_stat(v) for k, v in ph.extra.items()}
            out["sparse"] = round_trips(ph)
            out["per_request"] = {
                k: {e: (v / n if v is not None else None) for e, v in s.items()}
                for k, s in stats.items()
            }
        if "syscalls" in phases:
            argvs = {n: ["perf", "trace", "-s", "-p", str(p)] for n, p in pids.items()}
            ph = coldpath.sparse(lab, opts, logs, lambda: coldpath.observe(argvs, logs))
            n = len(ph.client)
            traced = {k: coldpath.parse_perf_trace(v) for k, v in ph.extra.items()}
            out["syscalls"] = {
                k: {s: [c / n, e / n] for s, (c, e, _ms) in t.items()} for k, t in traced.items()
            }
            out["syscalls_total"] = {
                k: sum(c for c, _e, _ms in t.values()) / n for k, t in traced.items()
            }
        if faults:
            data = logs / f"faults-{name}.data"
            argv = [
                "perf",
                "record",
                "-e",
                "page-faults",
                "-g",
                "-o",
                str(data),
                "-p",
                str(pids["A"]),
            ]
            coldpath.sparse(lab, opts, logs, lambda: coldpath.observe({"faults": argv}, logs))
            report = subprocess.run(
                [
                    "perf",
                    "report",
                    "-i",
                    str(data),
                    "--stdio",
                    "--no-children",
                    "-G",
                    "--sort",
                    "dso,sym",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
            out["faults_report"] = report[:20000]
        b = lab.pods["nginx2"]
        a_ns = lab.pods["nginx1"].netns
        if "rr" in phases:
            with measure.rr_server(b.netns, logs / "rr.log"):
                measure.wait_reachable(a_ns, b.vip)
                rr = measure.request_response(a_ns, b.vip, a.seconds)
            out["rr_p50_us"] = rr.p50_us
        if "tcp" in phases:
            got = measure.iperf(a_ns, b.netns, b.vip, a.seconds, logs / "iperf.log")
            out["tcp_gbps"] = got.gbps
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from bench.attach import bench_topology
    from tencrypt.lab.cluster import Lab
    from tencrypt.linux import netns

    results: dict[str, Any] = {
        "options": vars(a) | {"json": str(a.json), "before_tree": str(a.before_tree)}
    }
    variants = a.variants.split(",")
    lab = Lab(f"evl{netns.unique_suffix()}", topology=bench_topology(), nodes=1)
    with tempfile.TemporaryDirectory(prefix="eventloop-") as tmp:
        logs = Path(tmp)
        try:
            lab.up()
            opts = coldpath.Options(a.seconds, a.interval_ms / 1000, [], [], None)
            results["vanilla"] = [round_trips(coldpath.sparse(lab, opts, logs))]
            say(f"vanilla sparse {results['vanilla'][0]}")
            for r in range(a.rounds):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for name in order:
                    say(f"round {r + 1}: {name}")
                    try:
                        got = one_variant(lab, a, name, logs, a.faults and r == 0)
                    except Exception as exc:  # reported; the next variant still runs
                        say(f"{name} failed: {exc}")
                        got = {"error": str(exc)}
                    results.setdefault(name, []).append(got)
                    say(
                        f"{name}: {json.dumps({k: v for k, v in got.items() if k != 'faults_report'})}"
                    )
            results["vanilla"].append(round_trips(coldpath.sparse(lab, opts, logs)))
        finally:
            lab.down()
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown: per variant, each round's figures (A/B: the two proxies) and the medians."""
    rows = [
        "| variant | sparse RR median µs | sparse p90 µs | back-to-back RR p50 µs | TCP Gbit/s "
        "| RSS ready MB (A/B) | syscalls/request (A/B) | page faults/request (A/B) "
        "| CPU ms/request (A/B) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(d: dict[str, Any] | None, fmt: str) -> str:
        return "/".join(format(d[k], fmt) for k in ("A", "B")) if d else "-"

    for name, runs in results.items():
        if name in ("options", "vanilla"):
            continue
        ok = [r for r in runs if "error" not in r]
        if not ok:
            continue

        def col(get: Any, fmt: str, rs: list[dict[str, Any]] = ok) -> str:
            vals = [get(r) for r in rs if get(r) is not None]
            if not vals:
                return "-"
            each = ", ".join(format(v, fmt) for v in vals)
            return f"{format(statistics.median(vals), fmt)} ({each})"

        per = [r.get("per_request") or {} for r in ok]
        rows.append(
            f"| {name} | {col(lambda r: r.get('sparse', {}).get('median_us'), '.0f')} "
            f"| {col(lambda r: r.get('sparse', {}).get('p90_us'), '.0f')} "
            f"| {col(lambda r: r.get('rr_p50_us'), '.0f')} "
            f"| {col(lambda r: r.get('tcp_gbps'), '.2f')} "
            f"| {pair(ok[0]['rss_ready_mb'], '.1f')} "
            f"| {pair(ok[0].get('syscalls_total'), '.2f')} "
            f"| {pair({k: v['page-faults'] for k, v in per[0].items()} if per[0] else None, '.2f')} "
            f"| {pair({k: v['task-clock'] for k, v in per[0].items()} if per[0] else None, '.2f')} |"
        )
    vanilla = ", ".join(f"{v['median_us']:.0f}" for v in results.get("vanilla", []))
    return "\n".join(rows) + f"\n\nvanilla sparse RR median (first, last): {vanilla} µs\n"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--summarise":
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    a = parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (network namespaces, perf)")
        return 2
    started = time.monotonic()
    results = run(a)
    text = json.dumps(results, indent=1) + "\n"
    if a.json:
        a.json.write_text(text)
    else:
        print(text)
    print(table(results))
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
