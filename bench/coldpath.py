"""Where a sparse call's cold microseconds go: ``python -m bench.coldpath [--seconds S]``.

Issue 26's first step. On a one-node lab of its own (unique name, always removed, also on
failure or Ctrl-C), nginx1 sends nginx2's Service a 1-byte TCP request every ``--interval-ms``
(20 ms: the sparse shape) for ``--seconds``, nginx2 answers it, and every process involved
stamps its steps with ``time.perf_counter_ns`` (CLOCK_MONOTONIC, one clock for every process
and for ``perf -k mono``), so that one round trip reads as one timeline:

    client send -> [A: tenc0 wakes A, read, route, seal, sendmsg] -> [B: UDP wakes B, recvmsg,
    open, inject] -> server recv | server send -> [B out] -> [A in] -> client recv

Stages (each a phase of ``--seconds``, the same client and server, skipping the first
``WARMUP`` requests):
 1. vanilla: the timeline without proxies (client and server stamps only);
 2. per ``--spin-us`` value (default 400 then 0), both pods patched with the real proxy:
    a. ``stat``: round trip, and ``perf stat`` (software counters; the VM has no hardware
       ones: cycles, instructions and cache misses are reported as not supported) per proxy;
    b. ``syscalls``: ``perf trace -s`` per proxy: calls, errors (EAGAIN) and time per syscall;
    c. ``profile``: ``perf record -g`` per proxy, the top symbols and objects (Python 3.11
       has no perf trampoline: no Python frames, the interpreter shows as one object);
 3. per ``--spin-us`` value, both pods patched through a probe shim (``shim`` below, the
    lab's ``TENCRYPT_BIN``): ``tencrypt run`` itself, its ``Proxy`` replaced by a subclass
    whose reader callbacks stamp their entry and exit, and the ports, ``Tunnel.send_batch``
    / ``receive_batch`` and the backend's seal/open calls wrapped to stamp before and after
    (about 0.2 µs per stamp); meanwhile ``perf record -k mono`` of the scheduler's wake-up and
    switch of the two proxies splits each hop's wake-up: packet -> wake-up -> on CPU ->
    callback. Nothing of tencrypt/ changes: the shim lives here, in the proxy process only.
The summary (``summarise``, pure) prints markdown tables: median and p90 per stage, syscalls
and counters per request; ``--json`` keeps all of it (and ``COLDPATH_KEEP=FILE`` the raw stamps
of the last timeline phase). Run it under the machine lock:
``flock /tmp/tencrypt-machine.lock python -m bench.coldpath``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WARMUP = 10  # requests skipped at the start of every phase (handshake, first flow)
PORT = 5202  # measure.RR_PORT: nginx2's Service carries it (bench.attach.bench_topology)
SLACK = 60.0  # seconds a phase may overrun on a loaded machine before it is killed
SHIM_DIR_ENV = "TENCRYPT_COLDPATH_DIR"  # where the probed proxies write their stamps
PHASES = ("stat", "syscalls", "profile", "timeline")
PERF_EVENTS = (
    "task-clock,context-switches,cpu-migrations,page-faults,cycles,instructions,cache-misses"
)

CLIENT = r"""
import json, socket, sys, time
host, port, seconds, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ns, out = time.perf_counter_ns, []
start = time.perf_counter()
for i in range(int(seconds / interval)):
    time.sleep(max(0.0, start + i * interval - time.perf_counter()))
    t0 = ns()
    s.send(b"x")
    if not s.recv(64):
        raise SystemExit("server closed the connection")
    out.append((t0, ns()))
s.close()
print(json.dumps(out))
"""

SERVER = r"""
import json, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
ns = time.perf_counter_ns
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stamps = []
    while True:
        data = c.recv(64)
        t = ns()
        if not data:
            break
        stamps.append((t, ns()))
        c.send(data)
    c.close()
    with open(sys.argv[2], "a") as f:
        f.write(json.dumps(stamps) + "\n")
"""


# --- arguments -----------------------------------------------------------------------------


@dataclass(slots=True)
class Options:
    seconds: float
    interval: float  # seconds between requests
    spins: list[float]  # --spin-us values, µs
    phases: list[str]
    json_path: Path | None


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.coldpath", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per phase (default 10)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="between requests (20)")
    p.add_argument("--spin-us", default="400,0", help="comma-separated values (400,0)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"of {','.join(PHASES)}")
    p.add_argument("--json", type=Path, help="write every figure here too")
    a = p.parse_args(argv)
    try:
        spins = [float(v) for v in a.spin_us.split(",") if v.strip()]
    except ValueError:
        p.error(f"--spin-us: not numbers: {a.spin_us!r}")
    phases = [v.strip() for v in a.phases.split(",") if v.strip()]
    if unknown := sorted(set(phases) - set(PHASES)):
        p.error(f"--phases: unknown {', '.join(unknown)}")
    if not spins or any(s < 0 for s in spins):
        p.error("--spin-us: one or more values >= 0")
    if a.seconds <= 0 or a.interval_ms <= 0 or a.seconds * 1000 / a.interval_ms <= 2 * WARMUP:
        p.error(f"--seconds / --interval-ms must give more than {2 * WARMUP} requests")
    return Options(a.seconds, a.interval_ms / 1000, spins, phases, a.json)


# --- the pure summariser -------------------------------------------------------------------

Record = tuple[str, int, int, list[tuple[str, int]]]  # kind T/U, entry, exit, stamps
Figures = dict[str, list[float]]  # stage -> µs per request


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


def durations(stamps: list[tuple[str, int]]) -> dict[str, list[int]]:
    """``x0``/``x1`` pairs of stamps -> ns per call of ``x``, in order."""
    out: dict[str, list[int]] = {}
    opened: dict[str, int] = {}
    for tag, t in stamps:
        if tag.endswith("0"):
            opened[tag[:-1]] = t
        elif tag[:-1] in opened:
            out.setdefault(tag[:-1], []).append(t - opened.pop(tag[:-1]))
    return out


def hop_stages(record: Record) -> dict[str, float]:
    """One callback in µs: its syscalls, its seal/open (C part apart), the rest (interpreter)."""
    kind, entry, exit_, stamps = record
    d = durations(stamps)
    reads = d.get("r" if kind == "T" else "q", [])
    crypto = sum(d.get("c", []))
    box = sum(d.get("s" if kind == "T" else "o", []))
    writes = sum(d.get("w", [])) + sum(d.get("u", []))
    stages = {
        "read" if kind == "T" else "recvmsg": reads[0] if reads else 0,
        "read -> EAGAIN" if kind == "T" else "recvmsg -> EAGAIN": sum(reads[1:]),
        "seal, Python" if kind == "T" else "open, Python": box - crypto,
        "seal, C AEAD" if kind == "T" else "open, C AEAD": crypto,
        "sendmsg" if kind == "T" else "inject write": writes,
    }
    stages["interpreter, rest"] = exit_ - entry - sum(stages.values())
    stages["callback total"] = exit_ - entry
    return {k: v / 1000 for k, v in stages.items()}


def first_in(records: list[Record], kind: str, lo: int, hi: int) -> Record | None:
    """The first callback of ``kind`` entered in [lo, hi] that moved a packet."""
    for r in records:
        if r[0] == kind and lo <= r[1] <= hi and any(t in ("s0", "w0") for t, _ in r[3]):
            return r
    return None


def last_before(times: list[int], lo: int, hi: int) -> int | None:
    found = [t for t in times if lo < t <= hi]
    return found[-1] if found else None


def _end(record: Record, tag: str) -> int:
    return next((t for g, t in reversed(record[3]) if g == tag), record[2])


def _start(record: Record, tag: str) -> int:
    return next((t for g, t in record[3] if g == tag), record[1])


def summarise(
    client: list[tuple[int, int]],
    server: list[tuple[int, int]],
    proxies: dict[str, list[Record]] | None = None,
    sched: dict[str, dict[str, list[int]]] | None = None,
) -> Figures:
    """Per request after WARMUP: the timeline's stages in µs (module docstring). ``proxies``:
    the callbacks of proxy ``A`` (client side) and ``B``; ``sched``: per proxy, the times it was
    woken (``wakeup``) and switched in (``switch``). A hop that found its proxy awake (no
    wake-up since the previous stage) adds to ``<hop>: awake`` instead of the wake split."""
    fig: Figures = {}

    def add(name: str, ns: float) -> None:
        fig.setdefault(name, []).append(ns / 1000)

    for t0, t1 in client[WARMUP:]:
        s = next(((r, w) for r, w in server if t0 <= r <= t1), None)
        add("round trip", t1 - t0)
        if proxies is None:
            if s:
                add("client send -> server recv returns", s[0] - t0)
                add("server turnaround", s[1] - s[0])
                add("server send -> client recv returns", t1 - s[1])
            continue
        a, b = proxies.get("A", []), proxies.get("B", [])
        hops = [("A out", first_in(a, "T", t0, t1), t0, "client send")]
        hops.append(("B in", first_in(b, "U", t0, t1), 0, "A sendmsg"))
        hops.append(("B out", first_in(b, "T", s[1] if s else t0, t1), s[1] if s else 0, ""))
        hops.append(("A in", first_in(a, "U", t0, t1), 0, "B sendmsg"))
        if any(h[1] is None for h in hops) or s is None:
            add("incomplete (a hop not found)", 0)
            continue
        prev = t0
        for (name, rec, _, _), pid in zip(hops, ("A", "B", "B", "A"), strict=True):
            assert rec is not None
            if name == "B out":
                add("B inject -> server recv returns", s[0] - prev)
                add("server turnaround", s[1] - s[0])
                prev = s[1]
            add(f"{name}: previous step -> callback entry", rec[1] - prev)
            _wake_split(add, name, rec, prev, (sched or {}).get(pid))
            for stage, us in hop_stages(rec).items():
                fig.setdefault(f"{name}: {stage}", []).append(us)
            if sched and pid in sched:
                add(f"{name}: off CPU inside the callback", off_cpu(sched[pid], rec[1], rec[2]))
                lo, hi = ("u0", "u1") if rec[0] == "T" else ("w0", "w1")
                add(
                    f"{name}: off CPU inside its send/write",
                    off_cpu(sched[pid], _start(rec, lo), _end(rec, hi)),
                )
            prev = _start(rec, "u0") if rec[0] == "T" else _end(rec, "w1")
            add(f"{name}: callback entry -> packet handed on (on the path)", prev - rec[1])
        add("A inject -> client recv returns", t1 - prev)
    return fig


def off_cpu(sched: dict[str, list[int]], lo: int, hi: int) -> int:
    """ns the process spent switched out between ``lo`` and ``hi``."""
    total = 0
    ins = sched.get("switch", [])
    for out in sched.get("out", []):
        if lo <= out < hi:
            back = next((t for t in ins if t > out), hi)
            total += min(back, hi) - out
    return total


def _wake_split(
    add: Callable[[str, float], None],
    name: str,
    rec: Record,
    prev: int,
    sched: dict[str, list[int]] | None,
) -> None:
    """previous step -> callback entry, split: how long until the kernel woke the proxy, until
    it ran, until epoll_wait returned to Python (``e1``: the selector's return), until the
    event loop called the reader."""
    entry = rec[1]
    selected = _start(rec, "e1")
    if selected != entry:
        add(f"{name}: select returns -> callback entry", entry - selected)
    if sched is None:
        return
    woken = last_before(sched.get("wakeup", []), prev, entry)
    if woken is None:
        add(f"{name}: awake (no wake-up)", 0)
        return
    switched = last_before(sched.get("switch", []), woken, entry) or woken
    add(f"{name}: packet -> wake-up", woken - prev)
    add(f"{name}: wake-up -> on CPU", switched - woken)
    if selected != entry and selected >= switched:
        add(f"{name}: on CPU -> select returns", selected - switched)
    else:
        add(f"{name}: on CPU -> callback entry", entry - switched)


def table(fig: Figures) -> str:
    lines = ["| stage | n | median µs | p90 µs |", "|---|---:|---:|---:|"]
    for name, values in fig.items():
        med = statistics.median(values) if values else 0.0
        lines.append(f"| {name} | {len(values)} | {med:.1f} | {percentile(values, 90):.1f} |")
    return "\n".join(lines)


PERF_STAT_LINE = re.compile(r"^([\d.]+|<not supported>|<not counted>),[^,]*,([\w-]+)")


def parse_perf_stat(text: str) -> dict[str, float | None]:
    """``perf stat -x,`` output -> event -> value (None: not supported in this VM)."""
    out: dict[str, float | None] = {}
    for line in text.splitlines():
        m = PERF_STAT_LINE.match(line.strip())
        if m:
            out[m.group(2)] = None if m.group(1).startswith("<") else float(m.group(1))
    return out


TRACE_LINE = re.compile(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s")


def parse_perf_trace(text: str) -> dict[str, tuple[int, int, float]]:
    """``perf trace -s`` summary -> syscall -> (calls, errors, total ms), threads summed."""
    out: dict[str, tuple[int, int, float]] = {}
    for line in text.splitlines():
        m = TRACE_LINE.match(line)
        if m and m.group(1) not in ("syscall",):
            c, e, ms = out.get(m.group(1), (0, 0, 0.0))
            out[m.group(1)] = (c + int(m.group(2)), e + int(m.group(3)), ms + float(m.group(4)))
    return out


def per_request(counts: dict[str, tuple[int, int, float]], requests: int) -> str:
    lines = ["| syscall | calls/req | errors/req | µs/req |", "|---|---:|---:|---:|"]
    for name, (c, e, ms) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"| {name} | {c / requests:.2f} | {e / requests:.2f} | {ms * 1e3 / requests:.1f} |"
        )
    return "\n".join(lines)


# --- the probe shim (runs inside the proxy process) ----------------------------------------


class _Probe:
    """The stamps of the callback being run; every finished callback becomes one record."""

    stamps: list[tuple[str, int]] = []
    records: list[Record] = []
    selected = 0  # when the selector last returned to the event loop
    limit = 200_000


def _stamped(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    ns = time.perf_counter_ns

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stamps = _Probe.stamps
        stamps.append((tag + "0", ns()))
        try:
            return fn(*args, **kwargs)
        finally:
            stamps.append((tag + "1", ns()))

    return wrapper


def _callback(fn: Callable[[Any], None], kind: str) -> Callable[[Any], None]:
    ns = time.perf_counter_ns

    def wrapper(self: Any) -> None:
        entry = ns()
        _Probe.stamps = [("e1", _Probe.selected)]
        fn(self)
        if len(_Probe.records) < _Probe.limit:
            _Probe.records.append((kind, entry, ns(), _Probe.stamps))

    return wrapper


class _Backend:
    """The selected backend, its seal and open calls stamped (``c0``/``c1``)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seal_batch = _stamped(inner.seal_batch, "c")
        self.open_batch = _stamped(inner.open_batch, "c")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def shim(argv: list[str]) -> int:
    """``tencrypt`` with the probes of stage 3 when it runs the proxy; the stamps are written
    to ``$TENCRYPT_COLDPATH_DIR/<pid>.json`` when it stops."""
    from tencrypt import cli

    if argv[:1] != ["run"]:
        return cli.main(argv)
    from tencrypt import daemon, fastpath, runcmd
    from tencrypt.core.session import Tunnel
    from tencrypt.linux.gso import UdpBatch
    from tencrypt.linux.spin import SpinSelector
    from tencrypt.linux.tun import Tun

    select, spin_select = fastpath.select, SpinSelector.select

    def selected(self: SpinSelector, timeout: float | None = None) -> Any:
        ready = spin_select(self, timeout)
        _Probe.selected = time.perf_counter_ns()
        return ready

    class ProbedProxy(daemon.Proxy):
        _on_tun = _callback(daemon.Proxy._on_tun, "T")
        _on_udp = _callback(daemon.Proxy._on_udp, "U")

    Tun.readinto = _stamped(Tun.readinto, "r")  # type: ignore[method-assign]
    Tun.write_frame = _stamped(Tun.write_frame, "w")  # type: ignore[method-assign]
    UdpBatch.recv_batch = _stamped(UdpBatch.recv_batch, "q")  # type: ignore[method-assign]
    UdpBatch.send_runs = _stamped(UdpBatch.send_runs, "u")  # type: ignore[method-assign]
    Tunnel.send_batch = _stamped(Tunnel.send_batch, "s")  # type: ignore[method-assign]
    Tunnel.receive_batch = _stamped(Tunnel.receive_batch, "o")  # type: ignore[method-assign]
    fastpath.select = lambda env: _Backend(select(env))  # type: ignore[assignment]
    runcmd.Proxy = ProbedProxy  # type: ignore[misc]
    SpinSelector.select = selected  # type: ignore[method-assign]
    try:
        return cli.main(argv)
    finally:
        out = Path(os.environ.get(SHIM_DIR_ENV, "/tmp")) / f"{os.getpid()}.json"
        out.write_text(json.dumps(_Probe.records))


# --- the lab -------------------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    name: str
    client: list[tuple[int, int]]
    server: list[tuple[int, int]]
    extra: dict[str, Any]


def sparse(lab: Any, opts: Options, logs: Path, during: Callable[[], Any] | None = None) -> Phase:
    """One phase: the stamped server in nginx2, the stamped client in nginx1 for
    ``opts.seconds``; ``during`` starts the observers (returns a callable that stops them and
    gives their figures) once the connection works."""
    from bench import measure
    from tencrypt.linux import netns

    a, b = lab.pods["nginx1"], lab.pods["nginx2"]
    stamps = logs / f"server-{time.monotonic_ns()}.jsonl"
    argv = [sys.executable, "-I", "-c", SERVER, str(PORT), str(stamps)]
    with measure.server(b.netns, argv, PORT, logs / "server.log"):
        measure.wait_reachable(a.netns, b.vip)
        stop = during() if during else None
        try:
            client = [sys.executable, "-I", "-c", CLIENT, b.vip, str(PORT)]
            client += [f"{opts.seconds:g}", f"{opts.interval:g}"]
            proc = netns.run(a.netns, client, check=False, timeout=opts.seconds + SLACK)
        finally:
            extra = stop() if stop else {}
        # the server writes its stamps once the client has closed: not killed mid-line
        written = time.monotonic() + 5.0
        while time.monotonic() < written and not _complete(stamps):
            time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stderr[-300:]}")
    runs = [json.loads(line) for line in stamps.read_text().splitlines() if line.strip()]
    server = sorted((r, w) for run in runs for r, w in run)  # matched by time
    return Phase("", json.loads(proc.stdout), server, extra)


def _complete(path: Path) -> bool:
    """Has the stamped server written its line (the whole of it)?"""
    try:
        return path.read_bytes().endswith(b"\n")
    except FileNotFoundError:
        return False


def observe(argvs: dict[str, list[str]], logs: Path) -> Callable[[], dict[str, str]]:
    """Start one observer per name (perf, each until SIGINT); the returned callable stops them
    and gives each one's output."""
    procs = {}
    for name, argv in argvs.items():
        out = open(logs / f"{name}.out", "w+")  # noqa: SIM115 - closed in stop()
        procs[name] = (subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT), out)
    time.sleep(0.5)  # perf attaches

    def stop() -> dict[str, str]:
        texts = {}
        for name, (proc, out) in procs.items():
            proc.send_signal(2)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.seek(0)
            texts[name] = out.read()
            out.close()
        return texts

    return stop


def profile_top(data: Path, limit: int = 15) -> str:
    """The share of each object, then the hottest symbols, of a ``perf record`` file."""
    tops = []
    for sort, n in (("dso", 8), ("dso,sym", limit)):
        proc = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort],
            capture_output=True,
            text=True,
            timeout=120,
        )
        rows = [ln for ln in proc.stdout.splitlines() if re.match(r"^\s+[\d.]+%", ln)]
        tops.append("\n".join(rows[:n]))
    return "\n\n".join(tops)


def parse_sched(text: str, pids: dict[str, int]) -> dict[str, dict[str, list[int]]]:
    """``perf script --ns -F time,event,trace`` -> per proxy name: the times it was woken
    (``wakeup``), switched in (``switch``) and switched out (``out``), in ns."""
    by_pid = {str(pid): name for name, pid in pids.items()}
    out: dict[str, dict[str, list[int]]] = {
        n: {"wakeup": [], "switch": [], "out": []} for n in pids
    }
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\.(\d{9}):\s+sched:(sched_wakeup|sched_switch):(.*)", line)
        if not m:
            continue
        t = int(m.group(1)) * 1_000_000_000 + int(m.group(2))
        fields: tuple[tuple[str, str], ...]
        if m.group(3) == "sched_wakeup":
            fields = ((r" pid=(\d+)", "wakeup"),)
        else:
            fields = ((r"next_pid=(\d+)", "switch"), (r"prev_pid=(\d+)", "out"))
        for field, key in fields:
            who = re.search(field, m.group(4))
            if who and who.group(1) in by_pid:
                out[by_pid[who.group(1)]][key].append(t)
    return out


@contextlib.contextmanager
def patched(
    lab: Any, run_args: tuple[str, ...], shim_bin: Path | None = None, tree: Path | None = None
) -> Iterator[dict[str, int]]:
    """Both pods patched with ``run_args``, through ``shim_bin`` if given, their proxies
    importing ``tree`` if given (never writing bytecode into it); always unpatched. Yields the
    proxies' pids: ``A`` in nginx1 (the client's), ``B`` in nginx2. bench/eventloop.py and
    bench/express.py patch through it too."""
    from tencrypt.lab import proxy as labproxy

    real = labproxy.tencrypt_bin
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    if shim_bin is not None:
        labproxy.tencrypt_bin = lambda: shim_bin
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        for pod in ("nginx1", "nginx2"):
            lab.patch(pod, run_args=run_args)
        pids = {
            n: labproxy.proxy_pid(lab, lab.pods[p]) for n, p in (("A", "nginx1"), ("B", "nginx2"))
        }
        if not all(pids.values()):
            raise RuntimeError(f"a proxy is not running: {pids}")
        yield {n: int(p or 0) for n, p in pids.items()}
    finally:
        for pod in ("nginx2", "nginx1"):
            with contextlib.suppress(Exception):
                lab.unpatch(pod)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        labproxy.tencrypt_bin = real


def write_shim(directory: Path) -> Path:
    """An executable ``tencrypt`` that runs ``shim`` (named so the lab recognises its proxy)."""
    path = directory / "tencrypt"
    path.write_text(
        f"#!{sys.executable}\nimport sys\nfrom bench.coldpath import shim\nsys.exit(shim(sys.argv[1:]))\n"
    )
    path.chmod(0o755)
    return path


def say(text: str) -> None:
    print(f"coldpath: {text}", file=sys.stderr, flush=True)


def rtt(phase: Phase) -> str:
    values = [(t1 - t0) / 1000 for t0, t1 in phase.client[WARMUP:]]
    return f"median {statistics.median(values):.0f} µs, p90 {percentile(values, 90):.0f} µs, n {len(values)}"


def measure_spin(lab: Any, opts: Options, spin: float, logs: Path, out: dict[str, Any]) -> None:
    """Stages 2 and 3 for one ``--spin-us`` value; prints each phase's tables as it ends."""
    if {"stat", "syscalls", "profile"} & set(opts.phases):
        with patched(lab, ("--spin-us", f"{spin:g}")) as pids:
            for phase in ("stat", "syscalls", "profile"):
                if phase in opts.phases:
                    out[phase] = PLAIN_PHASES[phase](lab, opts, spin, logs, pids)
    if "timeline" in opts.phases:
        out["timeline"] = timeline(lab, opts, spin, logs)


def stat_phase(lab: Any, opts: Options, spin: float, logs: Path, pids: dict[str, int]) -> Any:
    events = PERF_EVENTS.split(",")
    argvs = {
        f"{n}": ["perf", "stat", "-x,", "-e", PERF_EVENTS, "-p", str(p)] for n, p in pids.items()
    }
    ph = sparse(lab, opts, logs, lambda: observe(argvs, logs))
    n = len(ph.client)
    print(f"\n### spin {spin:g} µs, plain proxies: round trip {rtt(ph)}\n")
    print("| proxy, per request | " + " | ".join(events) + " |")
    print("|---" * (1 + len(events)) + "|")
    counters = {}
    for name, text in ph.extra.items():
        counters[name] = counts = parse_perf_stat(text)
        cells = [counts.get(e) for e in events]
        shown = ("n/a" if c is None else f"{c / n:.2f}" for c in cells)
        print(f"| {name} | " + " | ".join(shown) + " |")
    return {"rtt_us": [(b - a) / 1000 for a, b in ph.client], "requests": n, "counters": counters}


def syscalls_phase(lab: Any, opts: Options, spin: float, logs: Path, pids: dict[str, int]) -> Any:
    argvs = {n: ["perf", "trace", "-s", "-p", str(p)] for n, p in pids.items()}
    ph = sparse(lab, opts, logs, lambda: observe(argvs, logs))
    found = {}
    for name, text in ph.extra.items():
        found[name] = counts = parse_perf_trace(text)
        print(f"\n#### spin {spin:g} µs, proxy {name}: perf trace -s per request")
        print(f"({len(ph.client)} requests; round trip under perf trace {rtt(ph)})\n")
        print(per_request(counts, len(ph.client)))
    return {"requests": len(ph.client), "syscalls": found}


def profile_phase(lab: Any, opts: Options, spin: float, logs: Path, pids: dict[str, int]) -> Any:
    data = {n: logs / f"perf-{spin:g}-{n}.data" for n in pids}
    argvs = {n: ["perf", "record", "-g", "-p", str(pids[n]), "-o", str(data[n])] for n in pids}
    sparse(lab, opts, logs, lambda: observe(argvs, logs))
    tops = {}
    for name, path in data.items():
        tops[name] = top = profile_top(path)
        print(f"\n#### spin {spin:g} µs, proxy {name}: perf record -g (dso; dso, symbol)\n")
        print(f"```\n{top}\n```")
    return tops


PLAIN_PHASES = {"stat": stat_phase, "syscalls": syscalls_phase, "profile": profile_phase}


def timeline(lab: Any, opts: Options, spin: float, logs: Path) -> Figures:
    shim_dir = logs / f"shim-{spin:g}"
    shim_dir.mkdir()
    os.environ[SHIM_DIR_ENV] = str(shim_dir)
    data = logs / f"sched-{spin:g}.data"
    with patched(lab, ("--spin-us", f"{spin:g}"), write_shim(shim_dir)) as pids:
        woken = " || ".join(f"pid == {p}" for p in pids.values())
        switched = " || ".join(f"{k}_pid == {p}" for p in pids.values() for k in ("next", "prev"))
        argv = ["perf", "record", "-k", "mono", "-a", "-o", str(data)]
        argv += ["-e", "sched:sched_wakeup", "--filter", woken]
        argv += ["-e", "sched:sched_switch", "--filter", switched]
        ph = sparse(lab, opts, logs, lambda: observe({"sched": argv}, logs))
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "--ns", "-F", "time,event,trace"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    sched = parse_sched(script, pids)
    say(f"scheduler events: { {n: {k: len(v) for k, v in d.items()} for n, d in sched.items()} }")
    records: dict[str, list[Record]] = {}
    for name, pid in pids.items():
        raw = json.loads((shim_dir / f"{pid}.json").read_text())
        records[name] = [(k, e, x, [(t, v) for t, v in st]) for k, e, x, st in raw]
    if os.environ.get("COLDPATH_KEEP"):  # the raw stamps, to study them again
        raw = {"client": ph.client, "server": ph.server, "proxies": records, "sched": sched}
        Path(os.environ["COLDPATH_KEEP"]).write_text(json.dumps(raw))
    fig = summarise(ph.client, ph.server, records, sched)
    print(f"\n### spin {spin:g} µs, probed proxies: timeline per request (round trip {rtt(ph)})\n")
    print(table(fig))
    return fig


def run(opts: Options) -> dict[str, Any]:
    from bench.attach import bench_topology
    from tencrypt.lab.cluster import Lab
    from tencrypt.linux import netns

    root = str(Path(__file__).resolve().parents[1])  # the proxies import this tree
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    results: dict[str, Any] = {"options": {"seconds": opts.seconds, "interval": opts.interval}}
    lab = Lab(f"cold{netns.unique_suffix()}", topology=bench_topology(), nodes=1)
    with tempfile.TemporaryDirectory(prefix="coldpath-") as tmp:
        logs = Path(tmp)
        try:
            lab.up()
            ph = sparse(lab, opts, logs)
            results["vanilla"] = summarise(ph.client, ph.server)
            print(f"### vanilla: round trip {rtt(ph)}\n")
            print(table(results["vanilla"]))
            for spin in opts.spins:
                say(f"--spin-us {spin:g}")
                out: dict[str, Any] = {}
                results[f"spin {spin:g}"] = out
                try:
                    measure_spin(lab, opts, spin, logs, out)
                except Exception as exc:  # reported; the next setting still runs
                    say(f"--spin-us {spin:g} failed: {exc}")
                    out["error"] = str(exc)
                sys.stdout.flush()
        finally:
            lab.down()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (network namespaces, perf)")
        return 2
    started = time.monotonic()
    results = run(opts)
    if opts.json_path:
        opts.json_path.write_text(json.dumps(results, indent=1) + "\n")
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
