"""An agent restart on a node, as a DaemonSet upgrade makes it, seen from the pods:
``python -m bench.agent_restart [--rounds 3] [--out bench/results/agent-restart.md]``.

Root; it takes the machine (run it under ``flock /tmp/tencrypt-machine.lock``). Each round runs
``tests/netns/test_node_image.py::test_node_image_agent_restart_during_a_stream_and_requests``
for both agents, on the node image under podman and a lab of its own:

- ``keep``: the DaemonSet's agent (``--proxy-cgroup sandbox --on-exit keep``): its proxies
  left its cgroup for their pods', a ``podman stop`` spares them, the next agent adopts them;
- ``unpatch``: the agent before (``--proxy-cgroup agent --on-exit unpatch``): it restores its
  pods on SIGTERM, the next one patches them again.

Across the restart (``podman stop`` of the agent, a new agent started): a 16 s iperf3 stream
and an HTTP request every 50 ms from nginx1 to nginx2, both patched. The figures: the
stream's exit and its one-second intervals without data, requests that failed and the
longest gap between two answered ones, and whether the pods still run the same proxy
processes. Wall-clock figures of a shared 2-core machine: read them as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/netns/test_node_image.py::test_node_image_agent_restart_during_a_stream_and_requests"


def run_round(record: Path) -> int:
    env = {**os.environ, "TENCRYPT_RESTART_RECORD": str(record)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov", TEST],
        cwd=REPO,
        env=env,
        timeout=3600,
        capture_output=True,
        text=True,
    )
    return done.returncode


def render(rows: list[dict[str, object]], rounds: int) -> str:
    head = (
        "| agent | round | agent back (s) | iperf3 exit | seconds without data | smallest "
        "second (MB) | requests ok | failed | longest gap (s) | same proxies |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    seen: dict[str, int] = {}
    lines = []
    for row in rows:
        mode = str(row["mode"])
        seen[mode] = seen.get(mode, 0) + 1
        lines.append(
            f"| {mode} | {seen[mode]} | {row['agent_back_s']} | {row['iperf3_exit']} | "
            f"{row['seconds_without_data']} | {float(str(row['smallest_interval_bytes'])) / 1e6:.0f} | "
            f"{row['requests_ok']} | {row['requests_failed']} | {row['longest_gap_s']} | "
            f"{'yes' if row['same_proxy_processes'] else 'no'} |"
        )
    return (
        "# Agent restart during traffic\n\n"
        f"`python -m bench.agent_restart --rounds {rounds}`, {time.strftime('%Y-%m-%d')}, "
        f"{platform.node()} ({os.cpu_count()} CPUs). Method: bench/agent_restart.py. "
        "`keep` is daemonset.yaml's agent (proxies in their pods' cgroups, adopted by the next "
        "agent); `unpatch` the agent before it (pods restored on the way out, patched again "
        'by the next agent). "agent back": from `podman stop` to every proxy adopted (keep) '
        "or every pod patched again (unpatch).\n\n" + head + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agent_restart", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="rounds of both agents (default: 3)")
    p.add_argument("--out", default=str(REPO / "bench/results/agent-restart.md"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("agent_restart: needs root (namespaces, podman)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "figures.jsonl"
        for n in range(1, args.rounds + 1):
            print(f"agent_restart: round {n} of {args.rounds} (both agents)", file=sys.stderr)
            code = run_round(record)
            if code != 0:
                print(f"agent_restart: round {n}: the test failed (exit {code})", file=sys.stderr)
        rows = (
            [json.loads(line) for line in record.read_text().splitlines()]
            if record.exists()
            else []
        )
    if not rows:
        print("agent_restart: no figures recorded", file=sys.stderr)
        return 1
    Path(args.out).write_text(render(rows, args.rounds))
    print(f"agent_restart: {len(rows)} runs written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
