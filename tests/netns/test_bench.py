"""`tencrypt bench` end to end, small: a one-node lab, 1 s runs, one client count.

What must hold: the harness builds its own lab, measures vanilla and Tencrypt (and wireguard-go
when it is installed: the smoke test never installs packages), writes a CSV and a markdown
table with a row per system and non-zero throughputs, really sends the tunnelled systems'
traffic through their tunnel interface, reads CPU at both ends of each tunnel and memory when
ready, answers DNS lookups straight and (Tencrypt) through the proxy, and leaves no namespace,
process or control socket behind. No timing thresholds: only that figures exist and are
positive.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import harness
from tencrypt.lab.cluster import Lab
from tencrypt.linux import netns

WG_RUN = Path("/var/run/wireguard")


@pytest.fixture
def bench_name() -> Iterator[str]:
    name = f"b{netns.unique_suffix()}"
    wg_before = set(WG_RUN.glob("*")) if WG_RUN.is_dir() else set()
    yield name
    Lab(name).down()  # a safety net: the harness removes its lab itself (asserted below)
    for sock in (set(WG_RUN.glob("*")) if WG_RUN.is_dir() else set()) - wg_before:
        sock.unlink(missing_ok=True)


def test_bench_smoke(bench_name: str, tmp_path: Path) -> None:
    systems = ["vanilla", "tencrypt"]
    if shutil.which("wireguard-go") and shutil.which("wg"):
        systems.append("wireguard-go")
    wg_before = set(WG_RUN.glob("*")) if WG_RUN.is_dir() else set()
    args = argparse.Namespace(
        quick=False,
        systems=",".join(systems),
        clients="2",
        nodes="1",
        duration=1.0,
        udp_rate="50M",
        out=str(tmp_path),
        name=bench_name,
    )

    code = harness.main(args)

    markdown = (tmp_path / "latest.md").read_text()
    assert code == 0, markdown[markdown.find("## Failures") :]
    # the harness tore everything down itself
    assert not [ns for ns in netns.listed() if ns.startswith(f"{bench_name}-")]
    assert (set(WG_RUN.glob("*")) if WG_RUN.is_dir() else set()) == wg_before

    rows = list(csv.DictReader((tmp_path / "latest.csv").open()))
    value = {(r["system"], r["test"], r["clients"], r["metric"]): float(r["value"]) for r in rows}
    for system in systems:
        assert value[(system, "tcp", "2", "throughput")] > 0
        assert value[(system, "udp", "1", "throughput")] > 0
        assert value[(system, "ping", "1", "p50_ms")] > 0
        assert value[(system, "rr", "1", "rate")] > 0
    for system in systems[1:]:  # tunnelled: the bytes crossed the tunnel's interface
        assert (
            value[(system, "tcp", "2", "tunnel_mb")]
            >= 0.9 * value[(system, "tcp", "2", "received_mb")]
        )
        assert value[(system, "memory", "0", "peak_mb")] > 0
        assert value[(system, "memory", "0", "ready_mb")] > 0
        assert value[(system, "tcp", "2", "hwm_mb")] > 0
        # CPU was read at both ends of the tunnel, and per Gbit/s received
        assert value[(system, "tcp", "2", "cpu_s_client")] > 0
        assert value[(system, "tcp", "2", "cpu_s_server")] > 0
        assert value[(system, "tcp", "2", "cpu_per_gbps_both")] > 0
    # DNS: straight to the cluster DNS in both stages, through the proxy with Tencrypt
    for system, test in (
        ("vanilla", "dns_direct"),
        ("tencrypt", "dns_direct"),
        ("tencrypt", "dns"),
    ):
        assert value[(system, test, "1", "lookups")] > 0
        assert value[(system, test, "1", "failed")] == 0
        assert value[(system, test, "1", "p50_us")] > 0
    assert value[("tencrypt", "soak", "0", "seconds")] == 6.0
    assert value[("tencrypt", "soak", "0", "last_mb")] > 0
    # every figure of a non-vanilla system has its ratio to vanilla
    tenc = next(
        r
        for r in rows
        if (r["system"], r["test"], r["metric"]) == ("tencrypt", "tcp", "throughput")
    )
    assert float(tenc["vs_vanilla"]) == pytest.approx(
        value[("tencrypt", "tcp", "2", "throughput")]
        / value[("vanilla", "tcp", "2", "throughput")],
        rel=1e-3,
    )

    assert "## Targets (issue 26, and issue 16's memory, soak and DNS)" in markdown
    assert "### Sparse request/response (one 1-byte TCP request every 20 ms" in markdown
    for system in systems:  # the sparse row was measured for every system
        assert value[(system, "sparse_rr", "1", "p50_us")] > 0
    assert "### DNS: sequential lookups" in markdown
    assert "### CPU of the tunnel processes per Gbit/s" in markdown
    lines = markdown.splitlines()
    tcp = lines.index("### TCP throughput, Gbit/s (iperf3 -P N, received)")
    table = {}
    for line in lines[tcp + 4 :]:  # title, blank, header, separator
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = cells[1]
    assert set(table) == set(systems)
    assert all(float(cell.split()[0]) > 0 for cell in table.values())
    assert (tmp_path / "latest-tcp-1node.png").read_bytes().startswith(b"\x89PNG")
