"""The express lane against the Python path on one lab: ``python -m bench.express``.

Issue 26. One one-node lab of its own (bench.attach's topology: nginx1 -> nginx2's Service;
unique name, always removed), then per mode — vanilla (no proxy), ``tencrypt run`` and
``tencrypt run --express`` — in turn, alternating ``--rounds`` times so that machine load
drifts hit every mode alike:
 1. sparse request/response: a 1-byte TCP request every 20 ms over one connection
    (bench/coldpath.py's client and server), median and p90 round trip;
 2. back-to-back request/response (bench/measure.py), median;
 3. ping: ``--pings`` ICMP echoes every 50 ms (as ``tencrypt bench``: to nginx2's Service
    cluster IP through Tencrypt, to its pod IP for vanilla, where a VIP answers no ICMP),
    median round trip (the express lane takes ICMP echoes both ways since issue 26's ICMP step);
 4. single-stream TCP throughput, iperf3 (``--iperf`` seconds; 0 skips it).
Prints one markdown table; ``--json`` keeps the figures. Run it under the machine lock:
``flock /tmp/tencrypt-machine.lock python -m bench.express``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MODES = ("vanilla", "tencrypt", "express")


@contextlib.contextmanager
def patched(lab: Any, mode: str) -> Iterator[None]:
    if mode == "vanilla":
        yield
        return
    from bench import coldpath

    with coldpath.patched(lab, ("--express",) if mode == "express" else ("--no-express",)):
        yield


def lane_counts(lab: Any) -> dict[str, int]:
    """What the two proxies' lanes sealed and opened so far (``/status`` ``express``)."""
    from tencrypt.lab.proxy import METRICS
    from tencrypt.linux import netns

    counts: dict[str, int] = {}
    for pod in ("nginx1", "nginx2"):
        url = f"http://{METRICS}/status"
        doc = json.loads(netns.run(lab.pods[pod].netns, ["curl", "-sS", url]).stdout)
        for way in ("sealed", "opened"):
            counts[f"{pod}_{way}"] = int(doc.get("express", {}).get(way, 0))
    return counts


def one_round(lab: Any, mode: str, args: argparse.Namespace, logs: Path) -> dict[str, float]:
    from bench import coldpath, measure

    a, b = lab.pods["nginx1"], lab.pods["nginx2"]
    out: dict[str, float] = {}
    with patched(lab, mode):
        opts = coldpath.Options(args.seconds, 0.020, [], [], None)
        ph = coldpath.sparse(lab, opts, logs)
        rtts = sorted((t1 - t0) / 1000 for t0, t1 in ph.client[coldpath.WARMUP :])
        out["sparse_p50_us"] = statistics.median(rtts)
        out["sparse_p90_us"] = coldpath.percentile(rtts, 90)
        with measure.rr_server(b.netns, logs / "rr.log"):
            measure.wait_reachable(a.netns, b.vip)
            rr = measure.request_response(a.netns, b.vip, args.rr)
        out["rr_p50_us"] = rr.p50_us
        out["rr_per_s"] = rr.rate
        if args.pings > 0:
            host = b.ip if mode == "vanilla" else b.vip  # as bench.attach's targets
            before = lane_counts(lab) if mode == "express" else {}
            out["ping_p50_us"] = measure.ping(a.netns, host, args.pings, 0.05).p50_ms * 1000
            for hop, count in lane_counts(lab).items() if before else ():
                out[f"ping_lane_{hop}"] = count - before[hop]  # packets of the ping it took
        if args.iperf > 0:
            tcp = measure.iperf(a.netns, b.netns, b.vip, args.iperf, logs / "iperf.log")
            out["tcp_gbps"] = tcp.gbps
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.express", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="sparse phase (default 10)")
    p.add_argument("--rr", type=float, default=5.0, help="back-to-back phase (default 5)")
    p.add_argument("--pings", type=int, default=40, help="echoes every 50 ms (40; 0: skip)")
    p.add_argument("--iperf", type=float, default=5.0, help="iperf3 seconds (5; 0: skip)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the modes (2)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.express: needs root (network namespaces)", file=sys.stderr)
        return 2
    from bench.attach import bench_topology
    from tencrypt.lab.cluster import Lab
    from tencrypt.linux import netns

    root = str(Path(__file__).resolve().parents[1])  # the proxies import this tree
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    lab = Lab(f"expr{netns.unique_suffix()}", topology=bench_topology(), nodes=1)
    with tempfile.TemporaryDirectory(prefix="express-bench-") as tmp:
        try:
            lab.up()
            for r in range(args.rounds):
                for mode in MODES:
                    fig = one_round(lab, mode, args, Path(tmp))
                    runs[mode].append(fig)
                    print(f"round {r + 1} {mode}: {fig}", file=sys.stderr, flush=True)
        finally:
            lab.down()
    keys = list(runs["vanilla"][0])
    print("| mode | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for mode in MODES:
        cells = [
            " / ".join(
                f"{run[k]:,.2f}" if k == "tcp_gbps" else f"{run[k]:,.0f}" for run in runs[mode]
            )
            for k in keys
        ]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print()
    for run in runs["express"]:  # the ping's echoes the lanes took, of ``--pings`` each way
        print(
            "express lanes during the ping: "
            + ", ".join(f"{k[10:]} {v:.0f}" for k, v in run.items() if k.startswith("ping_lane_"))
        )
    for k in ("sparse_p50_us", "ping_p50_us"):  # added over vanilla, round by round
        if k in keys:
            added = {
                m: " / ".join(
                    f"+{run[k] - base[k]:,.0f}"
                    for run, base in zip(runs[m], runs["vanilla"], strict=True)
                )
                for m in MODES[1:]
            }
            print(f"added over vanilla, {k}: " + "; ".join(f"{m} {v} µs" for m, v in added.items()))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
