"""`tencrypt bench`: iperf3 between two pods of one project, vanilla, through Tencrypt, and
through the userspace tunnels a user would pick instead, in one invocation on one lab.

Topology (one node; with two, nginx2 lives on node2 behind VXLAN, see tencrypt/lab/cluster.py)::

    <lab>-nginx1 (client: iperf3 -c, ping, req/resp)     <lab>-nginx2 (servers :5201, :5202)
      vanilla/tencrypt -> nginx2's Service VIP             (the path an application uses)
      wireguard-go     -> 10.201.0.2 (wg<sfx>a/b)          (pod to pod, the tunnel's own
      openvpn          -> 10.202.0.2 (ovpn<sfx>a/b)         addresses)
    --ip-family dual, TCP over IPv6 too (the outer packets of both tunnels stay IPv4):
      vanilla/tencrypt -> nginx2's IPv6 Service VIP        (ip6tables DNAT / Tencrypt's own)
      wireguard-go     -> fd00:201::2                      (inner IPv6 on the same tunnel)

Stages:
 1. plan from the arguments (``--quick``: one node, 1 and 10 clients, 3 s runs, no soak,
    results under ``quick.*`` so that a quick run never replaces the committed full run's
    ``latest.*``);
 2. install the peer tunnels' Debian packages if missing, and say so; a system that cannot be
    had (OpenVPN where it is not installed and apt-get cannot install it) is skipped, said on
    the progress output and in the report under "Systems not measured", and the others run;
 3. per lab shape: build the lab (always removed afterwards, also on failure or Ctrl-C), give
    nginx2's Service the benchmark's ports (kube-proxy-style DNAT, chain BENCH-SERVICES), then
    per system, in the order vanilla, wireguard-go, openvpn, tencrypt (the peer tunnels run
    between unpatched pods: Tencrypt's strict mode would refuse their plaintext UDP):
    a. attach (nothing / a peer tunnel / ``lab.patch`` of both pods) and wait until the
       request/response server answers through it (handshakes happen here, unmeasured);
    b. the tunnel processes' RSS once they are ready, before any traffic;
    c. round trip at idle: ping, then the TCP request/response rate (back to back, and a new
       connection per request), then the sparse row: one 1-byte request every 20 ms on one
       connection (bench/coldpath.py's client), each request after silence; for vanilla and
       Tencrypt also DNS: sequential lookups of nginx2's Service name straight to the cluster DNS and
       (Tencrypt) through the pod's resolver, i.e. the embedded DNS proxy, the two paths asked
       in turns by one probe (bench/dnsprobe.py), the probe, the cluster DNS and the tunnel
       processes pinned to one CPU meanwhile;
    d. TCP at each client count, then (``--ip-family dual``, a system with an IPv6 path: not
       OpenVPN) TCP over IPv6 at the same client counts once the IPv6 path answers, then UDP at
       the fixed offered rate, the tunnel processes' memory sampled throughout (VmHWM read
       after each TCP run) and their CPU (utime + stime per end) read at the start and end of
       each run; each run checks that the traffic crossed the tunnel's interface, and counts
       UDP receive-buffer drops in both pods;
    e. Tencrypt on the first shape of a full run: a soak at the largest client count for six
       run durations (60 s by default), its memory sampled, to show whether RSS stays flat;
    f. detach;
    g. ``--rounds N`` (2 in a full run): N more rounds of step c's ping and sparse
       row and (but vanilla) step d's TCP at 1 and 10 clients with the tunnel's CPU, for the
       systems whose figures those targets compare (vanilla, the current wireguard-go given
       with ``--peer-binary``, Tencrypt), each system attached, measured and detached in turn
       within a round (tests ``ping_round_R``, ``sparse_rr_round_R`` and ``tcp_round_R``:
       report.py ``round_test``, the client count as in the main pass), so that those
       targets are judged on every round's figures;
 4. with ``--idle-json``, read bench/idle.py's result into the run (bench/idlerow.py);
 5. write CSV, markdown and PNG plots (bench/report.py), and print where.
A progress line on stderr tells what runs, how far along and about how long is left.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench import cpustat, idlerow, measure, peers, report
from bench.attach import Target, attach, bench_topology
from bench.plan import (  # noqa: F401 - build_plan, estimates, peer_binaries, round_steps: the plan's API here too
    DNS_SYSTEMS,
    ORDER,
    PING_INTERVAL,
    SOAK_RUNS,
    SPARSE_INTERVAL,
    Plan,
    build_plan,
    estimates,
    peer_binaries,
    peer_tools,
    round_clients,
    round_steps,
    skip_system,
    system_steps,
)
from bench.progress import Progress
from bench.report import DNS_PATHS, TENCRYPT, VANILLA, Run, round_test
from tencrypt.errors import SetupError, UsageError
from tencrypt.lab.cluster import Lab
from tencrypt.lab.topology import Pod
from tencrypt.linux import procs

CLIENT, SERVER = "nginx1", "nginx2"
FAILURES = (measure.MeasureError, SetupError, subprocess.TimeoutExpired, OSError)


class BenchLab(Lab):
    """The lab, its messages routed through the progress line."""

    progress: Progress | None = None

    def say(self, text: str) -> None:
        if self.progress:
            self.progress.say(f"lab {self.name}: {text}")
        else:
            super().say(text)


# --- measuring a system --------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    plan: Plan
    run: Run
    progress: Progress
    logs: Path
    first_shape: bool = True
    failed: list[str] = field(default_factory=list)

    def attempt(self, nodes: int, system: str, what: str, fn: Callable[[], object]) -> None:
        """Run one measurement; a failure is reported and the next measurement goes on."""
        try:
            fn()
        except FAILURES as exc:
            message = f"{_shape(nodes)}, {system}, {what}: {_oneline(exc)}"
            self.run.errors.append(message)
            self.progress.say(f"bench: FAILED {message}")

    def shape(self, nodes: int) -> None:
        topology = bench_topology(self.plan.ip_family)
        lab = BenchLab(self.plan.name, topology=topology, nodes=nodes)
        lab.progress = self.progress
        try:
            lab.up()
            a, b = lab.pods[CLIENT], lab.pods[SERVER]
            for system in self.plan.systems:
                end = self.progress.index + len(system_steps(self.plan, system, self.first_shape))
                self.progress.step(f"{_shape(nodes)} · {system} · setting up")
                self.attempt(nodes, system, "set-up", partial(self.system, lab, system, a, b))
                self.progress.index = end  # a system that failed early skips its other steps
            for r in range(1, self.plan.rounds + 1):
                for system in self.plan.round_systems():
                    self.progress.step(f"{_shape(nodes)} · {system} · round {r}")
                    self.attempt(
                        nodes,
                        system,
                        f"round {r}",
                        partial(self.one_round, lab, system, a, b, r),
                    )
        finally:
            with _no_interrupts():
                lab.down()
        self.first_shape = False

    def system(self, lab: Lab, system: str, a: Pod, b: Pod) -> None:
        ipv6 = self.plan.ipv6_runs(system)
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(attach(system, lab, a, b, self.plan.binaries.get(system)))
            stack.enter_context(measure.rr_server(b.netns, self.logs / "rr.log"))
            if ipv6 and target.host6:  # beside the IPv4 one, for the IPv6 path's first answer
                stack.enter_context(measure.rr_server(b.netns, self.logs / "rr6.log", 6))
            self.measure_system(lab, system, a, b, target, ipv6)

    def one_round(self, lab: Lab, system: str, a: Pod, b: Pod, r: int) -> None:
        """Step 3g: ``system`` attached again, its ping, sparse row and (not vanilla) TCP with
        the tunnel's CPU as round ``r``."""
        nodes = len(lab.nodes)
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(attach(system, lab, a, b, self.plan.binaries.get(system)))
            stack.enter_context(measure.rr_server(b.netns, self.logs / "rr.log"))
            measure.wait_reachable(a.netns, target.host)
            p = measure.ping(a.netns, target.ping_host, self.plan.ping_count, PING_INTERVAL)
            self.run.add(nodes, system, round_test("ping", r), 1, "p50_ms", p.p50_ms, "ms")
            s = measure.sparse_rr(a.netns, target.host, self.plan.sparse_seconds, SPARSE_INTERVAL)
            self.run.add(nodes, system, round_test("sparse_rr", r), 1, "p50_us", s.p50_us, "µs")
            for clients in round_clients(self.plan) if system != VANILLA else []:
                log = self.logs / f"iperf-round{r}-{clients}.log"
                cpu_before = cpustat.snapshot(target.pids(), a.netns, b.netns)
                t = measure.iperf(
                    a.netns, b.netns, target.host, self.plan.duration, log, parallel=clients
                )
                run = (nodes, system, round_test("tcp", r), clients)
                self.cpu(run, cpu_before, cpustat.snapshot(target.pids(), a.netns, b.netns), t)
                self._add(run, "throughput", t.gbps, "Gbit/s", 4)

    def measure_system(
        self, lab: Lab, system: str, a: Pod, b: Pod, target: Target, ipv6: bool
    ) -> None:
        """Everything one attached system is measured for (stages 3b to 3e)."""
        nodes, label = len(lab.nodes), f"{_shape(len(lab.nodes))} · {system}"
        self.run.notes.append(f"{_shape(nodes)}, {system}: {target.note}")
        self.ready_memory(nodes, system, target)
        measure.wait_reachable(a.netns, target.host)
        self.progress.step(f"{label} · ping, request/response (back to back, sparse)")
        self.attempt(nodes, system, "ping", partial(self.ping, nodes, system, a, target))
        self.attempt(
            nodes, system, "request/response", partial(self.rr, nodes, system, a, b, target)
        )
        self.attempt(
            nodes,
            system,
            "sparse request/response",
            partial(self.sparse, nodes, system, a, b, target),
        )
        if system in DNS_SYSTEMS:
            self.attempt(nodes, system, "DNS", partial(self.dns, lab, nodes, system, a, b, target))
        with measure.MemorySampler(target.pids) as memory:
            self.tcp_runs(nodes, system, a, b, target)
            if ipv6:
                self.ipv6_runs(nodes, system, a, b, target)
            self.progress.step(f"{label} · UDP at {self.plan.udp_rate}bit/s")
            self.attempt(nodes, system, "UDP", partial(self.iperf, nodes, system, a, b, target))
        if memory.result.peak_mb:
            self.run.add(nodes, system, "memory", 0, "idle_mb", memory.result.idle_mb, "MB")
            self.run.add(nodes, system, "memory", 0, "peak_mb", memory.result.peak_mb, "MB")
        if system == TENCRYPT and self.first_shape and self.plan.soak_seconds:
            self.progress.step(
                f"{label} · soak ×{max(self.plan.clients)} ({self.plan.soak_seconds:g} s)"
            )
            self.attempt(nodes, system, "soak", partial(self.soak, nodes, system, a, b, target))

    def ipv6_runs(self, nodes: int, system: str, a: Pod, b: Pod, target: Target) -> None:
        """TCP over IPv6 at each client count, once the IPv6 path answers (a failure to answer
        skips them, reported once)."""
        try:
            if not target.host6:
                raise measure.MeasureError("no IPv6 address to reach nginx2 at (is the lab dual?)")
            measure.wait_reachable(a.netns, target.host6)
        except FAILURES as exc:
            message = f"{_shape(nodes)}, {system}, IPv6 path: {_oneline(exc)}"
            self.run.errors.append(message)
            self.progress.say(f"bench: FAILED {message}")
            return
        self.run.notes.append(f"{_shape(nodes)}, {system}: over IPv6 to {target.host6}")
        self.tcp_runs(nodes, system, a, b, target, 6)

    def tcp_runs(
        self, nodes: int, system: str, a: Pod, b: Pod, target: Target, family: int = 4
    ) -> None:
        """TCP at each client count, over ``family`` (the IPv6 runs say so in their names)."""
        label = f"{_shape(nodes)} · {system}"
        over = " over IPv6" if family == 6 else ""
        for clients in self.plan.clients:
            self.progress.step(f"{label} · TCP{over} ×{clients} ({self.plan.duration:g} s)")
            self.attempt(
                nodes,
                system,
                f"TCP{over} ×{clients}",
                partial(self.iperf, nodes, system, a, b, target, clients, family),
            )

    def ready_memory(self, nodes: int, system: str, target: Target) -> None:
        """VmRSS of the largest tunnel process once it is ready, before any traffic."""
        rss = measure.largest_mb(target.pids(), "VmRSS")
        if rss:
            self.run.add(nodes, system, "memory", 0, "ready_mb", rss, "MB")

    def dns(self, lab: Lab, nodes: int, system: str, a: Pod, b: Pod, target: Target) -> None:
        """Lookups of nginx2's Service name straight to the cluster DNS, and for Tencrypt also
        through the pod's resolver, which must then be the embedded proxy: one probe, the two
        paths asked in turns, so that both are measured across the same moments; the probe,
        the client node's dnsmasq and the tunnel processes on one CPU meanwhile, so that no
        path pays a cross-CPU wake-up the other does not (on the 2-core VM a server on the
        other CPU than the client adds some 40 µs to each lookup, and where each server runs
        is the scheduler's choice of the moment)."""
        runs = [("dns_direct", lab.dns_ip)] + ([("dns", "resolv")] if system == TENCRYPT else [])
        cluster_dns = procs.read_pid(lab.pid_file(f"{a.node}.dnsmasq"))
        if cluster_dns is None:
            raise measure.MeasureError(f"no pid for {a.node}'s dnsmasq: cannot pin it")
        cpu = min(os.sched_getaffinity(0))
        with cpustat.pinned([cluster_dns, *target.pids()], cpu):
            found = measure.dns_lookups(
                a.netns,
                [server for _test, server in runs],
                b.fqdn,
                self.plan.dns_count,
                self.plan.dns_seconds,
            )
        for (test, _server), d in zip(runs, found, strict=True):
            if test == "dns" and not d.server.startswith("127."):
                raise measure.MeasureError(f"the pod's resolver is {d.server}, not the proxy")
        how = f"on CPU {cpu}" + (", the paths interleaved" if len(runs) > 1 else "")
        for (test, _server), d in zip(runs, found, strict=True):
            self.run.notes.append(
                f"{_shape(nodes)}, {system}: DNS {DNS_PATHS[test]} = {d.server}, "
                f"{d.lookups} lookups of {b.fqdn} in {d.seconds:.2f} s ({how})"
            )
            self.run.add(nodes, system, test, 1, "p50_us", d.p50_us, "µs")
            self.run.add(nodes, system, test, 1, "p99_us", d.p99_us, "µs")
            self.run.add(nodes, system, test, 1, "rate", d.rate, "1/s")
            self.run.add(nodes, system, test, 1, "lookups", d.lookups, "lookups")
            self.run.add(nodes, system, test, 1, "failed", d.failed, "lookups")

    def ping(self, nodes: int, system: str, a: Pod, target: Target) -> None:
        p = measure.ping(a.netns, target.ping_host, self.plan.ping_count, PING_INTERVAL)
        for metric, value in (
            ("p50_ms", p.p50_ms),
            ("avg_ms", p.avg_ms),
            ("min_ms", p.min_ms),
            ("max_ms", p.max_ms),
            ("mdev_ms", p.mdev_ms),
        ):
            self.run.add(nodes, system, "ping", 1, metric, value, "ms")
        self.run.add(
            nodes, system, "ping", 1, "loss_pct", 100.0 * (p.sent - p.received) / p.sent, "%"
        )

    def rr(self, nodes: int, system: str, a: Pod, b: Pod, target: Target) -> None:
        """Request/response back to back, and what the tunnel processes' CPU (both ends) cost
        per transaction meanwhile: a proxy that polls for replies trades CPU for latency."""
        before = cpustat.snapshot(target.pids(), a.netns, b.netns) if target.iface else None
        r = measure.request_response(a.netns, target.host, self.plan.rr_seconds)
        self.run.add(nodes, system, "rr", 1, "rate", r.rate, "1/s")
        self.run.add(nodes, system, "rr", 1, "p50_us", r.p50_us, "µs")
        self.run.add(nodes, system, "rr", 1, "p99_us", r.p99_us, "µs")
        if before is not None and r.transactions:
            after = cpustat.snapshot(target.pids(), a.netns, b.netns)
            used = sum(cpustat.seconds_used(before, after).values())
            self.run.add(nodes, system, "rr", 1, "cpu_us_per_rr", used / r.transactions * 1e6, "µs")
        # a new connection per transaction (TCP_CRR): connect to the first byte of the answer
        c = measure.request_response(a.netns, target.host, self.plan.rr_seconds, True)
        self.run.add(nodes, system, "crr", 1, "p50_us", c.p50_us, "µs")
        self.run.add(nodes, system, "crr", 1, "p99_us", c.p99_us, "µs")

    def sparse(self, nodes: int, system: str, a: Pod, b: Pod, target: Target) -> None:
        """One 1-byte request every SPARSE_INTERVAL on one connection: the round trip of a call
        after silence, and the tunnel processes' CPU (both ends) per request meanwhile (what
        keeping the path warm costs, if a tunnel spins)."""
        before = cpustat.snapshot(target.pids(), a.netns, b.netns) if target.iface else None
        r = measure.sparse_rr(a.netns, target.host, self.plan.sparse_seconds, SPARSE_INTERVAL)
        add = partial(self.run.add, nodes, system, "sparse_rr", 1)
        add("p50_us", r.p50_us, "µs")
        add("p90_us", r.p90_us, "µs")
        add("p99_us", r.p99_us, "µs")
        add("requests", r.requests, "requests")
        add("interval_ms", r.interval * 1000, "ms")
        if before is not None:
            after = cpustat.snapshot(target.pids(), a.netns, b.netns)
            used = sum(cpustat.seconds_used(before, after).values())
            add("cpu_us_per_request", used / r.sent * 1e6, "µs")

    def iperf(
        self,
        nodes: int,
        system: str,
        a: Pod,
        b: Pod,
        target: Target,
        clients: int | None = None,
        family: int = 4,
    ) -> measure.Iperf:
        """One iperf3 run (TCP with ``clients`` streams, else UDP), recorded; over IPv6 to
        ``target.host6`` when ``family`` is 6."""
        namespaces = [a.netns, b.netns]
        test, n = ("tcp", clients) if clients else ("udp", 1)
        host = target.host6 if family == 6 else target.host
        if host is None:
            raise measure.MeasureError(f"no IPv{family} address to reach nginx2 at")
        add = partial(self._add, (nodes, system, test, n), family=family)
        drops = measure.udp_rcvbuf_errors(namespaces)
        before = measure.iface_counters(a.netns, target.iface) if target.iface else (0, 0)
        udp = None if clients else self.plan.udp_rate
        cpu_before = cpustat.snapshot(target.pids(), a.netns, b.netns) if target.iface else None
        result = measure.iperf(
            a.netns,
            b.netns,
            host,
            self.plan.duration,
            self.logs / "iperf3.log",
            parallel=clients or 1,
            udp_rate=udp,
        )
        if cpu_before is not None:
            cpu_after = cpustat.snapshot(target.pids(), a.netns, b.netns)
            self.cpu((nodes, system, test, n), cpu_before, cpu_after, result, family)
        drops = measure.udp_rcvbuf_errors(namespaces) - drops
        if target.iface:
            after = measure.iface_counters(a.netns, target.iface)
            carried = after[0] - before[0]
            if carried < 0.9 * result.mbytes * 1e6:
                raise measure.MeasureError(
                    f"only {carried / 1e6:.1f} MB crossed {target.iface} "
                    f"for {result.mbytes:.1f} MB received: not tunnelled"
                )
            add("tunnel_mb", carried / 1e6, "MB")
            add("tunnel_if_drops", after[1] - before[1], "packets")
        add("throughput", result.gbps, "Gbit/s")
        add("udp_rcvbuf_errors", drops, "datagrams")
        add("received_mb", result.mbytes, "MB")
        if clients:
            add("retransmits", result.retransmits, "segments")
            hwm = measure.largest_mb(target.pids(), "VmHWM")
            if hwm:
                add("hwm_mb", hwm, "MB")
        else:
            add("offered", _rate_gbps(self.plan.udp_rate), "Gbit/s")
            add("sent", result.sent_gbps, "Gbit/s")
            add("loss_pct", result.lost_pct, "%")
            add("lost", result.lost, "datagrams")
            add("jitter_ms", result.jitter_ms, "ms")
        return result

    def _add(
        self, run: tuple[int, str, str, int], metric: str, value: float, unit: str, family: int
    ) -> None:
        """One figure of run (nodes, system, test, clients) over IP ``family``."""
        nodes, system, test, n = run
        self.run.add(nodes, system, test, n, metric, value, unit, family)

    def cpu(
        self,
        run: tuple[int, str, str, int],
        before: cpustat.Snapshot,
        after: cpustat.Snapshot,
        result: measure.Iperf,
        family: int = 4,
    ) -> None:
        """CPU-seconds of the tunnel processes per end during one run (``run``: nodes, system,
        test, clients; over IP ``family``), and per gigabit received (cores per Gbit/s), per
        end and summed."""
        add = partial(self._add, run, family=family)
        used = cpustat.seconds_used(before, after)
        gigabits = result.mbytes * 8 / 1000
        total = sum(used.values())
        for end, seconds in (*used.items(), ("both", total)):
            add(f"cpu_s_{end}", seconds, "CPU-s")
            per = cpustat.cores_per_gbps(seconds, gigabits)
            if per is not None:
                add(f"cpu_per_gbps_{end}", per, "cores/(Gbit/s)")
        if after.at > before.at:
            add("cpu_cores", total / (after.at - before.at), "cores")

    def soak(self, nodes: int, system: str, a: Pod, b: Pod, target: Target) -> None:
        seconds, clients = self.plan.soak_seconds, max(self.plan.clients)
        window = seconds / SOAK_RUNS
        with measure.MemorySampler(target.pids) as memory:
            result = measure.iperf(
                a.netns, b.netns, target.host, seconds, self.logs / "iperf3.log", parallel=clients
            )
        samples = memory.result.samples
        end = samples[-1][0] if samples else seconds
        self.run.add(nodes, system, "soak", 0, "seconds", seconds, "s")
        self.run.add(nodes, system, "soak", 0, "clients", clients, "streams")
        self.run.add(nodes, system, "soak", 0, "throughput", result.gbps, "Gbit/s")
        self.run.add(
            nodes, system, "soak", 0, "first_mb", measure.window_max(samples, 0, window), "MB"
        )
        self.run.add(
            nodes,
            system,
            "soak",
            0,
            "last_mb",
            measure.window_max(samples, end - window, end + 1),
            "MB",
        )
        self.run.add(nodes, system, "soak", 0, "peak_mb", memory.result.peak_mb, "MB")


def _rate_gbps(rate: str) -> float:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(rate[-1], 1.0)
    return float(rate.rstrip("KMG")) * scale / 1e9


def _shape(nodes: int) -> str:
    return "1 node" if nodes == 1 else f"{nodes} nodes"


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:400]


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C (or SIGTERM) waits until it has."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# --- the run as a whole --------------------------------------------------------------------


def describe(plan: Plan) -> Run:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    run = Run(
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        cores=os.cpu_count() or 0,
        machine=f"{cpu}, Linux {platform.release()}",
    )
    run.settings = (
        f"{'quick' if plan.quick else 'full'} run; iperf3 runs of "
        f"{plan.duration:g} s; TCP clients {', '.join(map(str, plan.clients))}; UDP "
        f"offered {plan.udp_rate}bit/s; ping {plan.ping_count}× every "
        f"{PING_INTERVAL * 1000:g} ms; request/response {plan.rr_seconds:g} s; sparse "
        f"request/response {plan.sparse_seconds:g} s, one request every "
        f"{SPARSE_INTERVAL * 1000:g} ms"
    )
    first = subprocess.run(
        ["iperf3", "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]
    run.versions["iperf3"] = first.removeprefix("iperf ").split(" ")[0]
    run.versions["tencrypt"] = _git_describe()
    run.versions["python"] = platform.python_version()
    run.peer_labels = {label: system for label, (system, _) in plan.binaries.items()}
    run.ip_family = plan.ip_family
    if plan.dual:
        run.settings += (
            "; dual-stack lab: after each system's IPv4 TCP runs, TCP over IPv6 at the same "
            "client counts (not OpenVPN: IPv4 only here)"
        )
    return run


def _git_describe() -> str:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or "unknown"


def main(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if os.geteuid() != 0:
        raise UsageError("bench builds network namespaces: run it as root")
    run = describe(plan)
    progress = Progress([])
    logs = Path(tempfile.mkdtemp(prefix="tencrypt-bench-logs-"))
    bench = Bench(plan, run, progress, logs)
    old_term = (
        signal.signal(signal.SIGTERM, _interrupt)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    load_start = os.getloadavg()[0]
    interrupted = False
    try:
        _install(plan, run, progress)
        progress.estimates, progress.started = estimates(plan), time.monotonic()
        for nodes in plan.nodes:
            bench.shape(nodes)
    except KeyboardInterrupt:
        interrupted = True
        run.errors.append("interrupted (Ctrl-C or SIGTERM): the figures above are partial")
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(logs, ignore_errors=True)
        progress.clear()
    idle_row(plan, run)
    run.notes.insert(
        0,
        f"Taken while other work shared the machine: 1-minute load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({run.cores} cores).",
    )
    paths = report.write_all(run, plan.out, plan.prefix)
    print(f"bench: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    for error in run.errors:
        print(f"bench: failed: {error}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if run.errors else 0


def idle_row(plan: Plan, run: Run) -> None:
    """bench/idle.py's result (``--idle-json``) into the run; a file that does not hold it is a
    failure of the run (and the idle targets say not measured)."""
    if plan.idle_json is None:
        return
    try:
        idlerow.add_to(run, idlerow.load(plan.idle_json))
    except measure.MeasureError as exc:
        run.errors.append(f"idle proxies ({plan.idle_json}): {_oneline(exc)}")


def _install(plan: Plan, run: Run, progress: Progress) -> None:
    """The peer tunnels' packages: what is not installed is said, installed with apt-get if it
    can be, else its system is skipped (said again, and listed in the report)."""

    def say(text: str) -> None:
        progress.say(f"bench: {text}")

    missing = {s: peers.absent(tools) for s, tools in peer_tools(plan).items()}
    missing = {s: tools for s, tools in missing.items() if tools}

    def absent(system: str, tools: dict[str, str]) -> str:
        what = system if system in plan.systems else f"{system}'s tools"  # a --peer-binary's
        on_path = ", ".join(f"`{b}`" for b in tools)
        verb = "is" if what == system else "are"
        return f"{what} {verb} not installed on this machine (no {on_path} on PATH)"

    for system, tools in missing.items():
        say(absent(system, tools))
    failure = ""
    try:
        peers.install_packages(sorted({p for t in missing.values() for p in t.values()}), say)
    except (SetupError, subprocess.TimeoutExpired) as exc:
        failure = f": {_oneline(exc)}"
    for system, tools in missing.items():
        still = peers.absent(tools)
        if not still:
            continue
        why = absent(system, still)
        gone = skip_system(plan, system)
        text = (
            f"{', '.join(gone) or system}: not measured: {why} and apt-get could not install "
            f"{' '.join(sorted(set(still.values())))}{failure}"
        )
        run.skipped.append(text)
        say(f"{text}; the other systems go on without it")
    for system in peers.TOOLS:
        if system in plan.systems:
            run.versions[system] = peers.version(system)
    for label, (_system, path) in plan.binaries.items():
        if label in plan.systems:
            # the file's name, not its path: a committed report names nothing of this machine
            run.versions[label] = f"(--peer-binary …/{os.path.basename(path)})"
