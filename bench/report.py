"""Benchmark results: one flat list of measurements, written as CSV, markdown and PNG plots.

Rules:
- A ``Measurement`` is one figure: (lab shape, system, test, client count, metric) -> value.
  Everything the harness measures is one, so the CSV is that list, one row each.
- Every figure is also given as a ratio to the same figure of ``vanilla`` and of
  ``wireguard-go`` measured in the same run on the same lab shape (``ratio``); a missing or zero
  baseline gives no ratio (empty cell, "–"), never a made-up one.
- Latency figures also get their difference to vanilla (``added``): what the tunnel adds.
- Rendering is pure (``render_*`` return text); only ``write_*`` touch files, and matplotlib
  is imported inside ``write_plots`` so that the pure parts need nothing beyond the stdlib.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

VANILLA, TENCRYPT, WIREGUARD, OPENVPN = "vanilla", "tencrypt", "wireguard-go", "openvpn"
SYSTEMS = [VANILLA, TENCRYPT, WIREGUARD, OPENVPN]  # table order
BASELINES = (VANILLA, WIREGUARD)
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
]
# Targets from the issue (judged on the benchmark's figures, never by a timed test).
TARGET_TCP_RATIO = 2.0  # Tencrypt throughput / each peer tunnel's, single stream and 10 clients
TARGET_ADDED_RTT_MS = 0.5  # at idle, one node
TARGET_RSS_MB = 100.0  # under the largest client count
FLAT_MB = 5.0  # "flat": the soak's last window may exceed its first by at most this (or 5 %)


@dataclass(slots=True, frozen=True)
class Measurement:
    nodes: int
    system: str
    test: str  # tcp, udp, ping, rr, memory, soak
    clients: int
    metric: str
    value: float
    unit: str

    @property
    def key(self) -> tuple[int, str, int, str]:
        return (self.nodes, self.test, self.clients, self.metric)


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

    def add(
        self, nodes: int, system: str, test: str, clients: int, metric: str, value: float, unit: str
    ) -> None:
        self.measurements.append(Measurement(nodes, system, test, clients, metric, value, unit))

    def get(self, nodes: int, system: str, test: str, clients: int, metric: str) -> float | None:
        m = find(self, nodes, system, test, clients, metric)
        return m.value if m else None


# --- ratios --------------------------------------------------------------------------------


def ratio(m: Measurement, measurements: Iterable[Measurement], baseline: str) -> float | None:
    """``m``'s value over the same figure of ``baseline`` in the same run, if there is one."""
    for other in measurements:
        if other.system == baseline and other.key == m.key:
            return m.value / other.value if other.value else None
    return None


def added(m: Measurement, measurements: Iterable[Measurement]) -> float | None:
    """``m``'s value minus vanilla's (what a tunnel adds to a latency)."""
    for other in measurements:
        if other.system == VANILLA and other.key == m.key:
            return m.value - other.value
    return None


def with_ratios(run: Run) -> list[dict[str, object]]:
    """The CSV rows: every measurement with its ratio to each baseline."""
    rows = []
    for m in run.measurements:
        row: dict[str, object] = {
            "nodes": m.nodes,
            "system": m.system,
            "test": m.test,
            "clients": m.clients,
            "metric": m.metric,
            "value": f"{m.value:.6g}",
            "unit": m.unit,
        }
        for base, column in zip(BASELINES, CSV_FIELDS[-2:], strict=True):
            r = ratio(m, run.measurements, base)
            row[column] = "" if r is None else f"{r:.4g}"
        rows.append(row)
    return rows


def render_csv(run: Run) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
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


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.3g}×"


def cell(run: Run, m: Measurement | None, *, ratios: bool = True, delta: bool = False) -> str:
    """A figure with its ratio to vanilla and to wireguard-go (or vanilla's difference)."""
    if m is None:
        return "–"
    text = fmt(m.value)
    extra = []
    if delta and m.system != VANILLA:
        d = added(m, run.measurements)
        if d is not None:
            extra.append(f"{d:+.3g} vs vanilla")
    if ratios:
        for base, label in ((VANILLA, "vanilla"), (WIREGUARD, "wg")):
            r = ratio(m, run.measurements, base) if m.system != base else None
            if r is not None:
                extra.append(f"{fmt_ratio(r)} {label}")
    return f"{text} ({', '.join(extra)})" if extra else text


def find(
    run: Run, nodes: int, system: str, test: str, clients: int, metric: str
) -> Measurement | None:
    for m in run.measurements:
        if (m.nodes, m.system, m.test, m.clients, m.metric) == (
            nodes,
            system,
            test,
            clients,
            metric,
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


def render_tcp(run: Run, nodes: int) -> list[str]:
    counts = sorted({m.clients for m in run.measurements if m.nodes == nodes and m.test == "tcp"})
    if not counts:
        return []
    header = ["System", *(f"{n} client{'s' if n > 1 else ''}" for n in counts)]
    rows = [
        [s, *(cell(run, find(run, nodes, s, "tcp", n, "throughput")) for n in counts)]
        for s in systems_of(run, nodes)
    ]
    detail = [
        [
            s,
            *(
                f"{fmt(run.get(nodes, s, 'tcp', n, 'retransmits'))} / "
                f"{fmt(run.get(nodes, s, 'tcp', n, 'udp_rcvbuf_errors'))}"
                for n in counts
            ),
        ]
        for s in systems_of(run, nodes)
    ]
    return [
        "### TCP throughput, Gbit/s (iperf3 -P N, received)",
        "",
        *table(header, rows),
        "TCP retransmits / UDP datagrams dropped on a full receive buffer (both pods) during "
        "the same runs:",
        "",
        *table(header, detail),
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
    ]
    return [
        "### Round trip at idle (ping; 1-byte TCP request/response, one connection)",
        "",
        *table(header, rows),
    ]


def render_memory(run: Run, nodes: int) -> list[str]:
    rows = []
    for s in systems_of(run, nodes):
        peak = find(run, nodes, s, "memory", 0, "peak_mb")
        if peak is None:
            continue
        rows.append(
            [
                s,
                fmt(run.get(nodes, s, "memory", 0, "idle_mb")),
                cell(run, peak),
                *(fmt(run.get(nodes, s, "soak", 0, k)) for k in ("first_mb", "last_mb", "seconds")),
            ]
        )
    if not rows:
        return []
    header = [
        "System",
        "RSS before load MB",
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


def target_lines(run: Run) -> list[str]:
    """The issue's targets, each with the figures that judge it."""
    lines = []
    for nodes in sorted({m.nodes for m in run.measurements}):
        for clients in (1, 10):
            tenc = find(run, nodes, TENCRYPT, "tcp", clients, "throughput")
            for peer in (WIREGUARD, OPENVPN):
                other = find(run, nodes, peer, "tcp", clients, "throughput")
                if tenc and other and other.value:
                    r = tenc.value / other.value
                    lines.append(
                        _verdict(
                            r >= TARGET_TCP_RATIO,
                            f"{_shape(nodes)}, TCP {clients} client(s): Tencrypt "
                            f"{fmt(tenc.value)} vs {peer} {fmt(other.value)} Gbit/s"
                            f" = {r:.2f}× (target ≥ {TARGET_TCP_RATIO:g}×)",
                        )
                    )
    for test, metric, unit, scale in (
        ("ping", "p50_ms", "ms", 1.0),
        ("rr", "p50_us", "µs", 1000.0),
    ):
        m = find(run, 1, TENCRYPT, test, 1, metric)
        d = added(m, run.measurements) if m else None
        if d is not None:
            what = "ping median" if test == "ping" else "TCP request/response median"
            lines.append(
                _verdict(
                    d / scale < TARGET_ADDED_RTT_MS,
                    f"1 node, added round trip at idle ({what}): {d:+.3g} {unit} "
                    f"(target < {TARGET_ADDED_RTT_MS:g} ms)",
                )
            )
    for nodes in sorted({m.nodes for m in run.measurements}):
        peak = find(run, nodes, TENCRYPT, "memory", 0, "peak_mb")
        if peak:
            lines.append(
                _verdict(
                    peak.value < TARGET_RSS_MB,
                    f"{_shape(nodes)}, proxy peak RSS under load: "
                    f"{peak.value:.1f} MB (target < {TARGET_RSS_MB:g} MB)",
                )
            )
        first = find(run, nodes, TENCRYPT, "soak", 0, "first_mb")
        last = find(run, nodes, TENCRYPT, "soak", 0, "last_mb")
        secs = find(run, nodes, TENCRYPT, "soak", 0, "seconds")
        if first and last and secs:
            flat = last.value <= first.value + max(FLAT_MB, 0.05 * first.value)
            lines.append(
                _verdict(
                    flat,
                    f"{_shape(nodes)}, proxy RSS over a {secs.value:.0f} s "
                    f"soak: {first.value:.1f} -> {last.value:.1f} MB (flat: "
                    f"growth ≤ {FLAT_MB:g} MB or 5 %)",
                )
            )
    return lines


def _verdict(ok: bool, text: str) -> str:
    return f"- {'met' if ok else '**not met**'}: {text}"


def _shape(nodes: int) -> str:
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
        "In parentheses: the ratio to the same figure of vanilla and of wireguard-go (wg) "
        "measured in the same run on the same lab, and for latencies also the difference "
        "to vanilla. The CSV gives both ratios for every figure.",
        "",
    ]
    for note in run.notes:
        lines.append(f"- {note}")
    if run.notes:
        lines.append("")
    targets = target_lines(run)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    for nodes in sorted({m.nodes for m in run.measurements}):
        lines += [f"## {SHAPE_TITLES.get(nodes, f'{nodes} nodes')}", ""]
        lines += render_tcp(run, nodes)
        if plots and nodes in plots:
            lines += [f"![TCP throughput, {_shape(nodes)}]({plots[nodes]})", ""]
        lines += render_udp(run, nodes) + render_latency(run, nodes) + render_memory(run, nodes)
    if run.errors:
        lines += ["## Failures", "", *(f"- {e}" for e in run.errors), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- files ---------------------------------------------------------------------------------


def plot_name(prefix: str, nodes: int) -> str:
    return f"{prefix}-tcp-{nodes}node{'s' if nodes > 1 else ''}.png"


def write_plots(run: Run, out: Path, prefix: str) -> dict[int, str]:
    """One PNG per lab shape: TCP throughput per client count, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = {}
    for nodes in sorted({m.nodes for m in run.measurements if m.test == "tcp"}):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for system in systems_of(run, nodes):
            points = sorted(
                (m.clients, m.value)
                for m in run.measurements
                if (m.nodes, m.system, m.test, m.metric) == (nodes, system, "tcp", "throughput")
                and m.value > 0
            )
            if points:
                ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=system)
        ax.set_xscale("log")
        ax.set_yscale("log")
        counts = sorted(
            {m.clients for m in run.measurements if m.nodes == nodes and m.test == "tcp"}
        )
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_xlabel("parallel TCP clients (iperf3 -P)")
        ax.set_ylabel("throughput, Gbit/s (log scale)")
        ax.set_title(f"TCP throughput, {_shape(nodes)} — {run.date}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = plot_name(prefix, nodes)
        fig.savefig(out / name)
        plt.close(fig)
        written[nodes] = name
    return written


def write_all(run: Run, out: Path, prefix: str) -> list[Path]:
    """``<prefix>.csv``, ``<prefix>.md`` and the plots in ``out``. Returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(run, out, prefix)
    paths = [out / f"{prefix}.csv", out / f"{prefix}.md", *(out / p for p in plots.values())]
    paths[0].write_text(render_csv(run))
    paths[1].write_text(render_markdown(run, plots))
    return paths
