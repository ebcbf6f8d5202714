"""The sparse request/response row (issue 26): one 1-byte TCP request every 20 ms on one
connection, parsed from bench/coldpath.py's client, recorded by the harness, rendered with what
each system adds over vanilla, and judged against what the current wireguard-go adds.

Pure: made-up stamps and figures, no namespaces, no tools.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import coldpath, cpustat, harness, measure, report, targets
from bench.attach import Target
from bench.progress import Progress
from bench.report import TENCRYPT, VANILLA, WIREGUARD, Run
from bench.targets import MET, NOT_MEASURED, NOT_MET

CURRENT = "wireguard-go v0.0.20250522"


def client_output(round_trips_us: list[float], noise: str = "") -> str:
    """What coldpath.CLIENT prints: [send, answer] ns stamps, one pair per request."""
    pairs, t = [], 1_000_000_000
    for us in round_trips_us:
        pairs.append([t, t + int(us * 1000)])
        t += 20_000_000
    return noise + json.dumps(pairs) + "\n"


# --- parsing -------------------------------------------------------------------------------


def test_parse_sparse_leaves_out_the_warm_up_requests_and_takes_percentiles() -> None:
    warmup = [50_000.0] * coldpath.WARMUP  # a handshake: never counted
    counted = [float(100 + i) for i in range(100)]  # 100 .. 199 µs, shuffled below
    text = client_output(warmup + counted[::-1], noise="a warning\n")
    r = measure.parse_sparse(text, 0.02)
    assert (r.requests, r.sent, r.interval) == (100, 100 + coldpath.WARMUP, 0.02)
    assert (r.p50_us, r.p90_us, r.p99_us) == (150.0, 190.0, 199.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "printed no result"),
        ("Traceback (most recent call last):\n  ...\nOSError: boom\n", "printed no result"),
        (json.dumps({"p50_us": 1}), "printed no result"),  # the back-to-back client's shape
        (json.dumps([[1, 2, 3]] * (coldpath.WARMUP + 1)), "printed no result"),
        (client_output([100.0] * coldpath.WARMUP), "no request after the"),
        (client_output([100.0] * coldpath.WARMUP + [-5.0]), "before its request"),
    ],
)
def test_parse_sparse_refuses_output_without_figures(text: str, message: str) -> None:
    with pytest.raises(measure.MeasureError, match=message):
        measure.parse_sparse(text, 0.02)


# --- the harness ---------------------------------------------------------------------------


def plan_args(**kw: object) -> argparse.Namespace:
    base = {
        "quick": True,
        "systems": "vanilla,tencrypt",
        "clients": "1",
        "nodes": "1",
        "duration": 5.0,
        "udp_rate": "1G",
        "out": "/nonexistent",
        "name": "t",
    }
    return argparse.Namespace(**{**base, **kw})


def test_the_harness_records_the_sparse_figures_and_cpu_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run(date="d", cores=2)
    plan = harness.build_plan(plan_args())
    bench = harness.Bench(plan, run, Progress([]), tmp_path)
    asked = []

    def sparse_rr(ns: str, host: str, seconds: float, interval: float) -> measure.SparseRR:
        asked.append((ns, host, seconds, interval))
        return measure.SparseRR(140, 150, interval, 1300.0, 1450.0, 3000.0)

    snapshots = iter(
        [
            cpustat.Snapshot({10: 100, 20: 50}, {10: "client", 20: "server"}, 0.0),
            cpustat.Snapshot({10: 130, 20: 80}, {10: "client", 20: "server"}, 3.0),
        ]
    )
    monkeypatch.setattr(measure, "sparse_rr", sparse_rr)
    monkeypatch.setattr(cpustat, "snapshot", lambda *a: next(snapshots))
    a = type("Pod", (), {"netns": "lab-nginx1"})()
    b = type("Pod", (), {"netns": "lab-nginx2"})()
    target = Target("172.30.0.12", "172.30.0.12", "tenc0", lambda: [10, 20])
    bench.sparse(1, TENCRYPT, a, b, target)  # type: ignore[arg-type]
    assert asked == [("lab-nginx1", "172.30.0.12", 3.0, 0.02)]  # --quick: 3 s every 20 ms
    got = {m.metric: (m.value, m.unit) for m in run.measurements}
    assert {(m.test, m.clients) for m in run.measurements} == {("sparse_rr", 1)}
    tck = cpustat.os.sysconf("SC_CLK_TCK")
    assert got == {
        "p50_us": (1300.0, "µs"),
        "p90_us": (1450.0, "µs"),
        "p99_us": (3000.0, "µs"),
        "requests": (140, "requests"),
        "interval_ms": (20.0, "ms"),
        # 60 ticks over all 150 requests sent (the warm-up ones used CPU too)
        "cpu_us_per_request": (pytest.approx(60 / tck / 150 * 1e6), "µs"),
    }


def test_vanilla_has_no_tunnel_cpu_to_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(date="d", cores=2)
    bench = harness.Bench(harness.build_plan(plan_args(quick=False)), run, Progress([]), tmp_path)
    monkeypatch.setattr(
        measure, "sparse_rr", lambda *a: measure.SparseRR(490, 500, 0.02, 160.0, 200.0, 300.0)
    )
    monkeypatch.setattr(cpustat, "snapshot", lambda *a: pytest.fail("no tunnel: no CPU"))
    pod = type("Pod", (), {"netns": "ns"})()
    bench.sparse(1, VANILLA, pod, pod, Target("172.30.0.12", "172.17.0.12", None, list))  # type: ignore[arg-type]
    assert "cpu_us_per_request" not in {m.metric for m in run.measurements}
    assert bench.plan.sparse_seconds == 10.0  # a full run: 500 requests


def test_the_plan_counts_the_sparse_row_in_each_systems_latency_step() -> None:
    quick = harness.build_plan(plan_args())
    full = harness.build_plan(plan_args(quick=False))
    step = {p.quick: harness.system_steps(p, TENCRYPT, True)[1] for p in (quick, full)}
    assert step[False] - step[True] > full.sparse_seconds - quick.sparse_seconds
    assert (
        "sparse request/response 3 s, one request every 20 ms" in harness.describe(quick).settings
    )


# --- report --------------------------------------------------------------------------------


def sparse_run(current: bool = True) -> Run:
    """Figures shaped like the issue's table (plain, Debian and current wireguard-go, Tencrypt)."""
    run = Run(date="d", cores=2, peer_labels={CURRENT: WIREGUARD} if current else {})
    for system, p50, p90 in (
        (VANILLA, 180.0, 200.0),
        (WIREGUARD, 760.0, 820.0),
        (CURRENT, 720.0, 800.0),
        (TENCRYPT, 1340.0, 1500.0),
    ):
        if system == CURRENT and not current:
            continue
        run.add(1, system, "sparse_rr", 1, "p50_us", p50, "µs")
        run.add(1, system, "sparse_rr", 1, "p90_us", p90, "µs")
        run.add(1, system, "sparse_rr", 1, "p99_us", p90 + 100, "µs")
        run.add(1, system, "sparse_rr", 1, "requests", 490, "requests")
        run.add(1, system, "sparse_rr", 1, "interval_ms", 20, "ms")
        if system != VANILLA:
            run.add(1, system, "sparse_rr", 1, "cpu_us_per_request", 50.0, "µs")
    return run


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    return {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in lines
            if line.startswith("| ")
        )
    }


def test_the_sparse_table_gives_each_system_what_it_adds_and_its_ratio_to_what_wg_adds() -> None:
    lines = report.render_sparse(sparse_run(), 1)
    assert lines[0] == (
        "### Sparse request/response (one 1-byte TCP request every 20 ms, one connection)"
    )
    rows = table_rows(lines)
    assert rows["System"][:4] == [
        "round trip median µs",
        "added over vanilla, median µs",
        "p90 µs",
        "added over vanilla, p90 µs",
    ]
    # +1160 over vanilla, against +580 (Debian) and +540 (current): 2.0× and 2.15×
    assert rows[TENCRYPT][1] == "+1160 (2× wg's, 2.15× wg-current's)"
    assert rows[TENCRYPT][3] == "+1300 (2.1× wg's, 2.17× wg-current's)"
    assert rows[TENCRYPT][0] == "1340 (7.44× vanilla, 1.76× wg, 1.86× wg-current)"
    assert rows[CURRENT][1] == "+540 (0.931× wg's)"
    assert rows[VANILLA][1] == "–"
    assert rows[TENCRYPT][5:] == ["490", "50"]
    assert rows[VANILLA][6] == "–"  # no tunnel, no tunnel CPU


def test_the_markdown_has_the_sparse_table_after_the_back_to_back_one() -> None:
    run = sparse_run()
    run.add(1, VANILLA, "rr", 1, "rate", 10000.0, "1/s")
    md = report.render_markdown(run)
    assert md.index("### Round trip at idle") < md.index("### Sparse request/response")
    assert report.render_sparse(Run(date="d", cores=2), 1) == []


def test_the_csv_gives_latencies_their_difference_to_vanilla() -> None:
    run = sparse_run()
    run.add(1, VANILLA, "rr", 1, "rate", 10000.0, "1/s")
    run.add(1, TENCRYPT, "rr", 1, "rate", 5000.0, "1/s")
    rows = list(csv.DictReader(io.StringIO(report.render_csv(run))))
    assert list(rows[0])[-1] == "added_vs_vanilla"

    def row(system: str, test: str, metric: str) -> dict[str, str]:
        return next(
            r for r in rows if (r["system"], r["test"], r["metric"]) == (system, test, metric)
        )

    tenc = row(TENCRYPT, "sparse_rr", "p50_us")
    assert (tenc["added_vs_vanilla"], tenc["vs_current_wireguard_go"]) == ("1160", "1.861")
    assert row(TENCRYPT, "sparse_rr", "p90_us")["added_vs_vanilla"] == "1300"
    assert row(VANILLA, "sparse_rr", "p50_us")["added_vs_vanilla"] == ""  # itself
    # not latencies: counts, settings, CPU and rates get no difference
    for metric in ("requests", "interval_ms", "cpu_us_per_request"):
        assert row(TENCRYPT, "sparse_rr", metric)["added_vs_vanilla"] == ""
    assert row(TENCRYPT, "rr", "rate")["added_vs_vanilla"] == ""


def test_added_ratio_needs_both_figures_and_a_baseline_that_adds_something() -> None:
    run = sparse_run()
    tenc = report.find(run, 1, TENCRYPT, "sparse_rr", 1, "p50_us")
    assert tenc is not None
    assert report.added_ratio(tenc, run.measurements, CURRENT) == pytest.approx(1160 / 540)
    assert report.added_ratio(tenc, run.measurements, "openvpn") is None  # not in the run
    run.add(1, "fast", "sparse_rr", 1, "p50_us", 150.0, "µs")  # faster than vanilla
    assert report.added_ratio(tenc, run.measurements, "fast") is None
    assert report.fmt_delta(1160.4) == "+1160" and report.fmt_delta(-0.0412) == "-0.0412"


# --- targets -------------------------------------------------------------------------------


def by_text(run: Run, start: str) -> targets.Verdict:
    found = [v for v in targets.judge(run) if v.text.startswith(start)]
    assert len(found) == 1, [v.text for v in targets.judge(run)]
    return found[0]


def test_the_sparse_target_is_what_tencrypt_adds_against_what_the_current_wg_adds() -> None:
    run = sparse_run()
    v = by_text(run, "1 node, added sparse request/response median")
    assert (v.status, v.text) == (
        NOT_MET,
        f"1 node, added sparse request/response median over vanilla (180 µs): Tencrypt +1160 µs "
        f"vs {CURRENT} +540 µs = 2.15× (target ≤ 1×: no more than it adds)",
    )
    fast = sparse_run()
    fast.measurements = [
        m for m in fast.measurements if not (m.system == TENCRYPT and m.metric == "p50_us")
    ]
    fast.add(1, TENCRYPT, "sparse_rr", 1, "p50_us", 700.0, "µs")
    assert by_text(fast, "1 node, added sparse request/response median").status == MET
    alone = by_text(sparse_run(current=False), "1 node, added sparse request/response median")
    assert alone.status == NOT_MEASURED and alone.text.endswith(targets.NO_CURRENT)


def udp_run(offered: float = 1.0, ours: float = 40.0, theirs: float = 45.5) -> Run:
    run = Run(date="d", cores=2, peer_labels={CURRENT: WIREGUARD})
    for system, loss in ((TENCRYPT, ours), (CURRENT, theirs), (WIREGUARD, 90.0)):
        run.add(1, system, "udp", 1, "offered", offered, "Gbit/s")
        run.add(1, system, "udp", 1, "loss_pct", loss, "%")
    return run


def test_udp_loss_at_one_gbit_is_judged_against_the_current_wireguard_go() -> None:
    v = by_text(udp_run(), "1 node, UDP loss at 1 Gbit/s offered")
    assert (v.status, v.text) == (
        MET,
        f"1 node, UDP loss at 1 Gbit/s offered: Tencrypt lost 40 % vs {CURRENT} 45.5 % = 0.88× "
        "(target ≤ 1×)",
    )
    assert by_text(udp_run(ours=46.0), "1 node, UDP loss").status == NOT_MET
    nothing_lost = by_text(udp_run(ours=0.0, theirs=0.0), "1 node, UDP loss")
    assert nothing_lost.status == MET and "= – (target" in nothing_lost.text
    other_rate = by_text(udp_run(offered=0.5), "1 node, UDP loss")
    assert other_rate.status == NOT_MEASURED
    assert "this run offered 0.5 Gbit/s (--udp-rate)" in other_rate.text


def test_sparse_rr_runs_coldpaths_client_in_the_client_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = []

    def run(ns: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        runs.append((ns, argv, kw))
        out = client_output([200.0] * (coldpath.WARMUP + 5))
        return subprocess.CompletedProcess(argv, 0 if len(runs) == 1 else 1, out, "Traceback")

    monkeypatch.setattr(measure.netns, "run", run)
    r = measure.sparse_rr("lab-nginx1", "172.30.0.12", 3.0, 0.02)
    assert (r.requests, r.p50_us) == (5, 200.0)
    ns, argv, kw = runs[0]
    assert ns == "lab-nginx1" and argv[1:3] == ["-I", "-c"]
    assert argv[3] == coldpath.CLIENT  # the same program as python -m bench.coldpath
    assert argv[4:] == ["172.30.0.12", str(measure.RR_PORT), "3", "0.02"]
    assert kw == {"check": False, "timeout": 3.0 + measure.SLACK}
    with pytest.raises(measure.MeasureError, match=r"client failed \(1\): Traceback"):
        measure.sparse_rr("lab-nginx1", "172.30.0.12", 3.0, 0.02)


# --- rounds (bench/plan.py --rounds, bench/targets.py rules 1 and 4) ------------------------


def with_rounds(run: Run, rounds: list[dict[str, float]], test: str = "sparse_rr") -> Run:
    metric, unit = ("p50_ms", "ms") if test == "ping" else ("p50_us", "µs")
    for r, figures in enumerate(rounds, start=1):
        for system, value in figures.items():
            run.add(1, system, f"{test}_round_{r}", 1, metric, value, unit)
    return run


def test_rounds_judge_the_sparse_target_on_the_median_of_every_round() -> None:
    # the main pass alone says not met (+1160 vs +540); two rounds with the systems
    # alternating say Tencrypt adds +320 and +300 against +540 and +530: the medians decide
    run = with_rounds(
        sparse_run(),
        [
            {VANILLA: 180.0, TENCRYPT: 500.0, CURRENT: 720.0},
            {VANILLA: 170.0, TENCRYPT: 470.0, CURRENT: 700.0},
            {VANILLA: 175.0, TENCRYPT: 400.0},  # the peer failed this round: left out
        ],
    )
    v = by_text(run, "1 node, added sparse request/response median")
    assert (v.status, v.text) == (
        MET,
        "1 node, added sparse request/response median over vanilla (median of 3 rounds, the "
        "systems alternating (+1160 vs +540, +320 vs +540, +300 vs +530 µs)): Tencrypt +320 µs "
        f"vs {CURRENT} +540 µs = 0.59× (target ≤ 1×: no more than it adds)",
    )
    # the other rows are not judged on rounds: back-to-back stays the main pass's
    run.add(1, VANILLA, "rr", 1, "p50_us", 60.0, "µs")
    run.add(1, TENCRYPT, "rr", 1, "p50_us", 80.0, "µs")
    run.add(1, CURRENT, "rr", 1, "p50_us", 70.0, "µs")
    rr = by_text(run, "1 node, added TCP request/response median")
    assert rr.status == NOT_MET and "rounds" not in rr.text


def test_the_rounds_of_a_test_are_its_own_in_round_order_with_every_system() -> None:
    run = Run(date="d", cores=2)
    for r in (10, 2, 1):
        run.add(1, TENCRYPT, f"sparse_rr_round_{r}", 1, "p50_us", 100.0 + r, "µs")
        run.add(1, VANILLA, f"sparse_rr_round_{r}", 1, "p50_us", float(r), "µs")
    run.add(1, TENCRYPT, "sparse_rr_round_x", 1, "p50_us", 1.0, "µs")  # not a round
    run.add(2, TENCRYPT, "sparse_rr_round_3", 1, "p50_us", 1.0, "µs")  # another shape
    run.add(1, TENCRYPT, "sparse_rr_round_4", 1, "p50_us", 104.0, "µs")  # vanilla missing
    both = (VANILLA, TENCRYPT)
    assert run.rounds(1, "sparse_rr", 1, "p50_us", both) == [(1, 101), (2, 102), (10, 110)]
    assert run.rounds(1, "rr", 1, "p50_us", both) == []  # not sparse_rr's
    assert run.rounds(1, "sparse_rr", 10, "p50_us", both) == []  # another client count


def test_rounds_judge_the_ping_target_too() -> None:
    run = Run(date="d", cores=2, peer_labels={CURRENT: WIREGUARD})
    for system, p50 in ((VANILLA, 0.05), (TENCRYPT, 0.60), (CURRENT, 0.45)):
        run.add(1, system, "ping", 1, "p50_ms", p50, "ms")
    assert by_text(run, "1 node, added ping median").status == NOT_MET
    with_rounds(
        run,
        [
            {VANILLA: 0.05, TENCRYPT: 0.40, CURRENT: 0.50},
            {VANILLA: 0.06, TENCRYPT: 0.41, CURRENT: 0.47},
        ],
        "ping",
    )
    v = by_text(run, "1 node, added ping median")
    assert v.status == MET and "median of 3 rounds" in v.text


def test_the_plan_runs_rounds_only_where_they_judge_a_target(tmp_path: Path) -> None:
    full = harness.build_plan(plan_args(quick=False))
    assert full.rounds == 2 and full.round_systems() == []  # no current wireguard-go
    assert harness.build_plan(plan_args()).rounds == 0  # --quick
    wg = tmp_path / "wireguard-go"
    wg.write_text("#!/bin/sh\necho 'wireguard-go v0.0.20250522'\n")
    wg.chmod(0o755)
    plan = harness.build_plan(
        plan_args(
            quick=False,
            systems="vanilla,wireguard-go,tencrypt",
            peer_binary=[f"wireguard-go={wg}"],
            rounds=3,
        )
    )
    assert plan.rounds == 3
    assert plan.round_systems() == [VANILLA, CURRENT, TENCRYPT]
    rounds = harness.round_steps(plan)
    assert len(rounds) == 3 * 3 and rounds[0] > plan.sparse_seconds
    with pytest.raises(harness.UsageError, match="--rounds"):
        harness.build_plan(plan_args(rounds=-1))


def test_a_round_records_the_systems_ping_sparse_and_tcp_figures_as_that_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    run = Run(date="d", cores=2)
    plan = harness.build_plan(plan_args(clients="1,5,10"))
    bench = harness.Bench(plan, run, Progress([]), tmp_path)
    attached = []

    @contextlib.contextmanager
    def attach(system, lab, a, b, binary):  # type: ignore[no-untyped-def]
        attached.append(system)
        yield Target("172.30.0.12", "172.17.0.12", None, list)
        attached.append(f"detached {system}")

    monkeypatch.setattr(harness, "attach", attach)
    monkeypatch.setattr(measure, "rr_server", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(measure, "wait_reachable", lambda *a: None)
    monkeypatch.setattr(measure, "ping", lambda *a: measure.Ping(20, 20, 0.3, 0.4, 0.9, 0.1, 0.38))
    monkeypatch.setattr(
        measure, "sparse_rr", lambda *a: measure.SparseRR(140, 150, 0.02, 410.0, 450.0, 600.0)
    )
    iperfs = []

    def iperf(*args, parallel):  # type: ignore[no-untyped-def]
        iperfs.append((args[2], args[3], parallel))
        return type("Iperf", (), {"gbps": 3.0 + parallel / 10, "mbytes": 1000.0})()

    monkeypatch.setattr(measure, "iperf", iperf)
    tck = os.sysconf("SC_CLK_TCK")
    ticks = iter(range(0, 100 * tck, 3 * tck))  # each run: 3 CPU-seconds at the client end

    def snapshot(pids, client_ns, server_ns):  # type: ignore[no-untyped-def]
        return cpustat.Snapshot({7: next(ticks)}, {7: cpustat.CLIENT_END}, 0.0)

    monkeypatch.setattr(cpustat, "snapshot", snapshot)
    lab = type("Lab", (), {"nodes": {"node1": None, "node2": None}})()
    pod = type("Pod", (), {"netns": "ns"})()
    bench.one_round(lab, TENCRYPT, pod, pod, 2)  # type: ignore[arg-type]
    assert attached == [TENCRYPT, f"detached {TENCRYPT}"]
    # the targets' client counts of the plan's (1, 10 of 1, 5, 10), --quick's 3 s runs
    assert iperfs == [("172.30.0.12", 3.0, 1), ("172.30.0.12", 3.0, 10)]
    shown = {"p50_ms", "p50_us", "throughput", "cpu_per_gbps_both"}
    assert {
        (m.nodes, m.test, m.clients, m.metric, m.value)
        for m in run.measurements
        if m.metric in shown
    } == {
        (2, "ping_round_2", 1, "p50_ms", 0.38),
        (2, "sparse_rr_round_2", 1, "p50_us", 410.0),
        (2, "tcp_round_2", 1, "throughput", 3.1),
        (2, "tcp_round_2", 10, "throughput", 4.0),
        # 3 CPU-seconds over the run for 1000 MB = 8 Gbit received
        (2, "tcp_round_2", 1, "cpu_per_gbps_both", 3 / 8),
        (2, "tcp_round_2", 10, "cpu_per_gbps_both", 3 / 8),
    }
    run.measurements.clear()
    bench.one_round(lab, VANILLA, pod, pod, 1)  # type: ignore[arg-type]
    assert len(iperfs) == 2  # no target reads vanilla's TCP: not run in a round
    assert {m.test for m in run.measurements} == {"ping_round_1", "sparse_rr_round_1"}


def tcp_run(metric: str, main: tuple[float, float], rounds: list[tuple[float, float]]) -> Run:
    """Tencrypt's and the current wireguard-go's ``metric`` at 1 TCP client, 1 node: the main
    pass's, then each round's (0: that system's run failed, the round is left out)."""
    run = Run(date="d", cores=2, peer_labels={CURRENT: WIREGUARD})
    for r, (ours, theirs) in enumerate([main, *rounds]):
        test = f"tcp_round_{r}" if r else "tcp"
        run.add(1, TENCRYPT, test, 1, metric, ours, "u")
        run.add(1, CURRENT, test, 1, metric, theirs, "u")
    return run


def test_rounds_judge_the_cpu_target_on_the_median_of_every_round() -> None:
    what, metric = "1 node, CPU per Gbit/s, TCP 1 client", "cpu_per_gbps_both"
    assert by_text(tcp_run(metric, (0.52, 1.0), []), what).status == NOT_MET  # 0.52x
    v = by_text(tcp_run(metric, (0.52, 1.0), [(0.48, 1.02), (0.47, 0.98), (0.40, 0.0)]), what)
    assert (v.status, v.text) == (
        MET,
        "1 node, CPU per Gbit/s, TCP 1 client (both ends) (median of 3 rounds, the systems "
        f"alternating: 0.52 vs 1, 0.48 vs 1.02, 0.47 vs 0.98): Tencrypt 0.48 vs {CURRENT} 1 "
        "cores per Gbit/s = 0.48× (target ≤ 0.5×)",
    )
    assert (
        by_text(tcp_run(metric, (0.52, 1.0), []), "1 node, CPU per Gbit/s, TCP 10 clients").status
        == NOT_MEASURED
    )


def test_rounds_judge_the_tcp_target_on_the_median_throughput_of_every_round() -> None:
    what = "1 node, TCP 1 client"
    assert by_text(tcp_run("throughput", (3.48, 2.73), []), what).status == NOT_MET  # 1.27x
    v = by_text(tcp_run("throughput", (3.48, 2.73), [(3.9, 2.5), (3.8, 2.4), (3.7, 0.0)]), what)
    assert (v.status, v.text) == (
        MET,
        "1 node, TCP 1 client (median of 3 rounds, the systems alternating: 3.48 vs 2.73, "
        f"3.9 vs 2.5, 3.8 vs 2.4 Gbit/s): Tencrypt 3.8 vs {CURRENT} 2.5 Gbit/s = 1.52× "
        "(target ≥ 1.5×)",
    )
