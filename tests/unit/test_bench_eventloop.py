"""bench/eventloop.py's pure parts: its arguments and the table it prints."""

from __future__ import annotations

import pytest

from bench import eventloop


def test_before_needs_a_tree_and_unknown_variants_are_refused(capsys):
    with pytest.raises(SystemExit):
        eventloop.parse_args(["--variants", "before,asyncio"])
    assert "--before-tree" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eventloop.parse_args(["--variants", "trio"])
    a = eventloop.parse_args(["--variants", "before,uvloop", "--before-tree", "/tmp"])
    assert a.variants == "before,uvloop"


def test_table_gives_medians_over_rounds_and_skips_failed_ones():
    def run(sparse: float, tcp: float) -> dict:
        return {
            "rss_ready_mb": {"A": 34.0, "B": 35.0},
            "sparse": {"median_us": sparse, "p90_us": sparse + 100},
            "rr_p50_us": 300.0,
            "tcp_gbps": tcp,
            "syscalls_total": {"A": 6.5, "B": 7.0},
            "per_request": {
                "A": {"page-faults": 0.0, "task-clock": 0.5},
                "B": {"page-faults": 0.1, "task-clock": 0.4},
            },
        }

    results = {
        "options": {},
        "vanilla": [{"median_us": 170.0}, {"median_us": 190.0}],
        "asyncio": [run(1000, 2.0), {"error": "lab"}, run(1200, 1.0), run(1100, 3.0)],
    }
    text = eventloop.table(results)
    row = next(line for line in text.splitlines() if line.startswith("| asyncio"))
    assert "| 1100 (1000, 1200, 1100) |" in row and "| 2.00 (2.00, 1.00, 3.00) |" in row
    assert "| 34.0/35.0 | 6.50/7.00 | 0.00/0.10 | 0.50/0.40 |" in row
    assert "170, 190 µs" in text
