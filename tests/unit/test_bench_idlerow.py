"""The idle proxies' row (issue 26: a node with 50 idle proxies): bench/idle.py's JSON read by
bench/idlerow.py, carried by the CSV, rendered in a section of its own, and judged (private
memory and RSS per proxy, idle CPU zero). ``tencrypt bench --idle-json PATH`` brings it in.

Pure: made-up files, no namespaces, no proxies.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest

from bench import harness, idlerow, measure, report, targets
from bench.report import TENCRYPT, Run
from bench.targets import MET, NOT_MEASURED, NOT_MET
from tencrypt import cli
from tencrypt.errors import UsageError


def idle_json(n: int = 50, **extra: object) -> str:
    """``n`` proxies as smaps_rollup names them (kB), each with 0 or 1 clock tick of CPU."""
    proxies = [
        {
            "pid": 1000 + i,
            "rss_kb": 33_000 + 10 * i,
            "pss_kb": 12_000,
            "private_clean_kb": 1_024,
            "private_dirty_kb": 6_144 + i,
            "cpu_ticks": i % 2,
        }
        for i in range(n)
    ]
    return json.dumps({"mode": "fork", "seconds": 30, "proxies": proxies, **extra})


def test_parse_idle_takes_medians_and_totals_per_proxy() -> None:
    row = idlerow.parse_idle(idle_json(parent={"private_mb": 20.0, "pss_mb": 25.0, "cpu_s": 0.0}))
    assert (row.proxies, row.seconds, row.mode) == (50, 30.0, "fork")
    assert row.rss_mb == pytest.approx((33_000 + 245) / 1024)  # median of an even count
    assert row.pss_mb == pytest.approx(12_000 / 1024)
    assert row.private_mb == pytest.approx((1_024 + 6_144 + 24.5) / 1024)
    assert row.total_private_mb == pytest.approx(sum(7_168 + i for i in range(50)) / 1024)
    # one tick of 10 ms over 30 s is 0.0333 % of a core; half the proxies used one
    assert row.cpu_pct_max == pytest.approx(100 * 0.01 / 30)
    assert row.total_cpu_pct == pytest.approx(25 * 100 * 0.01 / 30)
    assert row.cpu_pct == pytest.approx(100 * 0.005 / 30)
    assert row.paid_per_pod_mb == pytest.approx((row.total_private_mb + 20.0) / 50)
    assert row.pss_per_pod_mb == pytest.approx((row.total_pss_mb + 25.0) / 50)


def test_parse_idle_reads_bench_idle_py_s_own_file() -> None:
    """The shape bench/idle.py --json writes: proxies is the count, the records are per_proxy,
    the window idle_s, the warm parent zygote."""
    text = json.dumps(
        {
            "mode": "fork",
            "proxies": 2,
            "idle_s": 30.0,
            "python": "3.11.7",
            "load": [0.5, 0.4, 0.3],
            "per_proxy": [
                {"pid": 11, "cpu_s": 0.0, "rss_kb": 30720, "pss_kb": 10240, "private_kb": 6144},
                {"pid": 12, "cpu_s": 0.01, "rss_kb": 31744, "pss_kb": 11264, "private_kb": 7168},
            ],
            "median_private_by_mapping": {"[heap]": 4000},
            "zygote": {"rss_kb": 30720, "pss_kb": 20480, "private_kb": 10240, "cpu_s": 0.0},
            "stopped_by_sigterm": 2,
        }
    )
    row = idlerow.parse_idle(text)
    assert (row.proxies, row.seconds, row.mode) == (2, 30.0, "fork")
    assert (row.rss_mb, row.pss_mb, row.private_mb) == (30.5, 10.5, 6.5)
    assert (row.parent_private_mb, row.parent_pss_mb) == (10.0, 20.0)
    assert row.paid_per_pod_mb == (13.0 + 10.0) / 2
    assert row.pss_per_pod_mb == (21.0 + 20.0) / 2
    assert row.cpu_pct_max == pytest.approx(100 * 0.01 / 30)


def test_parse_idle_reads_the_other_units_and_cpu_in_seconds() -> None:
    text = json.dumps(
        {
            "seconds": 10,
            "per_proxy": [
                {"rss_mb": 30.0, "pss_bytes": 20 * 2**20, "private_kb": 8 * 1024, "cpu_s": 0.02}
            ],
        }
    )
    row = idlerow.parse_idle(text)
    assert (row.rss_mb, row.pss_mb, row.private_mb, row.mode) == (30.0, 20.0, 8.0, "")
    assert row.cpu_pct == pytest.approx(0.2) and row.parent_private_mb == 0.0
    assert row.paid_per_pod_mb == 8.0


@pytest.mark.parametrize(
    "data, message",
    [
        ("not json", "not JSON"),
        ([], "not an object"),
        ({"seconds": 30}, "no per-proxy records"),
        ({"seconds": 30, "proxies": []}, "no per-proxy records"),
        ({"seconds": 30, "proxies": 50}, "no per-proxy records"),
        ({"seconds": 30, "proxies": ["x"]}, "not an object"),
        ({"proxies": [{"rss_kb": 1}]}, "no idle window"),
        ({"seconds": 0, "proxies": [{"rss_kb": 1}]}, "no idle window"),
        ({"seconds": 30, "proxies": [{"pss_kb": 1, "private_kb": 1, "cpu_s": 0}]}, "no rss_kb"),
        ({"seconds": 30, "proxies": [{"rss_kb": 1, "pss_kb": 1, "cpu_s": 0}]}, "no private_kb"),
        ({"seconds": 30, "proxies": [{"rss_kb": 1, "pss_kb": 1, "private_kb": 1}]}, "no cpu_s"),
        (
            {"seconds": 30, "proxies": [{"rss_kb": -1, "pss_kb": 1, "private_kb": 1, "cpu_s": 0}]},
            "no rss_kb",
        ),
        (
            {"seconds": 30, "proxies": [{"rss_kb": True, "pss_kb": 1, "private_kb": 1}]},
            "no rss_kb",
        ),
    ],
)
def test_parse_idle_says_what_is_missing_never_makes_up_a_zero(data: object, message: str) -> None:
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(measure.MeasureError, match=message):
        idlerow.parse_idle(text)


def test_load_of_a_missing_file_is_a_measure_error(tmp_path: Path) -> None:
    with pytest.raises(measure.MeasureError, match="No such file"):
        idlerow.load(tmp_path / "idle.json")


def idle_run(text: str | None = None) -> Run:
    run = Run(date="d", cores=2)
    run.add(1, TENCRYPT, "memory", 0, "ready_mb", 33.0, "MB")
    idlerow.add_to(run, idlerow.parse_idle(text or idle_json()))
    return run


def test_the_row_joins_the_run_as_shape_0_and_the_csv_carries_it() -> None:
    run = idle_run()
    got = idlerow.of(run)
    assert got is not None and got["proxies"] == 50.0
    assert got["private_mb"] == pytest.approx((7_168 + 24.5) / 1024)
    assert idlerow.of(Run(date="d", cores=2)) is None
    rows = list(csv.DictReader(io.StringIO(report.render_csv(run))))
    idle = {r["metric"]: r for r in rows if r["test"] == "idle"}
    assert set(idle) == {metric for metric, _unit in idlerow.METRICS.values()}
    assert {(r["nodes"], r["system"], r["clients"]) for r in idle.values()} == {
        ("0", TENCRYPT, "50")
    }
    assert idle["total_cpu_pct"]["unit"] == "%"


def test_the_markdown_gives_the_row_its_own_section_not_a_lab_shape() -> None:
    md = report.render_markdown(idle_run())
    assert "## 50 idle proxies on one node (bench/idle.py, fork mode)" in md
    assert "## 0 nodes" not in md and md.count("## One node") == 1
    assert "| private (unshared) MB | 7.0 | 351.2 |" in md
    assert "| CPU, % of one core | 0.017 (largest 0.033) | 0.833 |" in md
    assert md.index("## One node") < md.index("idle proxies on one node")
    assert idlerow.render(Run(date="d", cores=2)) == []


def by_text(run: Run, start: str) -> targets.Verdict:
    found = [v for v in targets.judge(run) if v.text.startswith(start)]
    assert len(found) == 1, [v.text for v in targets.judge(run)]
    return found[0]


def test_the_idle_targets_private_memory_rss_and_zero_cpu() -> None:
    run = idle_run(idle_json(parent={"private_mb": 20.0, "pss_mb": 25.0, "cpu_s": 0.0}))
    private = by_text(run, "50 idle proxies, private (unshared) memory per proxy")
    assert private.status == MET
    assert private.text == (
        "50 idle proxies, private (unshared) memory per proxy (median): 7.0 MB = 0.70× the "
        "target (≤ 10 MB); what the node pays per pod, a warm parent's shared out: 7.4 MB"
    )
    assert by_text(run, "50 idle proxies, RSS per proxy").status == MET
    cpu = by_text(run, "50 idle proxies, CPU")
    assert cpu.status == MET
    assert cpu.text == (
        "50 idle proxies, CPU over 30 s: the busiest proxy 0.033 % of one core (all 50: "
        "0.833 %, their warm parent 0.000 %) = 1.00× the target (zero: ≤ 0.0333 % each)"
    )


def test_a_proxy_that_polls_at_idle_misses_the_zero_cpu_target() -> None:
    data = json.loads(idle_json())
    data["proxies"][7]["cpu_ticks"] = 300  # 3 s of 30: 10 % of a core
    data["proxies"][8]["private_dirty_kb"] = 40_000  # one large proxy: not the median
    run = idle_run(json.dumps(data))
    assert by_text(run, "50 idle proxies, CPU").status == NOT_MET
    assert by_text(run, "50 idle proxies, private").status == MET
    exec_mode = json.loads(idle_json())
    for p in exec_mode["proxies"]:
        p["private_dirty_kb"] = 16_000
    assert by_text(idle_run(json.dumps(exec_mode)), "50 idle proxies, private").status == NOT_MET


def test_without_the_idle_json_its_targets_are_not_measured() -> None:
    verdicts = [v for v in targets.judge(Run(date="d", cores=2)) if "idle proxies" in v.text]
    assert [v.status for v in verdicts] == [NOT_MEASURED] * 3
    assert all(v.text.endswith(targets.NO_IDLE) for v in verdicts)


# --- the flag ------------------------------------------------------------------------------


def bench_args(*argv: str) -> argparse.Namespace:
    return cli.parse_args(["bench", *argv])


def test_idle_json_flag_reaches_the_plan_and_must_name_a_file(tmp_path: Path) -> None:
    path = tmp_path / "idle.json"
    with pytest.raises(UsageError, match="--idle-json: .* is not a file"):
        harness.build_plan(bench_args("--idle-json", str(path)))
    path.write_text(idle_json())
    assert harness.build_plan(bench_args("--idle-json", str(path))).idle_json == path
    assert harness.build_plan(bench_args()).idle_json is None


def test_a_warm_parent_that_polls_misses_the_zero_cpu_target_too() -> None:
    quiet = {"private_mb": 20.0, "pss_mb": 25.0, "cpu_s": 0.0}
    assert by_text(idle_run(idle_json(zygote=quiet)), "50 idle proxies, CPU").status == MET
    busy = {**quiet, "cpu_s": 0.3}  # 1 % of a core over 30 s
    v = by_text(idle_run(idle_json(zygote=busy)), "50 idle proxies, CPU")
    assert v.status == NOT_MET
    assert "(all 50: 0.833 %, their warm parent 1.000 %) = 30.00× the target" in v.text


def test_the_harness_reads_the_file_at_the_end_and_a_bad_one_fails_the_run(tmp_path: Path) -> None:
    path = tmp_path / "idle.json"
    path.write_text(idle_json(3))
    plan = harness.build_plan(bench_args("--idle-json", str(path)))
    run = Run(date="d", cores=2)
    harness.idle_row(plan, run)
    assert idlerow.of(run) is not None and run.errors == []
    path.write_text(json.dumps({"mode": "exec", "proxies": 50}))  # rewritten meanwhile
    bad = Run(date="d", cores=2)
    harness.idle_row(plan, bad)
    assert idlerow.of(bad) is None
    assert bad.errors == [
        f"idle proxies ({path}): idle JSON: no per-proxy records (a list under per_proxy or proxies)"
    ]
    untouched = Run(date="d", cores=2)
    harness.idle_row(harness.build_plan(bench_args()), untouched)
    assert (untouched.measurements, untouched.errors) == ([], [])


def test_over_a_short_window_one_clock_tick_still_reads_as_zero() -> None:
    data = json.loads(idle_json(4))
    data["seconds"] = 5  # one 10 ms tick is 0.2 % of a core here
    assert by_text(idle_run(json.dumps(data)), "4 idle proxies, CPU").text.endswith(
        "= 1.00× the target (zero: ≤ 0.2 % each)"
    )
    data["proxies"][0]["cpu_ticks"] = 2
    assert by_text(idle_run(json.dumps(data)), "4 idle proxies, CPU").status == NOT_MET


def test_the_section_shows_the_warm_parent_paid_once() -> None:
    zygote = {"private_mb": 12.0, "pss_mb": 17.5, "cpu_s": 0.0}
    md = report.render_markdown(idle_run(idle_json(zygote=zygote)))
    assert (
        "| the warm parent (once per node) | private 12.0 MB, PSS 17.5 MB, CPU 0.000 % |  |" in md
    )
    assert "(the parent's own: 12.0 MB); PSS per pod, the same way:" in md
    assert "the warm parent (once per node)" not in report.render_markdown(idle_run())
