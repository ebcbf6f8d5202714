"""What the benchmark measures, one function per measurement, each bounded in time.

Rules:
- Every program runs inside a lab namespace (``ip netns exec``); the client in the first pod,
  the server in the second. Nothing here reaches any other address.
- Every run is bounded twice: by its own duration (``iperf3 -t``, ``ping -c``, the request/
  response client's seconds) and by a subprocess timeout a little longer than that.
- A server is started for one run only (``iperf3 -s -1``) and always stopped afterwards, so a
  run that went wrong never leaves a confused server behind for the next one.
- Parsers (``parse_*``) are pure: text in, a record out, ``MeasureError`` for output that does
  not hold the figures (a failed run is reported as such, never as a zero).
- The sparse request/response row reuses bench/coldpath.py's client (one 1-byte request every
  ``interval`` on one connection, each request's send and answer stamped) against the same
  echo server as the back-to-back row; its first ``coldpath.WARMUP`` requests (a handshake, a
  first flow) are not counted.
- Memory is read from ``/proc/<pid>/status`` (VmRSS now, VmHWM the peak since start) by a
  sampler thread, the only thread the benchmark starts.
- CPU: bench/cpu.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import coldpath
from tencrypt.linux import netns

IPERF_PORT = 5201
RR_PORT = 5202
UDP_PAYLOAD = 1200  # bytes per UDP datagram: fits every tunnel's MTU on both lab shapes
SLACK = 30.0  # seconds a run may take beyond its nominal duration on a loaded machine
START_TIMEOUT = 15.0  # seconds for a server to listen


class MeasureError(Exception):
    """A measurement that did not produce its figures (the message says why)."""


@dataclass(slots=True)
class Iperf:
    gbps: float  # received at the server, Gbit/s
    mbytes: float  # received at the server, MB (10**6 bytes)
    retransmits: int = 0  # TCP
    lost: int = 0  # UDP datagrams
    packets: int = 0  # UDP datagrams sent
    lost_pct: float = 0.0
    jitter_ms: float = 0.0
    sent_gbps: float = 0.0  # what the client managed to send (UDP: below the offered rate
    #                         when the sender itself is the bottleneck)


@dataclass(slots=True)
class Ping:
    sent: int
    received: int
    min_ms: float
    avg_ms: float
    max_ms: float
    mdev_ms: float
    p50_ms: float  # median of the replies: what one outlier on a shared machine cannot move


@dataclass(slots=True)
class RequestResponse:
    transactions: int
    seconds: float
    p50_us: float
    p99_us: float

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class SparseRR:
    """One 1-byte request every ``interval`` seconds on one connection: the round trip of a
    call that follows silence (every hop of it cold), what a service mostly sees."""

    requests: int  # counted (after the warm-up)
    sent: int  # all of them, the warm-up too
    interval: float  # seconds between requests
    p50_us: float
    p90_us: float
    p99_us: float


@dataclass(slots=True)
class DnsLookups:
    server: str  # the address asked
    lookups: int  # answered
    failed: int
    seconds: float
    p50_us: float
    p99_us: float

    @property
    def rate(self) -> float:
        return self.lookups / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class MemoryPeak:
    idle_mb: float = 0.0  # VmRSS of the largest process when sampling started
    peak_mb: float = 0.0  # largest VmHWM seen
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, max VmRSS MB)


# --- parsers (pure) ------------------------------------------------------------------------


def parse_iperf(text: str) -> Iperf:
    """The figures of an ``iperf3 -J`` run (TCP or UDP), as the server received them."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"iperf3 printed no JSON: {text[:200]!r}") from exc
    if data.get("error"):
        raise MeasureError(f"iperf3: {data['error']}")
    end = data.get("end") or {}
    received, sent = end.get("sum_received"), end.get("sum_sent") or end.get("sum") or {}
    if not received or "bits_per_second" not in received:
        raise MeasureError("iperf3 JSON has no end.sum_received")
    result = Iperf(
        gbps=received["bits_per_second"] / 1e9,
        mbytes=received["bytes"] / 1e6,
        retransmits=int(sent.get("retransmits", 0)),
        sent_gbps=sent.get("bits_per_second", 0.0) / 1e9,
    )
    if "lost_packets" in received:  # UDP: loss as the server counted it
        result.lost, result.packets = int(received["lost_packets"]), int(received["packets"])
        result.lost_pct = float(received.get("lost_percent", 0.0))
        result.jitter_ms = float(received.get("jitter_ms", 0.0))
    return result


PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
PING_REPLY = re.compile(r"icmp_seq=\d+ .*time=([\d.]+) ms")


def parse_ping(text: str) -> Ping:
    """iputils ``ping`` output: one line per reply, then the summary lines."""
    counts, rtt = PING_SUMMARY.search(text), PING_RTT.search(text)
    if not counts:
        raise MeasureError(f"ping printed no summary: {text[-200:]!r}")
    times = sorted(float(t) for t in PING_REPLY.findall(text))
    if not rtt or not times:
        raise MeasureError(f"ping: no reply ({counts.group(0)})")
    low, avg, high, mdev = (float(g) for g in rtt.groups())
    return Ping(
        int(counts.group(1)), int(counts.group(2)), low, avg, high, mdev, times[len(times) // 2]
    )


def parse_rr(text: str) -> RequestResponse:
    try:
        data = json.loads(text.strip().splitlines()[-1])
        return RequestResponse(
            int(data["transactions"]),
            float(data["seconds"]),
            float(data["p50_us"]),
            float(data["p99_us"]),
        )
    except (IndexError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MeasureError(f"request/response client printed no result: {text[-200:]!r}") from exc


def parse_sparse(text: str, interval: float, warmup: int = coldpath.WARMUP) -> SparseRR:
    """The last line of bench/coldpath.py's client: a JSON list of [send, answer] stamps in ns,
    one pair per request; the first ``warmup`` requests are left out."""
    try:
        pairs = json.loads(text.strip().splitlines()[-1])
        times = sorted((int(t1) - int(t0)) / 1e3 for t0, t1 in pairs[warmup:])
    except (IndexError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise MeasureError(
            f"sparse request/response client printed no result: {text[-200:]!r}"
        ) from exc
    if not times:
        raise MeasureError(f"sparse request/response: no request after the {warmup} warm-up ones")
    if times[0] < 0:
        raise MeasureError("sparse request/response: an answer stamped before its request")
    p50, p90, p99 = (percentile(times, pct) for pct in (50, 90, 99))
    return SparseRR(len(times), len(pairs), interval, p50, p90, p99)


def percentile(sorted_values: list[float], pct: int) -> float:
    """The ``pct``-th percentile of ascending values, nearest rank below (the median of an even
    count is the upper middle value, as the request/response client takes it)."""
    if not sorted_values:
        raise MeasureError("no values")
    return sorted_values[min(len(sorted_values) - 1, len(sorted_values) * pct // 100)]


def parse_dns(text: str) -> list[DnsLookups]:
    """The last line of ``bench/dnsprobe.py``, a JSON list with one object per server: each
    server's median and p99 of its answered lookups, in the order the servers were given."""
    try:
        found = []
        for data in json.loads(text.strip().splitlines()[-1]):
            times = sorted(float(t) / 1e3 for t in data["times_ns"])
            server, failed = str(data["server"]), int(data["failed"])
            found.append((server, failed, float(data["seconds"]), times))
    except (IndexError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MeasureError(f"DNS client printed no result: {text[-200:]!r}") from exc
    if not found:
        raise MeasureError(f"DNS client printed no server: {text[-200:]!r}")
    results = []
    for server, failed, seconds, times in found:
        if not times:
            raise MeasureError(f"DNS: no lookup through {server} was answered ({failed} failed)")
        p50, p99 = percentile(times, 50), percentile(times, 99)
        results.append(DnsLookups(server, len(times), failed, seconds, p50, p99))
    return results


def parse_status_kb(text: str, key: str) -> int | None:
    """``VmRSS``/``VmHWM`` in kB from a ``/proc/<pid>/status`` text."""
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def parse_snmp_counter(text: str, proto: str, name: str) -> int:
    """One counter of ``/proc/net/snmp`` (a header line then a value line per protocol)."""
    lines = [line.split() for line in text.splitlines() if line.startswith(f"{proto}:")]
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if name in header:
            return int(values[header.index(name)])
    return 0


# --- servers -------------------------------------------------------------------------------


def _listening(ns: str, proto: str, port: int, family: int | None = None) -> bool:
    flags = ["-Hlnu" if proto == "udp" else "-Hlnt", *([f"-{family}"] if family else [])]
    return bool(netns.run(ns, ["ss", *flags, f"sport = :{port}"], check=False).stdout.strip())


@contextmanager
def server(
    ns: str, argv: list[str], port: int, log: Path, proto: str = "tcp", family: int | None = None
) -> Iterator[None]:
    """Run ``argv`` in ``ns`` while the block runs; wait until it listens on ``port`` (with
    ``family``: on a socket of that IP family)."""
    proc = netns.spawn(ns, argv, log=log)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise MeasureError(
                    f"{argv[0]} server exited ({proc.returncode}): "
                    f"{log.read_text(errors='replace')[-300:]}"
                )
            return _listening(ns, proto, port, family)

        netns.wait_for(up, timeout=START_TIMEOUT, interval=0.05, what=f"{argv[0]} on :{port}")
        yield
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- measurements --------------------------------------------------------------------------


def iperf(
    client_ns: str,
    server_ns: str,
    host: str,
    duration: float,
    log: Path,
    *,
    parallel: int = 1,
    udp_rate: str | None = None,
) -> Iperf:
    """One iperf3 run: TCP with ``parallel`` streams, or UDP at ``udp_rate`` (one stream)."""
    argv = [
        "iperf3",
        "-c",
        host,
        "-p",
        str(IPERF_PORT),
        "-t",
        f"{duration:g}",
        "-J",
        "-P",
        str(parallel),
        "--connect-timeout",
        "10000",
    ]
    if udp_rate:
        argv += ["-u", "-b", udp_rate, "-l", str(UDP_PAYLOAD)]
    with server(server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], IPERF_PORT, log):
        proc = netns.run(client_ns, argv, check=False, timeout=duration + SLACK)
    return parse_iperf(proc.stdout)


def ping(client_ns: str, host: str, count: int, interval: float = 0.05) -> Ping:
    argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "2", host]
    proc = netns.run(client_ns, argv, check=False, timeout=count * interval + SLACK)
    return parse_ping(proc.stdout)


# A TCP request/response exchange of one byte each way (netperf's TCP_RR): one round trip per
# transaction, so the rate is the inverse of the round-trip time through the whole path. The
# server listens on IPv4, or with "6" on IPv6 only (a second server beside the IPv4 one, which
# then stays what it was: a dual-stack run's IPv4 figures come from the same socket as an IPv4
# run's).
RR_SERVER = r"""
import socket, sys
v6 = len(sys.argv) > 2 and sys.argv[2] == "6"
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if v6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::" if v6 else "0.0.0.0", int(sys.argv[1])))
s.listen(8)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = c.recv(64)
        if not data:
            break
        c.sendall(data)
    c.close()
"""

# With "new", every transaction opens a connection of its own (netperf's TCP_CRR): the time
# from connect() to the first byte of the answer, what a client without a connection pool pays
# (for Tencrypt, a new flow: the endpoint choice and the first packets' translation).
RR_CLIENT = r"""
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
new = len(sys.argv) > 4 and sys.argv[4] == "new"
s = None if new else socket.create_connection((host, port), timeout=5)
if s is not None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
clock, times = time.perf_counter_ns, []
start = clock()
deadline = start + int(seconds * 1e9)
while True:
    t0 = clock()
    c = socket.create_connection((host, port), timeout=5) if new else s
    c.sendall(b"x")
    if not c.recv(64):
        raise SystemExit("server closed the connection")
    t1 = clock()
    if new:
        c.close()
    times.append(t1 - t0)
    if t1 >= deadline:
        break
times.sort()
print(json.dumps({"transactions": len(times), "seconds": (t1 - start) / 1e9,
                  "p50_us": times[len(times) // 2] / 1e3,
                  "p99_us": times[min(len(times) - 1, len(times) * 99 // 100)] / 1e3}))
"""


@contextmanager
def rr_server(server_ns: str, log: Path, family: int = 4) -> Iterator[None]:
    argv = [sys.executable, "-I", "-c", RR_SERVER, str(RR_PORT)]
    if family == 6:
        with server(server_ns, [*argv, "6"], RR_PORT, log, family=6):
            yield
    else:
        with server(server_ns, argv, RR_PORT, log):
            yield


def request_response(
    client_ns: str, host: str, seconds: float, new_connections: bool = False
) -> RequestResponse:
    argv = [sys.executable, "-I", "-c", RR_CLIENT, host, str(RR_PORT), f"{seconds:g}"]
    if new_connections:
        argv.append("new")
    proc = netns.run(client_ns, argv, check=False, timeout=seconds + SLACK)
    if proc.returncode != 0:
        raise MeasureError(
            f"request/response client failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
        )
    return parse_rr(proc.stdout)


def sparse_rr(client_ns: str, host: str, seconds: float, interval: float) -> SparseRR:
    """``seconds`` of one 1-byte request every ``interval`` to the request/response server
    (``rr_server``) at ``host``, over one connection (bench/coldpath.py's client)."""
    argv = [sys.executable, "-I", "-c", coldpath.CLIENT, host, str(RR_PORT)]
    argv += [f"{seconds:g}", f"{interval:g}"]
    proc = netns.run(client_ns, argv, check=False, timeout=seconds + SLACK)
    if proc.returncode != 0:
        raise MeasureError(
            f"sparse request/response client failed ({proc.returncode}): "
            f"{proc.stderr.strip()[-300:]}"
        )
    return parse_sparse(proc.stdout, interval)


DNS_PROBE = Path(__file__).resolve().with_name("dnsprobe.py")


def dns_lookups(
    client_ns: str,
    servers: Sequence[str],
    name: str,
    count: int,
    seconds: float,
    warmup: int = 20,
) -> list[DnsLookups]:
    """Up to ``count`` sequential lookups of ``name`` per server (at most ``seconds`` in all)
    from ``client_ns`` to ``servers`` (addresses, or ``resolv``: the pod's own resolver), the
    servers asked in turns, timed by bench/dnsprobe.py after ``warmup`` untimed ones per server
    (they fill a cache on the way); one result per server, in their order."""
    argv = [sys.executable, "-I", str(DNS_PROBE), ",".join(servers), name, str(count)]
    argv += [f"{seconds:g}", str(warmup)]
    proc = netns.run(client_ns, argv, check=False, timeout=2 * seconds + SLACK)
    if proc.returncode != 0:
        raise MeasureError(f"DNS client failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    results = parse_dns(proc.stdout)
    if len(results) != len(servers):
        raise MeasureError(f"DNS client answered for {len(results)} of {len(servers)} servers")
    return results


def wait_reachable(client_ns: str, host: str, timeout: float = 30.0) -> None:
    """Poll short request/response exchanges until one completes (a tunnel's handshake, a
    proxy's first classification happen here, outside the measured runs)."""

    def reachable() -> bool:
        try:
            return request_response(client_ns, host, 0.05).transactions > 0
        except (MeasureError, subprocess.TimeoutExpired):
            return False

    netns.wait_for(reachable, timeout=timeout, interval=0.2, what=f"{host}:{RR_PORT} to answer")


# --- counters ------------------------------------------------------------------------------


def udp_rcvbuf_errors(namespaces: list[str]) -> int:
    """UDP datagrams dropped because a receive buffer was full, summed over ``namespaces``."""
    total = 0
    for ns in namespaces:
        text = netns.run(ns, ["cat", "/proc/net/snmp"], check=False).stdout
        total += parse_snmp_counter(text, "Udp", "RcvbufErrors")
    return total


def iface_counters(ns: str, ifname: str) -> tuple[int, int]:
    """(bytes both ways, packets dropped both ways) of ``ifname``; (0, 0) if it is missing.
    A TUN device whose reader falls behind drops at its queue: that loss shows here."""
    proc = netns.run(ns, ["ip", "-j", "-s", "link", "show", "dev", ifname], check=False)
    try:
        stats = json.loads(proc.stdout)[0]["stats64"]
        rx, tx = stats["rx"], stats["tx"]
        return int(rx["bytes"]) + int(tx["bytes"]), int(rx["dropped"]) + int(tx["dropped"])
    except (json.JSONDecodeError, IndexError, KeyError, TypeError, ValueError):
        return 0, 0


# --- memory --------------------------------------------------------------------------------


def status_kb(pid: int, key: str) -> int | None:
    try:
        return parse_status_kb(Path(f"/proc/{pid}/status").read_text(), key)
    except OSError:
        return None


def largest_mb(pids: list[int], key: str) -> float:
    """The largest ``key`` (VmRSS, VmHWM) of the processes, MB; 0.0 when none is readable."""
    return max((status_kb(pid, key) or 0 for pid in pids), default=0) / 1024


class MemorySampler:
    """Samples VmRSS and VmHWM of the processes ``pids()`` returns, every ``interval`` s, in a
    thread, while a ``with`` block runs. ``result`` holds the figures once the block ends."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.5) -> None:
        self.pids, self.interval = pids, interval
        self.result = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._start = 0.0

    def __enter__(self) -> MemorySampler:
        self._start = time.monotonic()
        rss = self._sample()
        self.result.idle_mb = rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> float:
        rss = hwm = 0.0
        for pid in self.pids():
            rss = max(rss, (status_kb(pid, "VmRSS") or 0) / 1024)
            hwm = max(hwm, (status_kb(pid, "VmHWM") or 0) / 1024)
        self.result.peak_mb = max(self.result.peak_mb, hwm)
        self.result.samples.append((time.monotonic() - self._start, rss))
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


def window_max(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Largest RSS sampled in ``[start, end)`` seconds."""
    values = [mb for t, mb in samples if start <= t < end]
    return max(values) if values else 0.0
