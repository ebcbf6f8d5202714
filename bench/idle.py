"""What a node pays for N idle proxies: CPU, RSS, PSS and private memory, exec'd or forked.

    python -m bench.idle --proxies 50 [--mode exec|fork] [--idle 30] [--json FILE]

Root; it takes the machine: run it under ``flock /tmp/tencrypt-machine.lock``. Each proxy gets a
pod of its own, as a real pod would have::

    [ idl<suffix>x<i> ]  eth0 10.128.<i/250>.<i%250+2>/16 --veth-- peer0 (same namespace)
                         default via 10.128.0.1; /etc/netns/<name>/resolv.conf -> 172.30.0.10

Stages:
 1. make the N namespaces and run ``tencrypt setup`` in each (one project key, one state
    directory under a temporary directory);
 2. start the N proxies: ``exec``, each its own program (``ip netns exec NAME tencrypt run``,
    what the launcher's ``nsenter … exec tencrypt run`` makes); ``fork``, each forked by one
    warm zygote (tencrypt/linux/zygote.py) into its namespace, same arguments;
 3. wait for every proxy's "tencrypt: ready" line (bounded), let them idle ``--idle`` seconds,
    and read per proxy utime+stime over that window (/proc/PID/stat) and then Rss, Pss and
    Private_Clean + Private_Dirty (/proc/PID/smaps_rollup); in fork mode the zygote's own
    figures too (the node pays it once);
 4. SIGTERM every proxy's process group and count the clean exits (code 0, bounded wait);
    remove the namespaces, their resolv.conf and the temporary directory — also on a failure
    or Ctrl-C (SIGTERM to the bench does the same).

Memory a node pays for the N proxies = the sum of their PSS (plus the zygote's): the pages
they share are split between them. The private memory per proxy is what one more pod adds.
The report (stdout, markdown) gives totals and per-proxy medians.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.cpustat import parse_stat_ticks
from tencrypt.linux import netns

TENCRYPT = str(Path(sys.executable).parent / "tencrypt")
RESOLV = (
    "nameserver 172.30.0.10\nsearch shop.svc.cluster.local svc.cluster.local "
    "cluster.local\noptions ndots:5\n"
)
READY = "tencrypt: ready"
READY_TIMEOUT = 240.0  # all proxies, from the first start
STOP_TIMEOUT = 30.0


@dataclass(slots=True)
class Memory:
    rss_kb: int
    pss_kb: int
    private_kb: int


@dataclass(slots=True)
class ProxyFigures:
    pid: int
    cpu_s: float
    rss_kb: int
    pss_kb: int
    private_kb: int


def parse_smaps_rollup(text: str) -> Memory | None:
    """Rss, Pss and Private_Clean + Private_Dirty (kB) of a ``/proc/PID/smaps_rollup``; None
    if a field is missing."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    try:
        return Memory(
            fields["Rss"], fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]
        )
    except KeyError:
        return None


def private_by_mapping(text: str) -> dict[str, int]:
    """Private_Clean + Private_Dirty (kB) per mapping name of a ``/proc/PID/smaps`` text
    (anonymous mappings: "[anon]", files by their base name), where a proxy's own memory
    lies."""
    out: dict[str, int] = {}
    name = "[anon]"
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
            name = Path(parts[5]).name if len(parts) > 5 else "[anon]"  # a file: its name
        elif parts[0] in ("Private_Clean:", "Private_Dirty:") and len(parts) > 1:
            out[name] = out.get(name, 0) + int(parts[1])
    return out


def memory(pid: int) -> Memory | None:
    try:
        return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return None


def ticks(pid: int) -> int | None:
    try:
        return parse_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def pod_address(i: int) -> str:
    return f"10.128.{i // 250}.{i % 250 + 2}/16"


@contextmanager
def pods(count: int, say: Progress) -> Iterator[list[str]]:
    """``count`` pod namespaces (module picture), removed afterwards whatever happens."""
    suffix = netns.unique_suffix()
    names: list[str] = []
    try:
        for i in range(count):
            name = f"idl{suffix}x{i}"
            names.append(name)
            netns.create(name)
            for cmd in (
                ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                ["ip", "addr", "add", pod_address(i), "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "link", "set", "peer0", "up"],
                ["ip", "route", "add", "default", "via", "10.128.0.1"],
            ):
                netns.run(name, cmd)
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(RESOLV)
            say(f"pods: {i + 1}/{count} made")
        yield names
    finally:
        for name in names:
            netns.delete(name)
            etc = Path("/etc/netns") / name
            with suppress(OSError):
                (etc / "resolv.conf").unlink(missing_ok=True)
                etc.rmdir()
        left = [n for n in names if netns.exists(n)]
        if left:
            print(f"idle: namespaces left behind: {' '.join(left)}", file=sys.stderr)


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"idle [{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)


def run_args(key: Path, state: Path) -> list[str]:
    return ["--psk-file", str(key), "--state-dir", str(state)]


def start_exec(name: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # `ip netns exec` execs the program after entering: the PID is the proxy's own
    return netns.spawn(name, [TENCRYPT, "run", *args], log=log)


def wait_ready(logs: dict[int, Path], say: Progress, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = dict(logs)
    while waiting:
        for pid, log in list(waiting.items()):
            text = log.read_text(errors="replace") if log.exists() else ""
            if READY in text:
                del waiting[pid]
            elif ticks(pid) is None:
                raise RuntimeError(f"proxy {pid} died before ready:\n{text[-2000:]}")
        say(f"ready: {len(logs) - len(waiting)}/{len(logs)}")
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"{len(waiting)} proxies not ready after {timeout:.0f}s")
        if waiting:
            time.sleep(1.0)


def stop(pids: list[int], timeout: float) -> int:
    """SIGTERM each proxy's group; how many exited (gone from /proc) within ``timeout``."""
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.2)
    return sum(not _running(p) for p in pids)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] not in "ZX"


def measure(args: argparse.Namespace) -> dict[str, object]:
    say = Progress()
    tmp = Path(tempfile.mkdtemp(prefix="tencrypt-idle-"))
    key, state = tmp / "psk", tmp / "state"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o600)
    pids: list[int] = []
    children: list[subprocess.Popen[bytes]] = []
    zygote = None
    try:
        with pods(args.proxies, say) as names:
            for i, name in enumerate(names):
                netns.run(name, [TENCRYPT, "setup", "--state-dir", str(state)], timeout=120)
                say(f"setup: {i + 1}/{len(names)}")
            logs: dict[int, Path] = {}
            if args.mode == "fork":
                from tencrypt.linux.zygote import Zygote

                zygote = Zygote(log=tmp / "zygote.log")
                netns.wait_for(
                    lambda: "tencrypt zygote: ready" in (tmp / "zygote.log").read_text(),
                    timeout=60,
                    what="the zygote",
                )
            for i, name in enumerate(names):
                log = tmp / f"{name}.log"
                if zygote is not None:
                    pid = zygote.spawn(f"/run/netns/{name}", run_args(key, state), log)
                else:
                    children.append(start_exec(name, run_args(key, state), log))
                    pid = children[-1].pid
                pids.append(pid)
                logs[pid] = log
                say(f"started: {i + 1}/{len(names)} ({args.mode})")
            wait_ready(logs, say, READY_TIMEOUT)
            say(f"all {len(pids)} ready; idling {args.idle:.0f}s")
            before = {pid: ticks(pid) for pid in pids}
            zt0 = ticks(zygote.pid) if zygote else None
            time.sleep(args.idle)
            after = {pid: ticks(pid) for pid in pids}
            zt1 = ticks(zygote.pid) if zygote else None
            tck = os.sysconf("SC_CLK_TCK")
            figures = []
            for pid in pids:
                mem, t0, t1 = memory(pid), before[pid], after[pid]
                if mem is None or t0 is None or t1 is None:
                    raise RuntimeError(f"proxy {pid} died while idle")
                figures.append(
                    ProxyFigures(pid, (t1 - t0) / tck, mem.rss_kb, mem.pss_kb, mem.private_kb)
                )
            zmem = memory(zygote.pid) if zygote else None
            median = sorted(figures, key=lambda f: f.private_kb)[len(figures) // 2]
            try:
                where = private_by_mapping(Path(f"/proc/{median.pid}/smaps").read_text())
            except OSError:
                where = {}
            result: dict[str, object] = {
                "mode": args.mode,
                "proxies": len(pids),
                "idle_s": args.idle,
                "python": sys.version.split()[0],
                "load": os.getloadavg(),
                "per_proxy": [asdict(f) for f in figures],
                "median_private_by_mapping": dict(
                    sorted(where.items(), key=lambda kv: -kv[1])[:12]
                ),
                "zygote": (
                    {
                        **asdict(zmem),
                        "cpu_s": ((zt1 or 0) - (zt0 or 0)) / tck,
                    }
                    if zmem
                    else None
                ),
            }
            say("stopping (SIGTERM)")
            result["stopped_by_sigterm"] = stop(pids, STOP_TIMEOUT)
            return result
    finally:
        if zygote is not None:
            zygote.close()
        for pid in pids:  # whatever SIGTERM did not stop (the namespaces' removal kills too)
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for child in children:
            child.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def render(result: dict[str, object]) -> str:
    per = result["per_proxy"]
    assert isinstance(per, list)
    n = len(per)

    def col(key: str) -> list[float]:
        return [float(p[key]) for p in per]

    mb = 1024.0
    z = result.get("zygote")
    zpss = float(z["pss_kb"]) if isinstance(z, dict) else 0.0
    lines = [
        f"### {n} idle proxies, mode {result['mode']} (idle {result['idle_s']:.0f} s, "
        f"Python {result['python']}, load {', '.join(f'{x:.2f}' for x in result['load'])})",
        "",
        "| | total | per proxy, median | min | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key, scale, unit in (
        ("CPU while idle", "cpu_s", 1.0, "s"),
        ("RSS", "rss_kb", mb, "MB"),
        ("PSS", "pss_kb", mb, "MB"),
        ("private (Private_Clean+Dirty)", "private_kb", mb, "MB"),
    ):
        values = [v / scale for v in col(key)]
        lines.append(
            f"| {label} | {sum(values):.2f} {unit} | {statistics.median(values):.2f} {unit} "
            f"| {min(values):.2f} | {max(values):.2f} |"
        )
    if isinstance(z, dict):
        lines.append(
            f"| zygote (paid once) | RSS {z['rss_kb'] / mb:.2f} MB, PSS {zpss / mb:.2f} MB, "
            f"private {z['private_kb'] / mb:.2f} MB, CPU {z['cpu_s']:.2f} s | | | |"
        )
    node = (sum(col("pss_kb")) + zpss) / mb
    lines += [
        "",
        f"Node pays (sum of PSS{' + zygote' if z else ''}): {node:.1f} MB for {n} proxies, "
        f"{node / n:.2f} MB per proxy. Stopped by SIGTERM: {result['stopped_by_sigterm']}/{n}.",
    ]
    where = result.get("median_private_by_mapping")
    if isinstance(where, dict) and where:
        lines += ["", "Private memory of the median proxy, by mapping (kB):", ""]
        lines += [f"- {kb:>6} {name}" for name, kb in where.items()]
    return "\n".join(lines) + "\n"


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--proxies", type=int, default=50)
    parser.add_argument("--mode", choices=("exec", "fork"), default="exec")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("idle: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = measure(args)
    except KeyboardInterrupt:
        print("idle: interrupted; cleaned up", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
