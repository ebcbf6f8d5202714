"""The benchmark's pure parts: ratios, tables, CSV, the parsers of tool output, the plan.

No namespaces, no tools: figures are made up here, output texts are the tools' real formats
(iperf3 3.12 JSON trimmed to the fields read, iputils ping, /proc/net/snmp).
"""

from __future__ import annotations

import argparse
import csv
import io
import json

import pytest

from bench import harness, measure, report
from bench.report import OPENVPN, TENCRYPT, VANILLA, WIREGUARD, Measurement, Run
from tencrypt.errors import UsageError


def sample_run() -> Run:
    run = Run(date="2026-01-02 03:04 UTC", cores=2, machine="Test CPU, Linux 6.1")
    for system, gbps in ((VANILLA, 20.0), (WIREGUARD, 0.5), (OPENVPN, 0.4), (TENCRYPT, 1.5)):
        run.add(1, system, "tcp", 1, "throughput", gbps, "Gbit/s")
        run.add(1, system, "tcp", 10, "throughput", gbps * 2, "Gbit/s")
    for system, ms in ((VANILLA, 0.05), (WIREGUARD, 0.30), (TENCRYPT, 0.25)):
        run.add(1, system, "ping", 1, "p50_ms", ms, "ms")
    run.add(1, VANILLA, "rr", 1, "p50_us", 30.0, "µs")
    run.add(1, TENCRYPT, "rr", 1, "p50_us", 700.0, "µs")
    run.add(1, TENCRYPT, "memory", 0, "peak_mb", 48.0, "MB")
    run.add(1, TENCRYPT, "soak", 0, "first_mb", 40.0, "MB")
    run.add(1, TENCRYPT, "soak", 0, "last_mb", 60.0, "MB")
    run.add(1, TENCRYPT, "soak", 0, "seconds", 60.0, "s")
    run.add(2, TENCRYPT, "tcp", 1, "throughput", 1.0, "Gbit/s")  # no 2-node baseline measured
    return run


# --- ratios --------------------------------------------------------------------------------


def test_ratio_is_against_the_same_figure_of_the_baseline() -> None:
    run = sample_run()
    tenc10 = report.find(run, 1, TENCRYPT, "tcp", 10, "throughput")
    assert tenc10 is not None
    assert report.ratio(tenc10, run.measurements, VANILLA) == pytest.approx(3.0 / 40.0)
    assert report.ratio(tenc10, run.measurements, WIREGUARD) == pytest.approx(3.0)


def test_ratio_without_a_baseline_is_none_not_a_guess() -> None:
    run = sample_run()
    two_nodes = report.find(run, 2, TENCRYPT, "tcp", 1, "throughput")
    assert two_nodes is not None
    assert report.ratio(two_nodes, run.measurements, VANILLA) is None
    zero = Measurement(1, VANILLA, "udp", 1, "throughput", 0.0, "Gbit/s")
    other = Measurement(1, TENCRYPT, "udp", 1, "throughput", 0.2, "Gbit/s")
    assert report.ratio(other, [zero, other], VANILLA) is None


def test_added_latency_is_the_difference_to_vanilla() -> None:
    run = sample_run()
    ping = report.find(run, 1, TENCRYPT, "ping", 1, "p50_ms")
    assert ping is not None
    assert report.added(ping, run.measurements) == pytest.approx(0.20)


def test_csv_has_a_row_per_measurement_with_both_ratios() -> None:
    run = sample_run()
    rows = list(csv.DictReader(io.StringIO(report.render_csv(run))))
    assert len(rows) == len(run.measurements)
    assert list(rows[0]) == report.CSV_FIELDS
    tenc = next(
        r
        for r in rows
        if r["system"] == TENCRYPT
        and r["test"] == "tcp"
        and r["clients"] == "1"
        and r["nodes"] == "1"
    )
    assert float(tenc["value"]) == 1.5
    assert float(tenc["vs_vanilla"]) == pytest.approx(0.075)
    assert float(tenc["vs_wireguard_go"]) == pytest.approx(3.0)
    lonely = next(r for r in rows if r["nodes"] == "2")
    assert lonely["vs_vanilla"] == "" and lonely["vs_wireguard_go"] == ""


# --- markdown ------------------------------------------------------------------------------


def table_rows(markdown: str, title: str) -> dict[str, list[str]]:
    """The rows of the first table after heading ``title``, by their first cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("###") and title in line)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_tcp_table_has_a_row_per_system_and_a_column_per_client_count() -> None:
    md = report.render_markdown(sample_run())
    rows = table_rows(md, "TCP throughput")
    assert rows["System"] == ["1 client", "10 clients"]
    assert set(rows) == {"System", VANILLA, TENCRYPT, WIREGUARD, OPENVPN}
    assert rows[TENCRYPT][0] == "1.5 (0.075× vanilla, 3× wg)"
    assert rows[VANILLA][0] == "20 (40× wg)"  # no ratio of a baseline to itself
    assert rows[WIREGUARD][1] == "1 (0.025× vanilla)"


def test_latency_table_gives_what_a_tunnel_adds_and_the_ratios() -> None:
    rows = table_rows(report.render_markdown(sample_run()), "Round trip")
    assert rows[TENCRYPT][0] == "0.25 (+0.2 vs vanilla, 5× vanilla, 0.833× wg)"
    assert rows[TENCRYPT][4] == "700 (+670 vs vanilla, 23.3× vanilla)"
    assert rows[VANILLA][0] == "0.05 (0.167× wg)"
    assert OPENVPN not in rows  # nothing measured, no row


def test_markdown_states_date_cores_and_has_the_targets_section() -> None:
    md = report.render_markdown(sample_run(), plots={1: "latest-tcp-1node.png"})
    assert "Date: 2026-01-02 03:04 UTC. Machine: 2 cores, Test CPU, Linux 6.1." in md
    assert "![TCP throughput, 1 node](latest-tcp-1node.png)" in md
    assert "## Targets (issue 26, and issue 16's memory, soak and DNS)" in md
    # every comparison is with the current wireguard-go: not measured without --peer-binary
    assert "- *not measured*: 1 node, TCP 1 client vs the current wireguard-go: no " in md
    assert "- **not met**: 1 node, proxy RSS over a 60 s soak: 40.0 -> 60.0 MB" in md
    assert md.index("## Targets") < md.index("## One node")
    assert "## Two nodes" in md


def test_failures_are_listed() -> None:
    run = sample_run()
    run.errors.append("1 node, openvpn, UDP: iperf3: the server is busy")
    assert (
        "## Failures\n\n- 1 node, openvpn, UDP: iperf3: the server is busy"
        in report.render_markdown(run)
    )


def test_fmt_keeps_three_significant_digits() -> None:
    assert [report.fmt(v) for v in (None, 0.0, 0.061234, 16.49, 24858.2)] == [
        "–",
        "0",
        "0.0612",
        "16.5",
        "24858",
    ]


# --- parsers -------------------------------------------------------------------------------

TCP_JSON = {
    "end": {
        "sum_sent": {"bytes": 1730936832, "bits_per_second": 6923338851.0, "retransmits": 6},
        "sum_received": {"bytes": 1729495040, "bits_per_second": 6895473335.0},
    }
}
UDP_JSON = {
    "end": {
        "sum": {
            "bytes": 54721200,
            "bits_per_second": 218577043.5,
            "lost_packets": 11624,
            "packets": 45601,
            "lost_percent": 25.49,
            "jitter_ms": 0.113,
        },
        "sum_sent": {
            "bytes": 54721200,
            "bits_per_second": 218577043.5,
            "lost_packets": 0,
            "packets": 45601,
            "lost_percent": 0,
            "jitter_ms": 0,
        },
        "sum_received": {
            "bytes": 40772400,
            "bits_per_second": 162833219.1,
            "lost_packets": 11624,
            "packets": 45601,
            "lost_percent": 25.49,
            "jitter_ms": 0.113,
        },
    }
}


def test_parse_iperf_tcp_reads_what_the_server_received() -> None:
    r = measure.parse_iperf(json.dumps(TCP_JSON))
    assert r.gbps == pytest.approx(6.895, abs=1e-3)
    assert r.mbytes == pytest.approx(1729.495, abs=1e-3)
    assert r.retransmits == 6 and r.lost == 0


def test_parse_iperf_udp_reads_loss_at_the_server() -> None:
    r = measure.parse_iperf(json.dumps(UDP_JSON))
    assert r.gbps == pytest.approx(0.1628, abs=1e-4)
    assert r.sent_gbps == pytest.approx(0.2186, abs=1e-4)
    assert (r.lost, r.packets, r.lost_pct, r.jitter_ms) == (11624, 45601, 25.49, 0.113)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"error": "unable to connect to server: Connection refused"}', "Connection refused"),
        ("", "no JSON"),
        ('{"end": {}}', "sum_received"),
    ],
)
def test_parse_iperf_refuses_a_failed_run(text: str, message: str) -> None:
    with pytest.raises(measure.MeasureError, match=message):
        measure.parse_iperf(text)


PING_OUT = """PING 10.201.0.2 (10.201.0.2) 56(84) bytes of data.
64 bytes from 10.201.0.2: icmp_seq=1 ttl=64 time=0.900 ms
64 bytes from 10.201.0.2: icmp_seq=2 ttl=64 time=0.300 ms
64 bytes from 10.201.0.2: icmp_seq=3 ttl=64 time=4.20 ms

--- 10.201.0.2 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 108ms
rtt min/avg/max/mdev = 0.300/1.800/4.200/1.700 ms
"""


def test_parse_ping_takes_the_summary_and_the_median_reply() -> None:
    p = measure.parse_ping(PING_OUT)
    assert (p.sent, p.received, p.min_ms, p.avg_ms, p.max_ms, p.mdev_ms, p.p50_ms) == (
        3,
        3,
        0.3,
        1.8,
        4.2,
        1.7,
        0.9,
    )


def test_parse_ping_without_replies_is_an_error() -> None:
    text = "--- x ping statistics ---\n5 packets transmitted, 0 received, 100% packet loss\n"
    with pytest.raises(measure.MeasureError, match="no reply"):
        measure.parse_ping(text)


def test_parse_rr_and_snmp_and_status() -> None:
    rr = measure.parse_rr(
        'noise\n{"transactions": 500, "seconds": 0.25, "p50_us": 480.5, "p99_us": 900}\n'
    )
    assert (rr.transactions, rr.rate, rr.p50_us) == (500, 2000.0, 480.5)
    snmp = (
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "Udp: 260 0 7 261 56735 0\n"
    )
    assert measure.parse_snmp_counter(snmp, "Udp", "RcvbufErrors") == 56735
    assert measure.parse_snmp_counter(snmp, "Tcp", "RcvbufErrors") == 0
    status = "Name:\tpython3\nVmHWM:\t   49664 kB\nVmRSS:\t   48000 kB\n"
    assert measure.parse_status_kb(status, "VmHWM") == 49664
    assert measure.parse_status_kb(status, "VmSwap") is None


def test_window_max_looks_only_inside_the_window() -> None:
    samples = [(0.0, 40.0), (5.0, 41.0), (50.0, 45.0), (59.5, 44.0)]
    assert measure.window_max(samples, 0, 10) == 41.0
    assert measure.window_max(samples, 50, 61) == 45.0
    assert measure.window_max(samples, 20, 30) == 0.0


# --- the plan ------------------------------------------------------------------------------


def args(**kw: object) -> argparse.Namespace:
    base = {
        "quick": False,
        "systems": "vanilla,tencrypt,wireguard-go,openvpn",
        "clients": "1,5,10,20",
        "nodes": "1,2",
        "duration": 10.0,
        "udp_rate": "1G",
        "out": "bench/results",
        "name": "tbench",
    }
    return argparse.Namespace(**{**base, **kw})


def test_full_plan_runs_every_system_in_a_fixed_order_with_a_soak() -> None:
    plan = harness.build_plan(args(systems="tencrypt,openvpn,vanilla"))
    assert plan.systems == [VANILLA, OPENVPN, TENCRYPT]  # peers before Tencrypt patches pods
    assert (plan.clients, plan.nodes, plan.soak_seconds, plan.prefix) == (
        [1, 5, 10, 20],
        [1, 2],
        60.0,
        "latest",
    )
    # per system: set-up, latency, 4 TCP, UDP; Tencrypt's soak on the first shape only
    assert len(harness.estimates(plan)) == 2 * 3 * 7 + 1


def test_quick_plan_is_short_and_keeps_the_full_results() -> None:
    plan = harness.build_plan(args(quick=True))
    assert (plan.clients, plan.nodes, plan.duration, plan.soak_seconds, plan.prefix) == (
        [1, 10],
        [1],
        3.0,
        0.0,
        "quick",
    )
    assert sum(harness.estimates(plan)) < 120  # nominal seconds of the measured steps
    assert harness.build_plan(args(quick=True, clients="5")).clients == [5]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"systems": "vanilla,ipsec"}, "ipsec"),
        ({"clients": "1,x"}, "--clients"),
        ({"clients": "0"}, "positive"),
        ({"nodes": "3"}, "--nodes"),
        ({"duration": 0.0}, "--duration"),
        ({"udp_rate": "fast"}, "--udp-rate"),
    ],
)
def test_bad_arguments_are_usage_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        harness.build_plan(args(**kw))


def test_write_all_writes_csv_markdown_and_a_png_per_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = report.write_all(sample_run(), tmp_path, "latest")
    assert [p.name for p in paths] == [
        "latest.csv",
        "latest.md",
        "latest-tcp-1node.png",
        "latest-tcp-2nodes.png",
    ]
    for png in paths[2:]:
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "![TCP throughput, 2 nodes (VXLAN)](latest-tcp-2nodes.png)" in paths[1].read_text()


def fake_binary(tmp_path, name: str, first_line: str):
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\necho '{first_line}'\necho\necho 'Userspace WireGuard daemon'\n")
    path.chmod(0o755)
    return str(path)


def test_peer_binaries_are_extra_systems_labelled_with_their_version(tmp_path) -> None:
    wg = fake_binary(tmp_path, "wireguard-go", "wireguard-go v0.0.20250522")
    plan = harness.build_plan(args(peer_binary=[f"wireguard-go={wg}"]))
    label = "wireguard-go v0.0.20250522"
    assert plan.systems == [VANILLA, WIREGUARD, OPENVPN, label, TENCRYPT]
    assert plan.binaries == {label: (WIREGUARD, wg)}
    # and two latency rounds per shape of vanilla, the current wireguard-go and Tencrypt
    assert len(harness.estimates(plan)) == 2 * 5 * 7 + 1 + 2 * 2 * 3
    other = fake_binary(tmp_path, "wg2", "wireguard-go v0.0.20250522")
    plan = harness.build_plan(
        args(systems="tencrypt", peer_binary=[f"wireguard-go={wg}", f"wireguard-go={other}"])
    )
    assert plan.systems == [label, f"{label} ({other})", TENCRYPT]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("wireguard-go", "SYSTEM=PATH"),
        ("ipsec=/bin/true", "SYSTEM=PATH"),
        ("wireguard-go=/nonexistent/wg", "not an executable"),
    ],
)
def test_bad_peer_binaries_are_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        harness.build_plan(args(peer_binary=[spec]))


def test_the_latency_table_shows_the_tunnels_cpu_per_request_response() -> None:
    """A proxy that polls for replies trades CPU for latency: the table shows both."""
    run = sample_run()
    run.add(1, TENCRYPT, "rr", 1, "cpu_us_per_rr", 123.4, "µs")
    lines = report.render_latency(run, 1)
    assert "tunnel CPU µs per req/resp (both ends)" in lines[2]
    tenc = next(line for line in lines if line.startswith(f"| {TENCRYPT}"))
    vanilla = next(line for line in lines if line.startswith(f"| {VANILLA}"))
    cpu = lines[2].strip("| ").split(" | ").index("tunnel CPU µs per req/resp (both ends)")
    assert tenc.strip("| ").split(" | ")[cpu] == "123"
    assert vanilla.strip("| ").split(" | ")[cpu] == "–"


def test_the_latency_table_shows_the_added_time_to_a_new_connections_first_byte() -> None:
    run = sample_run()
    run.add(1, VANILLA, "crr", 1, "p50_us", 200.0, "µs")
    run.add(1, TENCRYPT, "crr", 1, "p50_us", 260.0, "µs")
    lines = report.render_latency(run, 1)
    header = lines[2].strip("| ").split(" | ")
    column = header.index("new connection to first byte, median µs")
    tenc = next(line for line in lines if line.startswith(f"| {TENCRYPT}"))
    assert tenc.strip("| ").split(" | ")[column].startswith("260")
    assert "+60" in tenc.strip("| ").split(" | ")[column]
