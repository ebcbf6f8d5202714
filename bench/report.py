"""Benchmark results: one flat list of measurements, written as CSV, markdown and PNG plots.

Rules:
- A ``Measurement`` is one figure: (lab shape, system, test, client count, metric, IP family)
  -> value. Everything the harness measures is one, so the CSV is that list, one row each.
- The IP family is the inner one, what the application used (4, or 6 for the TCP runs a
  dual-stack run, ``--ip-family dual``, adds after the IPv4 ones). A dual-stack run's CSV has a
  ``family`` column ("4"/"6") and its markdown an IPv6 table per lab shape with each system's
  IPv6 / IPv4 ratios; an IPv4 run (``Run.ip_family`` "ipv4", the default) writes exactly what it
  wrote before families existed: no column, no table. Ratios and tables compare figures of one
  family only; every table but the IPv6 one shows IPv4 figures.
- Every figure is also given as a ratio to the same figure of ``vanilla``, of ``wireguard-go``
  (the Debian build) and of the current wireguard-go (the first ``--peer-binary
  wireguard-go=PATH``, ``Run.peer_labels``) measured in the same run on the same lab shape
  (``ratio``); a missing or zero baseline gives no ratio (empty cell, "–"), never a made-up one.
- The issue's targets are judged in bench/targets.py.
- Latency figures (``is_latency``: round trips in ms or µs) also get their difference to
  vanilla (``added``): what the tunnel adds; in the CSV, column ``added_vs_vanilla``.
- The sparse request/response row (one 1-byte request every 20 ms on one connection, every hop
  cold) has a table of its own beside the back-to-back one: median and p90 with what each adds
  over vanilla and the ratios of those figures, and the tunnel's CPU per request.
- A system that could not be had (a peer tunnel not installed, and apt-get could not install
  it) is listed under "Systems not measured" with the reason (``Run.skipped``): the bench went
  on without it; that is not a failure of the run.
- Figures of lab shape 0 are not of a lab of the bench: the idle proxies' row
  (bench/idlerow.py), which renders its own section.
- Rendering is pure (``render_*`` return text); only ``write_*`` touch files, and matplotlib
  is imported inside ``write_plots`` (bench/plots.py) so that the pure parts need nothing
  beyond the stdlib.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

VANILLA, TENCRYPT, WIREGUARD, OPENVPN = "vanilla", "tencrypt", "wireguard-go", "openvpn"
TENCRYPT_NETPOL = "tencrypt-netpol"  # Tencrypt with NetworkPolicies isolating both pods
SYSTEMS = [VANILLA, TENCRYPT, TENCRYPT_NETPOL, WIREGUARD, OPENVPN]  # table order
CSV_FIELDS = [
    "nodes",
    "system",
    "test",
    "clients",
    "metric",
    "value",
    "unit",
    "vs_vanilla",
    "vs_wireguard_go",
    "vs_current_wireguard_go",
    "added_vs_vanilla",
]
RATIO_FIELDS = CSV_FIELDS[-4:-1]  # one per baseline (``baselines``)
LATENCY_TESTS = ("ping", "rr", "crr", "sparse_rr", "dns", "dns_direct")
LATENCY_METRICS = ("p50_", "p90_", "p99_", "avg_", "min_", "max_")  # of those tests' figures
FAMILY_FIELD = "family"  # after "nodes", in a dual-stack run's CSV only


@dataclass(slots=True, frozen=True)
class Measurement:
    nodes: int
    system: str
    test: str  # tcp, udp, ping, rr, crr, sparse_rr, dns, dns_direct, memory, soak, idle
    clients: int
    metric: str
    value: float
    unit: str
    family: int = 4  # the inner IP family the figure was measured over

    @property
    def key(self) -> tuple[int, str, int, str, int]:
        return (self.nodes, self.test, self.clients, self.metric, self.family)


def round_test(test: str, r: int) -> str:
    """The test name of ``test``'s figures in extra round ``r`` (bench/plan.py ``--rounds``),
    their clients column the client count as in the main pass's ``test``."""
    return f"{test}_round_{r}"


@dataclass(slots=True)
class Run:
    """One invocation of the harness: its settings, its environment and what it measured."""

    date: str
    cores: int
    machine: str = ""  # CPU model, kernel
    settings: str = ""  # duration, client counts, UDP rate, quick or full
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    peer_labels: dict[str, str] = field(default_factory=dict)  # --peer-binary label -> system
    ip_family: str = "ipv4"  # --ip-family: "dual" adds the IPv6 runs (and their column, table)
    skipped: list[str] = field(default_factory=list)  # systems not measured, and why
    idle_note: str = ""  # how the idle row's proxies were started (bench/idlerow.py)

    def add(
        self,
        nodes: int,
        system: str,
        test: str,
        clients: int,
        metric: str,
        value: float,
        unit: str,
        family: int = 4,
    ) -> None:
        self.measurements.append(
            Measurement(nodes, system, test, clients, metric, value, unit, family)
        )

    def get(
        self, nodes: int, system: str, test: str, clients: int, metric: str, family: int = 4
    ) -> float | None:
        m = find(self, nodes, system, test, clients, metric, family)
        return m.value if m else None

    def rounds(
        self, nodes: int, test: str, clients: int, metric: str, systems: tuple[str, ...]
    ) -> list[tuple[float, ...]]:
        """The extra rounds of ``test`` (tests ``round_test(test, R)``, in R's order) in which
        every one of ``systems`` has a figure at ``clients``: those figures, in ``systems``'
        order."""
        prefix = round_test(test, 0)[:-1]
        numbers = sorted(
            {
                int(m.test[len(prefix) :])
                for m in self.measurements
                if m.nodes == nodes
                and m.test.startswith(prefix)
                and m.test[len(prefix) :].isdigit()
            }
        )
        out = []
        for r in numbers:
            figures = [self.get(nodes, s, round_test(test, r), clients, metric) for s in systems]
            if all(f is not None for f in figures):
                out.append(tuple(f for f in figures if f is not None))
        return out

    @property
    def dual(self) -> bool:
        return self.ip_family != "ipv4"

    def csv_fields(self) -> list[str]:
        return [*CSV_FIELDS[:1], FAMILY_FIELD, *CSV_FIELDS[1:]] if self.dual else CSV_FIELDS


# --- ratios --------------------------------------------------------------------------------


def baselines(run: Run) -> list[tuple[str | None, str]]:
    """(system, short label) of each baseline: vanilla, the Debian wireguard-go, the current
    wireguard-go (None when the run has none)."""
    current = next((label for label, s in run.peer_labels.items() if s == WIREGUARD), None)
    return [(VANILLA, "vanilla"), (WIREGUARD, "wg"), (current, "wg-current")]


def ratio(m: Measurement, measurements: Iterable[Measurement], baseline: str) -> float | None:
    """``m``'s value over the same figure of ``baseline`` in the same run, if there is one."""
    for other in measurements:
        if other.system == baseline and other.key == m.key:
            return m.value / other.value if other.value else None
    return None


def is_latency(m: Measurement) -> bool:
    """A round-trip time, whose difference to vanilla is what a tunnel adds."""
    return m.test in LATENCY_TESTS and m.metric.startswith(LATENCY_METRICS)


def added(m: Measurement, measurements: Iterable[Measurement]) -> float | None:
    """``m``'s value minus vanilla's (what a tunnel adds to a latency)."""
    for other in measurements:
        if other.system == VANILLA and other.key == m.key:
            return m.value - other.value
    return None


def added_ratio(m: Measurement, measurements: list[Measurement], baseline: str) -> float | None:
    """What ``m``'s system adds over vanilla over what ``baseline`` adds to the same figure (the
    issue's "2.1×"); None when either is missing or the baseline adds nothing."""
    for other in measurements:
        if other.system == baseline and other.key == m.key:
            ours, theirs = added(m, measurements), added(other, measurements)
            return ours / theirs if ours is not None and theirs and theirs > 0 else None
    return None


def added_cell(run: Run, m: Measurement | None) -> str:
    """What ``m`` adds over vanilla, with its ratio to what each tunnel baseline adds."""
    d = added(m, run.measurements) if m is not None and m.system != VANILLA else None
    if m is None or d is None:
        return "–"
    extra = [
        f"{fmt_ratio(r)} {label}'s"
        for base, label in baselines(run)[1:]
        if base and base != m.system and (r := added_ratio(m, run.measurements, base)) is not None
    ]
    return f"{fmt_delta(d)} ({', '.join(extra)})" if extra else fmt_delta(d)


def with_ratios(run: Run) -> list[dict[str, object]]:
    """The CSV rows: every measurement with its ratio to each baseline."""
    rows = []
    for m in run.measurements:
        row: dict[str, object] = {
            "nodes": m.nodes,
            **({FAMILY_FIELD: str(m.family)} if run.dual else {}),
            "system": m.system,
            "test": m.test,
            "clients": m.clients,
            "metric": m.metric,
            "value": f"{m.value:.6g}",
            "unit": m.unit,
        }
        for (base, _), column in zip(baselines(run), RATIO_FIELDS, strict=True):
            r = ratio(m, run.measurements, base) if base else None
            row[column] = "" if r is None else f"{r:.4g}"
        d = added(m, run.measurements) if is_latency(m) and m.system != VANILLA else None
        row["added_vs_vanilla"] = "" if d is None else f"{d:.6g}"
        rows.append(row)
    return rows


def render_csv(run: Run) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=run.csv_fields(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(with_ratios(run))
    return out.getvalue()


# --- markdown ------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 10**digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def fmt_delta(value: float) -> str:
    """A signed difference, 3 significant digits, never in exponent form (+1150, +38, +0.4)."""
    return f"{value:+.0f}" if abs(value) >= 1000 else f"{value:+.3g}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.3g}×"


def cell(run: Run, m: Measurement | None, *, ratios: bool = True, delta: bool = False) -> str:
    """A figure with its ratio to each baseline (and, ``delta``, its difference to vanilla)."""
    if m is None:
        return "–"
    text = fmt(m.value)
    extra = []
    if delta and m.system != VANILLA:
        d = added(m, run.measurements)
        if d is not None:
            extra.append(f"{fmt_delta(d)} vs vanilla")
    if ratios:
        for base, label in baselines(run):
            r = ratio(m, run.measurements, base) if base and m.system != base else None
            if r is not None:
                extra.append(f"{fmt_ratio(r)} {label}")
    return f"{text} ({', '.join(extra)})" if extra else text


def find(
    run: Run, nodes: int, system: str, test: str, clients: int, metric: str, family: int = 4
) -> Measurement | None:
    for m in run.measurements:
        if (m.nodes, m.system, m.test, m.clients, m.metric, m.family) == (
            nodes,
            system,
            test,
            clients,
            metric,
            family,
        ):
            return m
    return None


def systems_of(run: Run, nodes: int) -> list[str]:
    present = {m.system for m in run.measurements if m.nodes == nodes}
    return [s for s in SYSTEMS if s in present] + sorted(present - set(SYSTEMS))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def tcp_counts(run: Run, nodes: int, family: int = 4) -> list[int]:
    return sorted(
        {
            m.clients
            for m in run.measurements
            if (m.nodes, m.test, m.family) == (nodes, "tcp", family)
        }
    )


def render_tcp(run: Run, nodes: int, family: int = 4) -> list[str]:
    counts = tcp_counts(run, nodes, family)
    if not counts:
        return []
    systems = [
        s
        for s in systems_of(run, nodes)
        if family == 4 or any(find(run, nodes, s, "tcp", n, "throughput", family) for n in counts)
    ]
    header = ["System", *(f"{n} client{'s' if n > 1 else ''}" for n in counts)]
    rows = [
        [s, *(cell(run, find(run, nodes, s, "tcp", n, "throughput", family)) for n in counts)]
        for s in systems
    ]
    detail = [
        [
            s,
            *(
                f"{fmt(run.get(nodes, s, 'tcp', n, 'retransmits', family))} / "
                f"{fmt(run.get(nodes, s, 'tcp', n, 'udp_rcvbuf_errors', family))}"
                for n in counts
            ),
        ]
        for s in systems
    ]
    title = "### TCP throughput, Gbit/s (iperf3 -P N, received)"
    if family == 6:
        title = (
            "### TCP throughput over IPv6, Gbit/s (iperf3 -P N, received; the same pods, "
            "after each system's IPv4 runs)"
        )
    return [
        title,
        "",
        *table(header, rows),
        "TCP retransmits / UDP datagrams dropped on a full receive buffer (both pods) during "
        "the same runs:",
        "",
        *table(header, detail),
    ]


def family_ratio(run: Run, nodes: int, system: str, clients: int) -> float | None:
    """A system's IPv6 TCP throughput over its IPv4 one at ``clients``, same run and shape."""
    v6 = run.get(nodes, system, "tcp", clients, "throughput", 6)
    v4 = run.get(nodes, system, "tcp", clients, "throughput", 4)
    return v6 / v4 if v6 is not None and v4 else None


def render_families(run: Run, nodes: int) -> list[str]:
    """Per system and client count: IPv6 / IPv4 TCP throughput of the same run."""
    counts = tcp_counts(run, nodes, 6)
    rows = [
        [s, *(fmt_ratio(family_ratio(run, nodes, s, n)) for n in counts)]
        for s in systems_of(run, nodes)
        if any(family_ratio(run, nodes, s, n) is not None for n in counts)
    ]
    if not rows:
        return []
    header = ["System", *(f"{n} client{'s' if n > 1 else ''}" for n in counts)]
    return [
        "### TCP throughput IPv6 / IPv4 (each system's two figures of this run)",
        "",
        *table(header, rows),
    ]


def render_udp(run: Run, nodes: int) -> list[str]:
    rows = []
    for s in systems_of(run, nodes):
        got = find(run, nodes, s, "udp", 1, "throughput")
        if got is None:
            continue
        rows.append(
            [
                s,
                *(fmt(run.get(nodes, s, "udp", 1, k)) for k in ("offered", "sent")),
                cell(run, got),
                *(
                    fmt(run.get(nodes, s, "udp", 1, k))
                    for k in ("loss_pct", "jitter_ms", "udp_rcvbuf_errors", "tunnel_if_drops")
                ),
            ]
        )
    if not rows:
        return []
    header = [
        "System",
        "offered Gbit/s",
        "sent Gbit/s",
        "received Gbit/s",
        "loss %",
        "jitter ms",
        "UDP rcvbuf drops (both pods)",
        "tunnel interface drops (client)",
    ]
    return [
        "### UDP at a fixed offered rate (iperf3 -u, one stream, 1200-byte datagrams)",
        "",
        *table(header, rows),
    ]


def render_latency(run: Run, nodes: int) -> list[str]:
    rows = []
    for s in systems_of(run, nodes):
        ping, rr = find(run, nodes, s, "ping", 1, "p50_ms"), find(run, nodes, s, "rr", 1, "rate")
        if ping is None and rr is None:
            continue
        rows.append(
            [
                s,
                cell(run, ping, delta=True),
                *(fmt(run.get(nodes, s, "ping", 1, k)) for k in ("avg_ms", "min_ms")),
                cell(run, rr),
                cell(run, find(run, nodes, s, "rr", 1, "p50_us"), delta=True),
                fmt(run.get(nodes, s, "rr", 1, "p99_us")),
                fmt(run.get(nodes, s, "rr", 1, "cpu_us_per_rr")),
                cell(run, find(run, nodes, s, "crr", 1, "p50_us"), delta=True),
                fmt(run.get(nodes, s, "crr", 1, "p99_us")),
            ]
        )
    if not rows:
        return []
    header = [
        "System",
        "ping median ms",
        "ping avg ms",
        "ping min ms",
        "TCP req/resp per s",
        "req/resp median µs",
        "p99 µs",
        "tunnel CPU µs per req/resp (both ends)",
        "new connection to first byte, median µs",
        "p99 µs",
    ]
    return [
        "### Round trip at idle (ping; 1-byte TCP request/response, one connection)",
        "",
        *table(header, rows),
    ]


def render_cpu(run: Run, nodes: int) -> list[str]:
    """Cores per Gbit/s of each system's tunnel processes, per TCP client count and UDP."""
    runs = sorted(
        {
            (m.test != "tcp", m.clients)
            for m in run.measurements
            if (m.nodes, m.metric, m.family) == (nodes, "cpu_per_gbps_both", 4)
        }
    )
    if not runs:
        return []
    header = [
        "System",
        *(
            f"UDP at {fmt(run_udp_rate(run, nodes))} Gbit/s"
            if udp
            else f"TCP, {n} client{'s' if n > 1 else ''}"
            for udp, n in runs
        ),
    ]
    rows = []
    for s in systems_of(run, nodes):
        cells = []
        for udp, n in runs:
            test = "udp" if udp else "tcp"
            both = find(run, nodes, s, test, n, "cpu_per_gbps_both")
            client = run.get(nodes, s, test, n, "cpu_per_gbps_client")
            server = run.get(nodes, s, test, n, "cpu_per_gbps_server")
            busy = run.get(nodes, s, test, n, "cpu_cores")
            cells.append(
                "–"
                if both is None
                else f"{cell(run, both, ratios=False)} ({fmt(client, 2)} + {fmt(server, 2)}; "
                f"{fmt(busy, 2)} cores busy)"
            )
        if any(c != "–" for c in cells):
            rows.append([s, *cells])
    return [
        "### CPU of the tunnel processes per Gbit/s received (cores per Gbit/s)",
        "",
        "CPU-seconds per second per Gbit/s = CPU-seconds used during the run (utime + stime of "
        "/proc/PID/stat, all threads) / gigabits received; summed over both ends, then "
        "(client end + server end; cores busy on average during the run). Lower is better; "
        "it does not depend on how the cores happened to be shared.",
        "",
        *table(header, rows),
    ]


def run_udp_rate(run: Run, nodes: int) -> float | None:
    return next(
        (
            m.value
            for m in run.measurements
            if (m.nodes, m.test, m.metric, m.family) == (nodes, "udp", "offered", 4)
        ),
        None,
    )


DNS_PATHS = {
    "dns_direct": "straight to the cluster DNS",
    "dns": "through the pod's resolver (the proxy)",
}


def render_sparse(run: Run, nodes: int) -> list[str]:
    """The sparse request/response row: median and p90 per system, each with what it adds over
    vanilla and its ratios, and the tunnel processes' CPU per request."""
    rows = []
    for s in systems_of(run, nodes):
        p50 = find(run, nodes, s, "sparse_rr", 1, "p50_us")
        if p50 is None:
            continue
        p90 = find(run, nodes, s, "sparse_rr", 1, "p90_us")
        rows.append(
            [
                s,
                cell(run, p50),
                added_cell(run, p50),
                cell(run, p90),
                added_cell(run, p90),
                fmt(run.get(nodes, s, "sparse_rr", 1, "p99_us")),
                fmt(run.get(nodes, s, "sparse_rr", 1, "requests")),
                fmt(run.get(nodes, s, "sparse_rr", 1, "cpu_us_per_request")),
            ]
        )
    if not rows:
        return []
    every = next(
        (
            m.value
            for m in run.measurements
            if (m.nodes, m.test, m.metric) == (nodes, "sparse_rr", "interval_ms")
        ),
        None,
    )
    header = [
        "System",
        "round trip median µs",
        "added over vanilla, median µs",
        "p90 µs",
        "added over vanilla, p90 µs",
        "p99 µs",
        "requests",
        "tunnel CPU µs per request (both ends)",
    ]
    return [
        f"### Sparse request/response (one 1-byte TCP request every {fmt(every)} ms, "
        "one connection)",
        "",
        "What a call after silence pays: every hop finds its tunnel process idle. The first "
        "requests (handshake, first flow) are not counted. In parentheses after an added "
        "figure: its ratio to what the Debian wireguard-go (wg) and the current one "
        "(wg-current) add.",
        "",
        *table(header, rows),
    ]


def render_dns(run: Run, nodes: int) -> list[str]:
    """Sequential lookups of one cached name, per system and path."""
    rows = []
    for s in systems_of(run, nodes):
        for test, path in DNS_PATHS.items():
            p50 = find(run, nodes, s, test, 1, "p50_us")
            if p50 is None:
                continue
            rows.append(
                [
                    f"{s}, {path}",
                    fmt(p50.value),
                    fmt(run.get(nodes, s, test, 1, "p99_us")),
                    fmt(run.get(nodes, s, test, 1, "rate")),
                    f"{fmt(run.get(nodes, s, test, 1, 'lookups'))} / "
                    f"{fmt(run.get(nodes, s, test, 1, 'failed'))}",
                ]
            )
    if not rows:
        return []
    header = ["System, path", "median µs", "p99 µs", "lookups per s", "answered / failed"]
    return [
        "### DNS: sequential lookups of nginx2's Service name (cached), from the client pod",
        "",
        "A system's paths are measured by one probe that asks them in turns (AB, BA, …), the "
        "probe and the servers pinned to one CPU, so that the paths share the machine's moments "
        "and none pays a cross-CPU wake-up the other does not.",
        "",
        *table(header, rows),
    ]


def render_memory(run: Run, nodes: int) -> list[str]:
    rows = []
    most = max(
        (
            m.clients
            for m in run.measurements
            if (m.nodes, m.metric, m.family) == (nodes, "hwm_mb", 4)
        ),
        default=0,
    )
    for s in systems_of(run, nodes):
        peak = find(run, nodes, s, "memory", 0, "peak_mb")
        if peak is None:
            continue
        rows.append(
            [
                s,
                fmt(run.get(nodes, s, "memory", 0, "ready_mb")),
                fmt(run.get(nodes, s, "memory", 0, "idle_mb")),
                fmt(run.get(nodes, s, "tcp", most, "hwm_mb")),
                cell(run, peak),
                *(fmt(run.get(nodes, s, "soak", 0, k)) for k in ("first_mb", "last_mb", "seconds")),
            ]
        )
    if not rows:
        return []
    header = [
        "System",
        "RSS when ready MB",
        "RSS before the TCP runs MB",
        f"VmHWM after {most} clients MB",
        "peak RSS (VmHWM) MB",
        "soak: RSS first window MB",
        "soak: RSS last window MB",
        "soak s",
    ]
    return [
        "### Memory of the tunnel processes (largest process; VmRSS/VmHWM)",
        "",
        *table(header, rows),
    ]


def shape_name(nodes: int) -> str:
    return "1 node" if nodes == 1 else f"{nodes} nodes (VXLAN)"


SHAPE_TITLES = {
    1: "One node: both pods on one bridge",
    2: "Two nodes: pods on different nodes, joined over VXLAN (pod MTU 1450)",
}


def render_markdown(run: Run, plots: dict[int, str] | None = None) -> str:
    lines = [
        "# Tencrypt benchmark",
        "",
        f"Date: {run.date}. Machine: {run.cores} cores{', ' + run.machine if run.machine else ''}.",
        "",
    ]
    if run.settings:
        lines += [f"Settings: {run.settings}.", ""]
    if run.versions:
        lines += ["Versions: " + "; ".join(f"{k} {v}" for k, v in run.versions.items()) + ".", ""]
    lines += [
        "In parentheses: the ratio to the same figure of vanilla, of the Debian wireguard-go "
        "(wg) and of the current wireguard-go given with --peer-binary (wg-current), measured "
        "in the same run on the same lab, and for latencies also the difference to vanilla. "
        "The CSV gives the three ratios for every figure, and every latency's difference to "
        "vanilla (added_vs_vanilla).",
        "",
    ]
    for note in run.notes:
        lines.append(f"- {note}")
    if run.notes:
        lines.append("")
    if run.skipped:
        lines += ["## Systems not measured", "", *(f"- {text}" for text in run.skipped), ""]
    from bench import idlerow, targets  # they import this module

    lines += targets.render(run)
    for nodes in sorted({m.nodes for m in run.measurements if m.nodes > 0}):
        lines += [f"## {SHAPE_TITLES.get(nodes, f'{nodes} nodes')}", ""]
        lines += render_tcp(run, nodes)
        if plots and nodes in plots:
            lines += [f"![TCP throughput, {shape_name(nodes)}]({plots[nodes]})", ""]
        if run.dual:
            lines += render_tcp(run, nodes, 6) + render_families(run, nodes)
        lines += render_udp(run, nodes) + render_cpu(run, nodes) + render_latency(run, nodes)
        lines += render_sparse(run, nodes)
        lines += render_dns(run, nodes) + render_memory(run, nodes)
    lines += idlerow.render(run)
    if run.errors:
        lines += ["## Failures", "", *(f"- {e}" for e in run.errors), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- files ---------------------------------------------------------------------------------


def write_all(run: Run, out: Path, prefix: str) -> list[Path]:
    """``<prefix>.csv``, ``<prefix>.md`` and the plots in ``out``. Returns the paths."""
    from bench.plots import write_plots  # it imports this module, and matplotlib

    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(run, out, prefix)
    paths = [out / f"{prefix}.csv", out / f"{prefix}.md", *(out / p for p in plots.values())]
    paths[0].write_text(render_csv(run))
    paths[1].write_text(render_markdown(run, plots))
    return paths
