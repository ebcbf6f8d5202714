"""The benchmark's IPv6 run (``--ip-family dual``, issue 24): the plan, the CSV's family column,
the IPv6 tables and ratios, and issue 24's targets. Pure: made-up figures, no namespaces.

What must hold: an IPv4 run (the default) writes what it wrote before families existed; a
dual-stack run's figures of one family are compared with the same family only, and its report
adds the IPv6 table, each system's IPv6 / IPv4 ratios and issue 24's verdicts.
"""

from __future__ import annotations

import argparse
import csv
import io

import pytest

import bench.harness
from bench import harness, plan, report, targets
from bench.report import OPENVPN, TENCRYPT, VANILLA, WIREGUARD, Run
from bench.targets import MET, NOT_MEASURED, NOT_MET
from tencrypt import cli
from tencrypt.errors import UsageError

CURRENT = "wireguard-go v0.0.20250522"


def dual_run(*, dual: bool = True, current: bool = True) -> Run:
    """One node, TCP at 1 and 10 clients over both families (OpenVPN over IPv4 only)."""
    run = Run(date="2026-12-01 10:00 UTC", cores=2, ip_family="dual" if dual else "ipv4")
    if current:
        run.peer_labels = {CURRENT: WIREGUARD}
    v4 = {
        VANILLA: (14.0, 20.0),
        WIREGUARD: (0.3, 0.4),
        OPENVPN: (0.2, 0.3),
        CURRENT: (1.6, 2.0),
        TENCRYPT: (2.0, 3.0),
    }
    v6 = {VANILLA: (12.0, 18.0), WIREGUARD: (0.3, 0.4), CURRENT: (1.5, 2.0), TENCRYPT: (1.9, 2.4)}
    for family, figures in ((4, v4), (6, v6)):
        for system, (one, ten) in figures.items():
            run.add(1, system, "tcp", 1, "throughput", one, "Gbit/s", family)
            run.add(1, system, "tcp", 10, "throughput", ten, "Gbit/s", family)
            run.add(1, system, "tcp", 10, "retransmits", 7 * family, "segments", family)
    run.add(1, TENCRYPT, "tcp", 10, "hwm_mb", 50.0, "MB")
    run.add(1, TENCRYPT, "tcp", 10, "hwm_mb", 70.0, "MB", 6)  # IPv6 figures stay out of IPv4's
    run.add(1, TENCRYPT, "memory", 0, "peak_mb", 72.0, "MB")
    return run


def args(**kw: object) -> argparse.Namespace:
    base = {
        "quick": False,
        "systems": "vanilla,tencrypt,wireguard-go,openvpn",
        "clients": "1,10",
        "nodes": "1",
        "duration": 10.0,
        "udp_rate": "1G",
        "out": "bench/results",
        "name": "tbench",
    }
    return argparse.Namespace(**{**base, **kw})


# --- the plan ------------------------------------------------------------------------------


def test_an_ipv4_plan_is_as_before_and_a_dual_one_writes_ipv6_or_quick() -> None:
    four = harness.build_plan(args())
    assert (four.ip_family, four.prefix, four.dual) == ("ipv4", "latest", False)
    assert harness.build_plan(args(ip_family="ipv4")).prefix == "latest"
    dual = harness.build_plan(args(ip_family="dual"))
    assert (dual.ip_family, dual.prefix, dual.dual) == ("dual", "ipv6", True)
    assert harness.build_plan(args(ip_family="dual", quick=True)).prefix == "quick"


def test_every_system_with_an_ipv6_path_adds_its_client_counts_over_ipv6(tmp_path) -> None:  # type: ignore[no-untyped-def]
    wg = tmp_path / "wireguard-go"
    wg.write_text("#!/bin/sh\necho 'wireguard-go v0.0.20250522'\n")
    wg.chmod(0o755)
    ovpn = tmp_path / "openvpn"
    ovpn.write_text("#!/bin/sh\necho 'OpenVPN 2.6.14 x86_64'\n")
    ovpn.chmod(0o755)
    binaries = [f"wireguard-go={wg}", f"openvpn={ovpn}"]
    four = harness.build_plan(args(peer_binary=binaries))
    dual = harness.build_plan(args(peer_binary=binaries, ip_family="dual"))
    assert dual.systems == four.systems
    assert [s for s in dual.systems if dual.ipv6_runs(s)] == [VANILLA, WIREGUARD, CURRENT, TENCRYPT]
    assert not any(four.ipv6_runs(s) for s in four.systems)
    for system in dual.systems:  # two more TCP runs (1 and 10 clients) for each of those
        extra = 2 if dual.ipv6_runs(system) else 0
        assert len(plan.system_steps(dual, system, True)) == (
            len(plan.system_steps(four, system, True)) + extra
        )
    assert len(harness.estimates(dual)) == len(harness.estimates(four)) + 4 * 2


def test_an_unknown_ip_family_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--ip-family"):
        harness.build_plan(args(ip_family="ipv6"))


def test_the_cli_flag_reaches_the_plan(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(bench.harness, "main", lambda a: seen.append(a) or 0)
    assert cli.main(["bench", "--quick", "--ip-family", "dual", "--nodes", "1"]) == 0
    assert cli.main(["bench", "--quick"]) == 0
    dual, four = (harness.build_plan(a) for a in seen)
    assert (dual.ip_family, dual.prefix, four.ip_family) == ("dual", "quick", "ipv4")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--ip-family", "ipv6"])  # not benchmarked: argparse refuses it


# --- CSV -----------------------------------------------------------------------------------


def test_an_ipv4_runs_csv_has_no_family_column() -> None:
    run = dual_run(dual=False)
    run.measurements = [m for m in run.measurements if m.family == 4]
    text = report.render_csv(run)
    assert text.splitlines()[0] == ",".join(report.CSV_FIELDS)
    assert "family" not in text


def test_a_dual_runs_csv_gives_each_rows_family_and_ratios_within_it() -> None:
    rows = list(csv.DictReader(io.StringIO(report.render_csv(dual_run()))))
    assert list(rows[0])[:3] == ["nodes", "family", "system"]
    assert {r["family"] for r in rows} == {"4", "6"}

    def row(system: str, family: str) -> dict[str, str]:
        return next(
            r
            for r in rows
            if (r["system"], r["family"], r["clients"], r["metric"])
            == (system, family, "1", "throughput")
        )

    assert float(row(TENCRYPT, "6")["vs_vanilla"]) == pytest.approx(1.9 / 12.0, rel=1e-3)
    assert float(row(TENCRYPT, "6")["vs_current_wireguard_go"]) == pytest.approx(1.9 / 1.5, 1e-3)
    assert float(row(TENCRYPT, "4")["vs_current_wireguard_go"]) == pytest.approx(2.0 / 1.6, 1e-3)


# --- markdown ------------------------------------------------------------------------------


def table_after(markdown: str, title: str) -> dict[str, list[str]]:
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


def test_the_ipv4_table_shows_ipv4_figures_and_the_ipv6_table_ipv6_ones() -> None:
    md = report.render_markdown(dual_run())
    four = table_after(md, "TCP throughput, Gbit/s")
    assert four[TENCRYPT][0] == "2 (0.143× vanilla, 6.67× wg, 1.25× wg-current)"
    six = table_after(md, "TCP throughput over IPv6")
    assert six["System"] == ["1 client", "10 clients"]
    assert set(six) == {"System", VANILLA, TENCRYPT, WIREGUARD, CURRENT}  # no OpenVPN row
    assert six[TENCRYPT][0] == "1.9 (0.158× vanilla, 6.33× wg, 1.27× wg-current)"
    # the IPv6 detail table: retransmits of the IPv6 runs
    lines = md.splitlines()
    at = lines.index(next(line for line in lines if "TCP throughput over IPv6" in line))
    detail = next(i for i in range(at, len(lines)) if lines[i].startswith("TCP retransmits"))
    tenc = next(line for line in lines[detail:] if line.startswith(f"| {TENCRYPT} "))
    assert tenc.split("|")[3].strip() == "42 / –"
    # the memory table's VmHWM after the 10-client run is the IPv4 run's
    memory = table_after(md, "Memory of the tunnel processes")
    assert memory["System"][2] == "VmHWM after 10 clients MB"
    assert memory[TENCRYPT][2] == "50"


def test_each_system_gets_its_ipv6_over_ipv4_ratios() -> None:
    rows = table_after(report.render_markdown(dual_run()), "IPv6 / IPv4")
    assert rows["System"] == ["1 client", "10 clients"]
    assert rows[TENCRYPT] == ["0.95×", "0.8×"]
    assert rows[VANILLA] == ["0.857×", "0.9×"]
    assert OPENVPN not in rows  # no IPv6 figure, no ratio made up
    assert report.family_ratio(dual_run(), 1, OPENVPN, 1) is None


def test_an_ipv4_run_has_no_ipv6_table_and_no_ipv6_targets() -> None:
    run = dual_run(dual=False)
    run.measurements = [m for m in run.measurements if m.family == 4]
    md = report.render_markdown(run)
    assert "IPv6" not in md and "issue 24" not in md
    assert targets.judge_ipv6(run) == []


# --- issue 24's targets --------------------------------------------------------------------


def by_text(run: Run, start: str) -> targets.Verdict:
    found = [v for v in targets.judge_ipv6(run) if v.text.startswith(start)]
    assert len(found) == 1, [v.text for v in targets.judge_ipv6(run)]
    return found[0]


def test_tencrypt_over_ipv6_within_ten_percent_of_its_ipv4() -> None:
    run = dual_run()
    one = by_text(run, "1 node, TCP 1 client, Tencrypt over IPv6 vs over IPv4")
    assert one.status == MET
    assert one.text.endswith(": 1.9 vs 2 Gbit/s = 0.95× (target ≥ 0.9×: within 10 %)")
    ten = by_text(run, "1 node, TCP 10 clients, Tencrypt over IPv6")
    assert ten.status == NOT_MET and "= 0.80×" in ten.text
    run.add(1, TENCRYPT, "tcp", 5, "throughput", 9.0, "Gbit/s", 6)  # faster over IPv6: met
    assert targets.judge_family(run, 1, 5).status == NOT_MEASURED  # no IPv4 figure at 5
    run.add(1, TENCRYPT, "tcp", 5, "throughput", 3.0, "Gbit/s")
    assert targets.judge_family(run, 1, 5).status == MET


def test_tencrypt_over_ipv6_against_the_current_wireguard_go_over_ipv6() -> None:
    run = dual_run()
    one = by_text(run, f"1 node, TCP over IPv6 1 client: Tencrypt 1.9 vs {CURRENT}")
    assert one.status == NOT_MET
    assert one.text.endswith("1.5 Gbit/s = 1.27× (target ≥ 1.5×)")
    no_current = dual_run(current=False)
    v = by_text(no_current, "1 node, TCP over IPv6 1 client vs the current wireguard-go")
    assert (v.status, v.text.endswith(targets.NO_CURRENT)) == (NOT_MEASURED, True)


def test_missing_ipv6_figures_and_shapes_are_not_measured_never_met() -> None:
    run = dual_run()
    run.measurements = [m for m in run.measurements if not (m.family == 6 and m.system == TENCRYPT)]
    statuses = {v.status for v in targets.judge_ipv6(run)}
    assert statuses == {NOT_MEASURED}
    two = [v for v in targets.judge_ipv6(dual_run()) if v.text.startswith("2 nodes")]
    assert len(two) == 4 and all(v.text.endswith("this lab shape is not in the run") for v in two)


def test_the_markdown_has_an_issue_24_section_after_issue_26s() -> None:
    run = dual_run()
    md = report.render_markdown(run)
    assert md.index("## Targets (issue 26") < md.index("## Targets over IPv6 (issue 24)")
    assert md.index("## Targets over IPv6 (issue 24)") < md.index("## One node")
    section = md[md.index("## Targets over IPv6") : md.index("## One node")]
    verdicts = targets.judge_ipv6(run)
    statuses = [v.status for v in verdicts]
    assert (
        f"{statuses.count(MET)} met, {statuses.count(NOT_MET)} not met, "
        f"{statuses.count(NOT_MEASURED)} not measured. TCP over IPv6" in section
    )
    assert [line for line in section.splitlines() if line.startswith("- ")] == [
        v.line() for v in verdicts
    ]


def test_a_dual_runs_plot_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = report.write_all(dual_run(), tmp_path, "ipv6")
    assert [p.name for p in paths] == ["ipv6.csv", "ipv6.md", "ipv6-tcp-1node.png"]
    assert paths[2].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
