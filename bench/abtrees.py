"""Two (or more) checkouts of Tencrypt against each other on one lab: ``python -m bench.abtrees``.

What a change to the per-packet path did, measured where it matters, without the rest of the
full bench (``tencrypt bench``). On one lab of its own (bench.attach's topology, ``--nodes``
1 or 2; unique name, always removed), per round: vanilla (no proxy), then both pods patched
with ``tencrypt run --express`` importing each tree in turn (bench/coldpath.py ``patched``),
so that machine load drifts hit every tree alike:
 1. sparse request/response: a 1-byte TCP request every 20 ms over one connection for
    ``--seconds`` (bench/coldpath.py's client and server), median round trip;
 2. back-to-back request/response for ``--rr`` seconds (bench/measure.py), median;
 3. with ``--iperf S``: TCP throughput, iperf3 for S seconds (``--parallel`` streams, 1), and
    both proxies' CPU over it per Gbit/s (bench/cpustat.py, as the full bench counts it).
Prints each round, then per tree the medians added over vanilla (per round and their median);
``--json`` keeps the figures. Each tree needs its compiled extension built in place
(``python setup.py build_ext --inplace``). Run it under the machine lock:
``flock /tmp/tencrypt-machine.lock python -m bench.abtrees /path/a /path/b``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def one(lab: Any, tree: str | None, args: argparse.Namespace, logs: Path) -> dict[str, float]:
    from bench import coldpath, cpustat, measure

    a, b = lab.pods["nginx1"], lab.pods["nginx2"]
    patched = (
        coldpath.patched(lab, ("--express",), tree=Path(tree))
        if tree is not None
        else contextlib.nullcontext()
    )
    with patched as pids:
        phase = coldpath.sparse(lab, coldpath.Options(args.seconds, 0.020, [], [], None), logs)
        rtts = [(t1 - t0) / 1000 for t0, t1 in phase.client[coldpath.WARMUP :]]
        with measure.rr_server(b.netns, logs / "rr.log"):
            measure.wait_reachable(a.netns, b.vip)
            rr = measure.request_response(a.netns, b.vip, args.rr)
        fig = {"sparse_p50_us": statistics.median(rtts), "rr_p50_us": rr.p50_us}
        if args.iperf > 0:
            procs = list(pids.values()) if pids else []
            before = cpustat.snapshot(procs, a.netns, b.netns)
            result = measure.iperf(
                a.netns, b.netns, b.vip, args.iperf, logs / "i.log", parallel=args.parallel
            )
            used = cpustat.seconds_used(before, cpustat.snapshot(procs, a.netns, b.netns))
            fig["tcp_gbps"] = result.gbps
            gigabits = result.mbytes * 8 / 1000  # received, as harness.Bench.cpu divides by
            per = cpustat.cores_per_gbps(sum(used.values()), gigabits) if procs else None
            if per is not None:  # both proxies' CPU over the run, as the full bench counts it
                fig["cores_per_gbps"] = per
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abtrees", description=__doc__.split("\n")[0])
    p.add_argument("trees", nargs="+", help="checkouts to compare (each built in place)")
    p.add_argument("--rounds", type=int, default=3, help="alternations (3)")
    p.add_argument("--nodes", type=int, choices=(1, 2), default=1, help="lab shape (1)")
    p.add_argument("--seconds", type=float, default=6.0, help="sparse phase (6)")
    p.add_argument("--rr", type=float, default=3.0, help="back-to-back phase (3)")
    p.add_argument("--iperf", type=float, default=0.0, help="iperf3 TCP seconds (0: none)")
    p.add_argument("--parallel", type=int, default=1, help="iperf3 TCP streams (1)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.abtrees: needs root (network namespaces)", file=sys.stderr)
        return 2
    trees = [str(Path(t).resolve()) for t in args.trees]
    for tree in trees:
        if not (Path(tree) / "tencrypt" / "__init__.py").is_file():
            print(f"bench.abtrees: {tree} is not a Tencrypt checkout", file=sys.stderr)
            return 2
    from bench.attach import bench_topology
    from tencrypt.lab.cluster import Lab
    from tencrypt.linux import netns

    names = ["vanilla", *trees]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    lab = Lab(f"abt{netns.unique_suffix()}", topology=bench_topology(), nodes=args.nodes)
    with tempfile.TemporaryDirectory(prefix="abtrees-") as tmp:
        try:
            lab.up()
            for r in range(args.rounds):
                for name in names:
                    fig = one(lab, None if name == "vanilla" else name, args, Path(tmp))
                    runs[name].append(fig)
                    cells = ", ".join(f"{k} {v:,.2f}" for k, v in fig.items())
                    print(f"round {r + 1} {name}: {cells}", flush=True)
        finally:
            lab.down()
    base = runs["vanilla"]
    for tree in trees:
        if args.iperf > 0:
            each = " / ".join(f"{run['tcp_gbps']:.2f}" for run in runs[tree])
            cpu = " / ".join(f"{run.get('cores_per_gbps', float('nan')):.3f}" for run in runs[tree])
            print(f"{tree}: TCP {each} Gbit/s, both proxies {cpu} cores per Gbit/s")
        for key in ("sparse_p50_us", "rr_p50_us"):
            added = [run[key] - v[key] for run, v in zip(runs[tree], base, strict=True)]
            each = " / ".join(f"{x:+,.0f}" for x in added)
            print(
                f"{tree}: {key} added over vanilla {each} µs, median {statistics.median(added):+,.0f}"
            )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
