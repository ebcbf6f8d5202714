"""bench/coldpath.py's pure parts: arguments, the timeline summariser and the perf parsers."""

from __future__ import annotations

import pytest

from bench import coldpath
from bench.coldpath import WARMUP, Record


def test_parse_args_defaults() -> None:
    opts = coldpath.parse_args([])
    assert (opts.seconds, opts.interval, opts.spins) == (10.0, 0.02, [400.0, 0.0])
    assert opts.phases == list(coldpath.PHASES) and opts.json_path is None


def test_parse_args_values() -> None:
    opts = coldpath.parse_args(["--seconds", "3", "--interval-ms", "5", "--spin-us", "0"])
    assert (opts.seconds, opts.interval, opts.spins) == (3.0, 0.005, [0.0])
    assert coldpath.parse_args(["--phases", "timeline"]).phases == ["timeline"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--spin-us", "fast"],
        ["--spin-us", "-1"],
        ["--phases", "timeline,flames"],
        ["--seconds", "0.1"],  # 5 requests: fewer than the warm-up
        ["--interval-ms", "0"],
    ],
)
def test_parse_args_refuses(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        coldpath.parse_args(argv)


def test_durations_pairs_stamps_in_order() -> None:
    stamps = [("e1", 5), ("r0", 10), ("r1", 15), ("r0", 20), ("r1", 29), ("u1", 40)]
    assert coldpath.durations(stamps) == {"r": [5, 9]}  # e1, u1: no opening stamp


def out_hop(entry: int) -> Record:
    """An outbound callback in ns: read 2 µs, EAGAIN read 1 µs, seal 6 µs (C 4), send 3 µs."""
    stamps = [("e1", entry - 1000), ("r0", entry + 1000), ("r1", entry + 3000)]
    stamps += [("r0", entry + 5000), ("r1", entry + 6000), ("s0", entry + 7000)]
    stamps += [("c0", entry + 8000), ("c1", entry + 12000), ("s1", entry + 13000)]
    stamps += [("u0", entry + 14000), ("u1", entry + 17000)]
    return ("T", entry, entry + 20000, stamps)


def in_hop(entry: int) -> Record:
    """An inbound callback: recvmsg 2 µs, EAGAIN 1 µs, open 5 µs (C 3), inject 4 µs."""
    stamps = [("q0", entry + 1000), ("q1", entry + 3000), ("o0", entry + 3000)]
    stamps += [("c0", entry + 4000), ("c1", entry + 7000), ("o1", entry + 8000)]
    stamps += [("q0", entry + 8000), ("q1", entry + 9000), ("w0", entry + 10000)]
    stamps += [("w1", entry + 14000)]
    return ("U", entry, entry + 15000, stamps)


def test_hop_stages_out() -> None:
    stages = coldpath.hop_stages(out_hop(0))
    assert stages["read"] == 2 and stages["read -> EAGAIN"] == 1
    assert stages["seal, Python"] == 2 and stages["seal, C AEAD"] == 4
    assert stages["sendmsg"] == 3 and stages["callback total"] == 20
    assert stages["interpreter, rest"] == 20 - 2 - 1 - 2 - 4 - 3


def test_hop_stages_in() -> None:
    stages = coldpath.hop_stages(in_hop(0))
    assert stages["recvmsg"] == 2 and stages["recvmsg -> EAGAIN"] == 1
    assert stages["open, Python"] == 2 and stages["open, C AEAD"] == 3
    assert stages["inject write"] == 4 and stages["interpreter, rest"] == 15 - 12


def test_summarise_vanilla() -> None:
    client = [(i * 10**6, i * 10**6 + 200_000) for i in range(WARMUP + 3)]
    server = [(t0 + 100_000, t0 + 104_000) for t0, _ in client]
    fig = coldpath.summarise(client, server)
    assert fig["round trip"] == [200.0] * 3  # the warm-up is skipped
    assert fig["client send -> server recv returns"] == [100.0] * 3
    assert fig["server turnaround"] == [4.0] * 3
    assert fig["server send -> client recv returns"] == [96.0] * 3


def timeline(
    n: int,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], dict[str, list[Record]]]:
    """``n`` requests 1 ms apart, each: A out at +50 µs, B in at +100, the server at +150/+154,
    B out at +200, A in at +260, the client's recv at +300 µs."""
    client, server, a, b = [], [], [], []
    for i in range(n):
        t0 = i * 10**6
        client.append((t0, t0 + 300_000))
        server.append((t0 + 150_000, t0 + 154_000))
        a += [out_hop(t0 + 50_000), in_hop(t0 + 260_000)]
        b += [in_hop(t0 + 100_000), out_hop(t0 + 200_000)]
    return client, server, {"A": a, "B": b}


def test_summarise_follows_the_packet_through_both_proxies() -> None:
    client, server, proxies = timeline(WARMUP + 2)
    fig = coldpath.summarise(client, server, proxies)
    assert fig["A out: previous step -> callback entry"] == [50.0, 50.0]
    assert fig["B in: previous step -> callback entry"] == [100.0 - 50 - 14] * 2  # from u0
    assert fig["B inject -> server recv returns"] == [150.0 - 100 - 14] * 2  # from w1
    assert fig["B out: previous step -> callback entry"] == [200.0 - 154] * 2
    assert fig["A in: previous step -> callback entry"] == [260.0 - 200 - 14] * 2
    assert fig["A inject -> client recv returns"] == [300.0 - 260 - 14] * 2
    assert fig["A out: callback entry -> packet handed on (on the path)"] == [14.0] * 2
    assert fig["A out: select returns -> callback entry"] == [1.0] * 2
    assert "incomplete (a hop not found)" not in fig


def test_summarise_counts_a_missing_hop() -> None:
    client, server, proxies = timeline(WARMUP + 1)
    proxies["B"] = [r for r in proxies["B"] if r[0] != "U"]  # B never received
    fig = coldpath.summarise(client, server, proxies)
    assert fig["incomplete (a hop not found)"] == [0.0] and "A out: read" not in fig


def test_summarise_splits_the_wake_up_with_the_scheduler_events() -> None:
    client, server, proxies = timeline(WARMUP + 1)
    t0 = WARMUP * 10**6
    sched = {
        "A": {"wakeup": [t0 + 20_000], "switch": [t0 + 30_000], "out": [t0 + 64_000]},
        "B": {"wakeup": [], "switch": [], "out": []},
    }
    fig = coldpath.summarise(client, server, proxies, sched)
    assert fig["A out: packet -> wake-up"] == [20.0]
    assert fig["A out: wake-up -> on CPU"] == [10.0]
    assert fig["A out: on CPU -> select returns"] == [19.0]  # selected at entry - 1 µs
    assert fig["A out: off CPU inside its send/write"] == [3.0]  # out at u0, never back
    assert fig["B in: awake (no wake-up)"] == [0.0]


def test_off_cpu_pairs_switch_out_with_the_next_switch_in() -> None:
    sched = {"out": [10, 50, 95], "switch": [30, 60, 120]}
    assert coldpath.off_cpu(sched, 0, 100) == 20 + 10 + 5
    assert coldpath.off_cpu(sched, 40, 55) == 5


def test_parse_perf_stat() -> None:
    text = (
        "12.50,msec,task-clock,12500000,100.00,0.011,CPUs utilized\n"
        "30,,context-switches,12500000,100.00,2.4,K/sec\n"
        "<not supported>,,cycles,0,100.00,,\n"
        "garbage\n"
    )
    assert coldpath.parse_perf_stat(text) == {
        "task-clock": 12.5,
        "context-switches": 30.0,
        "cycles": None,
    }


def test_parse_perf_trace_sums_threads() -> None:
    text = """
 python (1234), 40 events, 100.0%

   syscall            calls  errors  total       min       avg       max       stddev
                                     (msec)    (msec)    (msec)    (msec)        (%)
   --------------- --------  ------ -------- --------- --------- ---------     ------
   readv                 20      10     0.500     0.010     0.025     0.100      5.00%
   sendto                10       0     1.000     0.050     0.100     0.200      3.00%

 python (1235), 2 events
   readv                  2       1     0.100     0.010     0.050     0.090      9.00%
"""
    assert coldpath.parse_perf_trace(text) == {
        "readv": (22, 11, pytest.approx(0.6)),
        "sendto": (10, 0, 1.0),
    }
    table = coldpath.per_request(coldpath.parse_perf_trace(text), 10)
    assert "| readv | 2.20 | 1.10 | 60.0 |" in table


def test_parse_sched() -> None:
    text = (
        "27859.638581120: sched:sched_wakeup: comm=tencrypt pid=11 prio=120 target_cpu=000\n"
        "27859.638588751: sched:sched_switch: prev_comm=python prev_pid=99 prev_prio=120 "
        "prev_state=R ==> next_comm=tencrypt next_pid=11 next_prio=120\n"
        "27859.639103177: sched:sched_switch: prev_comm=tencrypt prev_pid=11 prev_prio=120 "
        "prev_state=S ==> next_comm=tencrypt next_pid=22 next_prio=120\n"
    )
    got = coldpath.parse_sched(text, {"A": 11, "B": 22})
    assert got["A"] == {
        "wakeup": [27859638581120],
        "switch": [27859638588751],
        "out": [27859639103177],
    }
    assert got["B"] == {"wakeup": [], "switch": [27859639103177], "out": []}


def test_table_and_percentile() -> None:
    assert coldpath.percentile([], 90) == 0.0
    assert coldpath.percentile([float(v) for v in range(1, 11)], 90) == 10.0
    assert "| round trip | 3 | 2.0 | 3.0 |" in coldpath.table({"round trip": [1.0, 2.0, 3.0]})
