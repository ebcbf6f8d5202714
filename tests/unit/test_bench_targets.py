"""The benchmark's judgement of issue 26's targets (and issue 16's kept), CPU per Gbit/s and DNS
figures.

Pure: made-up figures in a ``Run``, real ``/proc/<pid>/stat`` and DNS message formats; no
namespaces, no tools.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from bench import cpustat, dnsprobe, harness, measure, report, targets
from bench.progress import Progress
from bench.report import TENCRYPT, VANILLA, WIREGUARD, Run
from bench.targets import MET, NOT_MEASURED, NOT_MET

CURRENT = "wireguard-go v0.0.20250522"


def issue_run(*, current: bool = True) -> Run:
    """One node, figures shaped like the issue's table (the current wireguard-go when asked)."""
    run = Run(date="2026-11-26 10:05 UTC", cores=2)
    if current:
        run.peer_labels = {CURRENT: WIREGUARD}
    tcp = {VANILLA: (14.0, 20.0), WIREGUARD: (0.3, 0.4), CURRENT: (1.67, 2.0), TENCRYPT: (2.6, 2.9)}
    for system, (one, ten) in tcp.items():
        run.add(1, system, "tcp", 1, "throughput", one, "Gbit/s")
        run.add(1, system, "tcp", 10, "throughput", ten, "Gbit/s")
    for system, rr_us, ping_ms in (
        (VANILLA, 44.0, 0.05),
        (WIREGUARD, 251.0, 0.30),
        (CURRENT, 231.0, 0.20),
        (TENCRYPT, 478.0, 0.15),
    ):
        run.add(1, system, "rr", 1, "p50_us", rr_us, "µs")
        run.add(1, system, "ping", 1, "p50_ms", ping_ms, "ms")
    run.add(1, TENCRYPT, "memory", 0, "ready_mb", 33.25, "MB")
    run.add(1, TENCRYPT, "tcp", 10, "hwm_mb", 58.0, "MB")
    run.add(1, TENCRYPT, "tcp", 20, "hwm_mb", 61.5, "MB")
    run.add(1, TENCRYPT, "dns", 1, "p50_us", 40.0, "µs")
    run.add(1, TENCRYPT, "dns_direct", 1, "p50_us", 59.0, "µs")
    return run


def by_text(run: Run, start: str) -> targets.Verdict:
    found = [v for v in targets.judge(run) if v.text.startswith(start)]
    assert len(found) == 1, [v.text for v in targets.judge(run)]
    return found[0]


# --- targets -------------------------------------------------------------------------------


def test_tcp_is_judged_against_the_current_wireguard_go_only() -> None:
    run = issue_run()
    single = [v for v in targets.judge(run) if v.text.startswith("1 node, TCP 1 client:")]
    assert [v.status for v in single] == [MET]
    assert single[0].text == (
        f"1 node, TCP 1 client: Tencrypt 2.6 vs {CURRENT} 1.67 Gbit/s = 1.56× (target ≥ 1.5×)"
    )
    ten = [v for v in targets.judge(run) if v.text.startswith("1 node, TCP 10 clients:")]
    assert [v.status for v in ten] == [NOT_MET]  # 2.9 / 2.0 = 1.45 < 1.5
    assert "= 1.45× (target ≥ 1.5×)" in ten[0].text
    assert not any("Debian" in v.text for v in targets.judge(run))  # issue 16's ≥ 5×: gone


def test_without_the_current_wireguard_go_its_targets_are_not_measured() -> None:
    run = issue_run(current=False)
    for start in (
        "1 node, TCP 1 client vs the current wireguard-go",
        "1 node, TCP 10 clients vs the current wireguard-go",
        "1 node, CPU per Gbit/s, TCP 1 client (both ends) vs the current wireguard-go",
        "1 node, UDP loss at 1 Gbit/s offered vs the current wireguard-go",
        "1 node, added sparse request/response median vs the current wireguard-go",
        "1 node, added TCP request/response median vs the current wireguard-go",
        "1 node, added ping median vs the current wireguard-go",
    ):
        v = by_text(run, start)
        assert v.status == NOT_MEASURED
        assert v.text.endswith(targets.NO_CURRENT)
        assert v.line().startswith("- *not measured*: ")
    # the absolute bounds are still judged
    assert by_text(run, "1 node, proxy RSS when ready").status == MET


def test_a_current_wireguard_go_that_failed_is_not_measured_either() -> None:
    run = issue_run()
    run.measurements = [
        m for m in run.measurements if not (m.system == CURRENT and m.test == "tcp")
    ]
    v = by_text(run, f"1 node, TCP 1 client vs {CURRENT}")
    assert (v.status, v.text.split(": ", 1)[1]) == (
        NOT_MEASURED,
        f"no figure for {TENCRYPT} / {CURRENT}",
    )


def test_added_latency_is_judged_against_what_the_current_wireguard_go_adds() -> None:
    run = issue_run()
    rr = by_text(run, "1 node, added TCP request/response median")
    assert rr.status == NOT_MET
    assert rr.text == (
        f"1 node, added TCP request/response median over vanilla (44 µs): Tencrypt +434 µs vs "
        f"{CURRENT} +187 µs = 2.32× (target ≤ 1×: no more than it adds)"
    )
    ping = by_text(run, "1 node, added ping median")
    assert ping.status == MET  # +0.10 ms against +0.15 ms
    assert "Tencrypt +0.1 ms vs" in ping.text and "+0.15 ms = 0.67×" in ping.text


def test_memory_targets_are_bounds_with_their_ratio() -> None:
    run = issue_run()
    ready = by_text(run, "1 node, proxy RSS when ready")
    assert ready.status == MET
    assert ready.text.endswith(": 33.2 MB = 0.95× the target (≤ 35 MB)")
    peak = by_text(run, "1 node, proxy peak RSS (VmHWM) after the 20-client TCP run")
    assert peak.status == NOT_MET
    assert peak.text.endswith(": 61.5 MB = 1.02× the target (≤ 60 MB)")


def test_peak_memory_without_a_20_client_run_is_not_measured_but_says_what_was_seen() -> None:
    run = issue_run()
    run.measurements = [m for m in run.measurements if m.clients != 20]
    peak = by_text(run, "1 node, proxy peak RSS (VmHWM)")
    assert peak.status == NOT_MEASURED
    assert peak.text.endswith("no 20-client run (after the 10-client run: 58.0 MB)")


def test_dns_target_compares_the_proxy_with_the_cluster_dns_of_the_same_stage() -> None:
    run = issue_run()
    dns = by_text(run, "1 node, DNS median lookup")
    assert dns.status == MET
    assert "through the proxy 40 µs vs straight to the cluster DNS 59 µs = 0.68×" in dns.text
    run.add(1, VANILLA, "dns_direct", 1, "p50_us", 10.0, "µs")  # another stage: not used
    assert by_text(run, "1 node, DNS median lookup").status == MET
    run.measurements = [m for m in run.measurements if m.test != "dns"]
    assert by_text(run, "1 node, DNS median lookup").status == NOT_MEASURED


def test_a_shape_not_in_the_run_is_not_measured_and_counted() -> None:
    run = issue_run()
    two = [v for v in targets.judge(run) if v.text.startswith("2 nodes (VXLAN)")]
    assert len(two) == 11  # 2 TCP, 2 CPU, 1 UDP, 3 latency, 2 memory, 1 DNS (a soak if measured)
    assert {v.status for v in two} == {NOT_MEASURED}
    assert all(v.text.endswith(": this lab shape is not in the run") for v in two)
    lines = targets.render(run)
    statuses = [v.status for v in targets.judge(run)]
    assert lines[2].startswith(
        f"{statuses.count(MET)} met, {statuses.count(NOT_MET)} not met, "
        f"{statuses.count(NOT_MEASURED)} not measured. The current wireguard-go: `{CURRENT}`"
    )
    # met: TCP ×1, ping, RSS when ready, DNS; not met: TCP ×10, back-to-back RR, peak RSS
    assert (statuses.count(MET), statuses.count(NOT_MET)) == (4, 3)


def test_markdown_has_the_targets_before_the_tables_and_reads_as_a_list() -> None:
    md = report.render_markdown(issue_run())
    section = md[md.index("## Targets") : md.index("## One node")]
    items = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(items) == len(targets.judge(issue_run()))
    assert all(
        line.startswith(("- met: ", "- **not met**: ", "- *not measured*: ", "- reported: "))
        for line in items
    )


def test_cells_and_csv_carry_the_ratio_to_the_current_wireguard_go() -> None:
    run = issue_run()
    tenc = report.find(run, 1, TENCRYPT, "tcp", 1, "throughput")
    assert tenc is not None
    assert report.cell(run, tenc) == "2.6 (0.186× vanilla, 8.67× wg, 1.56× wg-current)"
    rows = report.with_ratios(run)
    row = next(r for r in rows if (r["system"], r["test"], r["clients"]) == (TENCRYPT, "tcp", 1))
    assert row["vs_current_wireguard_go"] == "1.557"
    assert report.with_ratios(issue_run(current=False))[0]["vs_current_wireguard_go"] == ""


# --- CPU per Gbit/s ------------------------------------------------------------------------


def stat_line(pid: int, comm: str, utime: int, stime: int) -> str:
    """A /proc/<pid>/stat line: utime and stime are fields 14 and 15 (proc(5))."""
    after = ["S", "1", str(pid), str(pid), "0", "-1", "4194560", "100", "0", "0", "0"]
    return f"{pid} ({comm}) {' '.join(after)} {utime} {stime} 0 0 20 0 3 0 12345 0\n"


def test_parse_stat_ticks_adds_utime_and_stime_even_with_a_tricky_name() -> None:
    assert cpustat.parse_stat_ticks(stat_line(7, "wireguard-go", 120, 30)) == 150
    assert cpustat.parse_stat_ticks(stat_line(7, "x) S 1 2 (y", 5, 6)) == 11


def snap(ticks: dict[int, int], ends: dict[int, str], at: float) -> cpustat.Snapshot:
    return cpustat.Snapshot(ticks, ends, at)


def test_cpu_seconds_per_end_from_two_snapshots() -> None:
    client, server = cpustat.CLIENT_END, cpustat.SERVER_END
    before = snap({10: 100, 20: 50, 40: 500}, {10: client, 20: server, 40: server}, 0.0)
    # 30 started during the run, 40 ended: neither is counted
    after = snap({10: 350, 20: 150, 30: 999}, {10: client, 20: server, 30: client}, 5.0)
    assert cpustat.seconds_used(before, after, clk_tck=100) == {client: 2.5, server: 1.0}
    assert cpustat.cores_per_gbps(3.5, 5.0) == pytest.approx(0.7)
    assert cpustat.cores_per_gbps(3.5, 0.0) is None


def plan_args() -> argparse.Namespace:
    return argparse.Namespace(
        quick=True,
        systems="vanilla,tencrypt",
        clients="1",
        nodes="1",
        duration=5.0,
        udp_rate="1G",
        out="/nonexistent",
        name="t",
    )


def test_the_harness_records_cores_per_gbps_per_end_and_summed(tmp_path: Path) -> None:
    run = Run(date="d", cores=2)
    bench = harness.Bench(harness.build_plan(plan_args()), run, Progress([]), tmp_path)
    before = snap({10: 100, 20: 50}, {10: "client", 20: "server"}, 0.0)
    after = snap({10: 350, 20: 150}, {10: "client", 20: "server"}, 5.0)
    tck = cpustat.os.sysconf("SC_CLK_TCK")
    result = measure.Iperf(gbps=1.0, mbytes=625.0)  # 5 gigabits
    bench.cpu((1, TENCRYPT, "tcp", 1), before, after, result)
    got = {m.metric: m.value for m in run.measurements}
    assert got["cpu_s_client"] == pytest.approx(250 / tck)
    assert got["cpu_s_both"] == pytest.approx(350 / tck)
    assert got["cpu_per_gbps_client"] == pytest.approx(250 / tck / 5.0)
    assert got["cpu_per_gbps_server"] == pytest.approx(100 / tck / 5.0)
    assert got["cpu_per_gbps_both"] == pytest.approx(350 / tck / 5.0)
    assert got["cpu_cores"] == pytest.approx(350 / tck / 5.0)  # over the 5 s between snapshots
    rows = {
        r[0]: r[1:]
        for r in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in report.render_cpu(run, 1)
            if line.startswith("| ")
        )
    }
    assert rows["System"] == ["TCP, 1 client"]
    assert rows[TENCRYPT] == [
        f"{report.fmt(350 / tck / 5)} ({report.fmt(250 / tck / 5, 2)} + "
        f"{report.fmt(100 / tck / 5, 2)}; {report.fmt(350 / tck / 5, 2)} cores busy)"
    ]


# --- DNS -----------------------------------------------------------------------------------


def probe_entry(times_ns: list[int], failed: int = 0, server: str = "127.0.0.1") -> object:
    return {
        "server": server,
        "lookups": len(times_ns),
        "failed": failed,
        "seconds": 0.5,
        "times_ns": times_ns,
    }


def probe_output(*entries: object) -> str:
    return "noise\n" + json.dumps(list(entries))


def test_parse_dns_takes_the_median_and_p99_of_each_servers_answered_lookups() -> None:
    [d] = measure.parse_dns(probe_output(probe_entry([300_000, 100_000, 200_000, 400_000], 2)))
    assert (d.server, d.lookups, d.failed) == ("127.0.0.1", 4, 2)
    assert (d.p50_us, d.p99_us, d.rate) == (300.0, 400.0, 8.0)  # upper middle of an even count
    direct, proxy = measure.parse_dns(
        probe_output(
            probe_entry([i * 1000 for i in range(1, 201)], server="172.30.0.10"),
            probe_entry([5000, 7000, 6000], failed=1),
        )
    )
    assert (direct.server, direct.p50_us, direct.p99_us) == ("172.30.0.10", 101.0, 199.0)
    assert (proxy.server, proxy.lookups, proxy.failed, proxy.p50_us) == ("127.0.0.1", 3, 1, 6.0)
    with pytest.raises(measure.MeasureError, match="no lookup through 127.0.0.1"):
        measure.parse_dns(probe_output(probe_entry([100_000]), probe_entry([], failed=3)))
    with pytest.raises(measure.MeasureError, match="no server"):
        measure.parse_dns("[]")
    for text in ("Traceback ...", json.dumps(probe_entry([1000]))):  # no list: no result
        with pytest.raises(measure.MeasureError, match="no result"):
            measure.parse_dns(text)


def test_probe_query_is_a_standard_a_query_with_its_id() -> None:
    query = DNSRecord.parse(dnsprobe.build_query("nginx2.myproject.svc.cluster.local.", 0xBEEF))
    assert (query.header.id, query.header.rd, query.header.qr) == (0xBEEF, 1, 0)
    assert str(query.q.qname) == "nginx2.myproject.svc.cluster.local."
    assert (query.q.qtype, len(query.questions)) == (QTYPE.A, 1)


def test_probe_counts_only_the_answer_to_its_own_query() -> None:
    query = DNSRecord.parse(dnsprobe.build_query("nginx2.myproject.svc.cluster.local", 77))
    answer = query.reply()
    answer.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("172.30.0.12"), ttl=30))
    assert dnsprobe.answer_status(answer.pack(), 77) == "ok"
    assert dnsprobe.answer_status(answer.pack(), 78) == "other"  # a late answer: ignored
    assert dnsprobe.answer_status(query.pack(), 77) == "other"  # not an answer (QR clear)
    assert dnsprobe.answer_status(b"\x00\x4d", 77) == "other"  # runt
    empty = query.reply()
    assert dnsprobe.answer_status(empty.pack(), 77) == "failed"  # NOERROR without a record
    nx = query.reply()
    nx.header.rcode = RCODE.NXDOMAIN
    assert dnsprobe.answer_status(nx.pack(), 77) == "failed"
    assert struct.unpack("!H", dnsprobe.build_query("a", 5)[:2]) == (5,)


def test_probe_reads_the_first_nameserver_of_resolv_conf() -> None:
    text = "# tencrypt: was 172.30.0.2\nnameserver 127.0.0.1\nsearch a.svc\nnameserver 9.9.9.9\n"
    assert dnsprobe.resolver(text) == "127.0.0.1"
    with pytest.raises(SystemExit):
        dnsprobe.resolver("search a\n")


def test_cpu_per_gbps_is_bounded_at_half_the_current_wireguard_gos() -> None:
    run = issue_run()
    run.add(1, TENCRYPT, "tcp", 1, "cpu_per_gbps_both", 0.45, "cores/(Gbit/s)")
    run.add(1, CURRENT, "tcp", 1, "cpu_per_gbps_both", 0.6, "cores/(Gbit/s)")
    run.add(1, TENCRYPT, "tcp", 10, "cpu_per_gbps_both", 0.25, "cores/(Gbit/s)")
    run.add(1, CURRENT, "tcp", 10, "cpu_per_gbps_both", 0.5, "cores/(Gbit/s)")
    one = by_text(run, "1 node, CPU per Gbit/s, TCP 1 client")
    assert (one.status, one.line()) == (
        NOT_MET,
        f"- **not met**: 1 node, CPU per Gbit/s, TCP 1 client (both ends): Tencrypt 0.45 vs "
        f"{CURRENT} 0.6 cores per Gbit/s = 0.75× (target ≤ 0.5×)",
    )
    ten = by_text(run, "1 node, CPU per Gbit/s, TCP 10 clients")
    assert ten.status == MET and "= 0.50× (target ≤ 0.5×)" in ten.text  # the bound itself
    run.measurements = [m for m in run.measurements if (m.system, m.clients) != (CURRENT, 10)]
    gone = by_text(run, "1 node, CPU per Gbit/s, TCP 10 clients")
    assert gone.status == NOT_MEASURED and gone.text.endswith(
        f"no figure for {TENCRYPT} / {CURRENT}"
    )
