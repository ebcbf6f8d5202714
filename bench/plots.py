"""The benchmark's PNG plots: TCP throughput per client count, one line per system, per lab
shape; a dual-stack run adds each system's IPv6 figures as a dashed line of the same colour.
matplotlib is imported when a plot is drawn, never at import time."""

from __future__ import annotations

from pathlib import Path

from bench.report import Run, shape_name, systems_of, tcp_counts


def plot_name(prefix: str, nodes: int) -> str:
    return f"{prefix}-tcp-{nodes}node{'s' if nodes > 1 else ''}.png"


def write_plots(run: Run, out: Path, prefix: str) -> dict[int, str]:
    """One PNG per lab shape: TCP throughput per client count, one line per system (and per
    system over IPv6, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = {}
    for nodes in sorted({m.nodes for m in run.measurements if m.test == "tcp"}):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for system in systems_of(run, nodes):
            points = _points(run, nodes, system, 4)
            if points:
                (line,) = ax.plot(
                    [c for c, _ in points], [v for _, v in points], marker="o", label=system
                )
                points6 = _points(run, nodes, system, 6)
                if points6:
                    ax.plot(
                        [c for c, _ in points6],
                        [v for _, v in points6],
                        marker="s",
                        linestyle="--",
                        color=line.get_color(),
                        label=f"{system} (IPv6)",
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        counts = tcp_counts(run, nodes)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_xlabel("parallel TCP clients (iperf3 -P)")
        ax.set_ylabel("throughput, Gbit/s (log scale)")
        ax.set_title(f"TCP throughput, {shape_name(nodes)} — {run.date}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = plot_name(prefix, nodes)
        fig.savefig(out / name)
        plt.close(fig)
        written[nodes] = name
    return written


def _points(run: Run, nodes: int, system: str, family: int) -> list[tuple[int, float]]:
    return sorted(
        (m.clients, m.value)
        for m in run.measurements
        if (m.nodes, m.system, m.test, m.metric, m.family)
        == (nodes, system, "tcp", "throughput", family)
        and m.value > 0
    )
