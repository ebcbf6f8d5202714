"""bench/dnsprobe.py against real UDP DNS servers on loopback: the servers are asked in rotating
turns (AB, BA, …), each with its own counts and times; the harness's DNS stage asks both paths
in one probe with the processes pinned to one CPU (bench/cpustat.py ``pinned``).

Each server is a thread with a UDP socket on its own 127.0.0.x address (one port for all, as
the probe asks every server on one port) that logs the queries it receives, in order, and
answers as told: a record, NXDOMAIN, a stale answer before the real one, or nothing. The
client waits for each answer before it sends the next query, so the log's order is the order
in which the probe asked. No timing thresholds: counts, orders and outcomes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from bench import cpustat, dnsprobe, harness, measure
from bench.progress import Progress
from bench.report import TENCRYPT, VANILLA, Run
from tencrypt.lab.topology import Pod
from tests.unit.test_bench_targets import plan_args

NAME = "nginx2.myproject.svc.cluster.local"
SLOW_S = 0.002


class Log:
    """The queries the servers received, in order: (server address, query ID)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def add(self, server: str, ident: int) -> None:
        with self.lock:
            self.entries.append((server, ident))

    def servers(self) -> list[str]:
        with self.lock:
            return [server for server, _ident in self.entries]


def answer(query: DNSRecord, behaviour: str) -> list[bytes]:
    """The datagrams a server of this behaviour sends back to ``query``."""
    reply = query.reply()
    if behaviour == "nxdomain":
        reply.header.rcode = RCODE.NXDOMAIN
        return [reply.pack()]
    reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("172.30.0.12"), ttl=30))
    if behaviour == "stale":  # a late answer to some earlier query first: to be ignored
        stale = DNSRecord.parse(reply.pack())
        stale.header.id = (query.header.id + 1) & 0xFFFF
        return [stale.pack(), reply.pack()]
    if behaviour == "slow":
        time.sleep(SLOW_S)
    return [reply.pack()]


@contextmanager
def dns_server(address: str, port: int, behaviour: str, log: Log) -> Iterator[int]:
    """A DNS server on ``address``:``port`` (0: any free port) until the block ends; yields
    its port. ``silent`` receives and logs but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    sock.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = DNSRecord.parse(data)
            log.add(address, query.header.id)
            if behaviour != "silent":
                for datagram in answer(query, behaviour):
                    sock.sendto(datagram, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


@contextmanager
def servers(*behaviours: str) -> Iterator[tuple[list[str], int, Log]]:
    """One server per behaviour on 127.0.0.1, 127.0.0.2, … sharing one port; ``refused`` binds
    nothing (the kernel answers port unreachable)."""
    log, addresses = Log(), [f"127.0.0.{i + 1}" for i in range(len(behaviours))]
    with ExitStack() as stack:
        port = 0
        for address, behaviour in zip(addresses, behaviours, strict=True):
            if behaviour == "refused":
                continue
            port = stack.enter_context(dns_server(address, port, behaviour, log))
        yield addresses, port, log


def times(result: dict[str, object]) -> list[int]:
    return cast(list[int], result["times_ns"])


def expected_order(addresses: list[str], count: int, asked: set[str]) -> list[str]:
    """The servers in ``asked`` in the order the rotating turns reach them, ``count`` each."""
    order = []
    for rnd in range(count):
        order += [addresses[i] for i in dnsprobe.turns(len(addresses), rnd)]
    return [a for a in order if a in asked]


def test_turns_rotate_by_one_per_round() -> None:
    assert [dnsprobe.turns(2, r) for r in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert [dnsprobe.turns(3, r) for r in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert dnsprobe.turns(1, 7) == [0]


def test_two_servers_are_asked_in_alternating_order_and_counted_apart() -> None:
    with servers("answer", "nxdomain") as (addresses, port, log):
        ok, nx = dnsprobe.interleaved(addresses, NAME, 5, 30.0, port)
        asked = log.servers()
    a, b = addresses
    assert asked == [a, b, b, a, a, b, b, a, a, b]  # AB, BA, AB, BA, AB
    assert (ok["server"], ok["lookups"], ok["failed"], len(times(ok))) == (a, 5, 0, 5)
    assert (nx["server"], nx["lookups"], nx["failed"], nx["times_ns"]) == (b, 0, 5, [])
    assert cast(float, ok["seconds"]) > 0  # each server's own time, failed lookups' too
    assert cast(float, nx["seconds"]) > 0
    idents = [ident for _server, ident in log.entries]
    assert len(set(idents)) >= 9  # a fresh random ID per query (16 bits: one clash allowed)


def test_a_stale_answer_is_ignored_and_a_slow_servers_time_stays_its_own() -> None:
    with servers("stale", "slow") as (addresses, port, log):
        stale, slow = dnsprobe.interleaved(addresses, NAME, 4, 30.0, port)
        asked = log.servers()
    assert asked == expected_order(addresses, 4, set(addresses))
    assert (stale["lookups"], stale["failed"]) == (4, 0)
    assert (slow["lookups"], slow["failed"]) == (4, 0)
    # the slow server sleeps before each answer, so each of its times holds that sleep
    assert all(t >= SLOW_S * 1e9 for t in times(slow))


def test_refused_and_silent_servers_fail_their_turns_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dnsprobe, "TIMEOUT", 0.2)
    with servers("answer", "refused", "silent") as (addresses, port, log):
        ok, refused, silent = dnsprobe.interleaved(addresses, NAME, 3, 30.0, port)
        asked = log.servers()
    assert asked == expected_order(addresses, 3, {addresses[0], addresses[2]})
    assert (ok["lookups"], ok["failed"]) == (3, 0)
    assert (refused["lookups"], refused["failed"]) == (0, 3)
    assert (silent["lookups"], silent["failed"]) == (0, 3)


def test_no_time_left_means_no_lookup() -> None:
    with servers("answer", "answer") as (addresses, port, log):
        results = dnsprobe.interleaved(addresses, NAME, 5, 0.0, port)
        asked = log.servers()
    assert asked == []
    assert [(r["lookups"], r["failed"]) for r in results] == [(0, 0), (0, 0)]


def test_the_script_warms_up_in_turns_and_prints_what_parse_dns_reads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with servers("answer", "answer") as (addresses, port, log):
        monkeypatch.setattr(dnsprobe, "PORT", port)
        assert dnsprobe.main([",".join(addresses), NAME, "6", "30", "3"]) == 0
        asked = log.servers()
    # three warm-up rounds, then six measured ones, each starting again with the first server
    assert asked == expected_order(addresses, 3, set(addresses)) + expected_order(
        addresses, 6, set(addresses)
    )
    out = capsys.readouterr().out
    assert len(json.loads(out)) == 2
    first, second = measure.parse_dns(out)
    assert (first.server, first.lookups, first.failed) == (addresses[0], 6, 0)
    assert (second.server, second.lookups, second.failed) == (addresses[1], 6, 0)


def test_the_harness_asks_both_tencrypt_paths_in_one_interleaved_probe_on_one_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Bench.dns: one probe with the cluster DNS and the pod's resolver (here 127.0.0.2, a
    loopback address as the proxy's is), each path's figures in its own row, the probe and the
    servers (here this process: its pid stands in for dnsmasq's) on one CPU meanwhile and back
    on their CPUs afterwards; vanilla asks the cluster DNS alone."""
    calls: list[tuple[list[str], set[int]]] = []
    (tmp_path / "node1.dnsmasq.pid").write_text(f"{os.getpid()}\n")
    before = os.sched_getaffinity(0)
    with servers("answer", "answer") as (addresses, port, log):

        def lookups(
            _ns: str, asked: list[str], name: str, count: int, seconds: float
        ) -> list[measure.DnsLookups]:
            calls.append((list(asked), os.sched_getaffinity(0)))
            resolved = [addresses[1] if s == "resolv" else s for s in asked]
            return measure.parse_dns(
                json.dumps(dnsprobe.interleaved(resolved, name, count, seconds, port))
            )

        monkeypatch.setattr(measure, "dns_lookups", lookups)
        run = Run(date="d", cores=2)
        plan = harness.build_plan(plan_args())
        plan.dns_count, plan.dns_seconds = 10, 30.0  # the count bounds the run, never the time
        bench = harness.Bench(plan, run, Progress([]), tmp_path)
        lab = SimpleNamespace(dns_ip=addresses[0], pid_file=lambda what: tmp_path / f"{what}.pid")
        pod = Pod("nginx", "p", "ns", "10.0.0.1", "172.30.0.1", "node1", 1500, NAME)
        target = SimpleNamespace(pids=list)
        bench.dns(lab, 1, TENCRYPT, pod, pod, target)  # type: ignore[arg-type]
        bench.dns(lab, 1, VANILLA, pod, pod, target)  # type: ignore[arg-type]
    one = {min(before)}
    assert calls == [([addresses[0], "resolv"], one), ([addresses[0]], one)]
    assert os.sched_getaffinity(0) == before
    assert run.get(1, TENCRYPT, "dns_direct", 1, "lookups") == 10
    assert run.get(1, TENCRYPT, "dns", 1, "lookups") == 10
    assert run.get(1, VANILLA, "dns_direct", 1, "lookups") == 10
    assert run.get(1, VANILLA, "dns", 1, "lookups") is None
    assert log.servers()[:4] == [addresses[0], addresses[1], addresses[1], addresses[0]]
    assert any(f"= {addresses[1]}, 10 lookups of {NAME}" in note for note in run.notes)
    (tmp_path / "node1.dnsmasq.pid").unlink()
    with pytest.raises(measure.MeasureError, match="no pid for node1's dnsmasq"):
        bench.dns(lab, 1, VANILLA, pod, pod, target)  # type: ignore[arg-type]


def test_pinned_puts_every_thread_on_one_cpu_and_gives_each_its_cpus_back() -> None:
    """A child with two threads and this thread: on ``cpu`` inside the block, as before after
    it, also when the block raises; a gone pid is left alone."""
    mine = os.sched_getaffinity(0)
    cpu = max(mine)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import threading, time, sys; threading.Thread(target=time.sleep, args=(30,),"
            " daemon=True).start(); print('up', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        tids = cpustat.threads(child.pid)
        assert len(tids) == 2
        child_cpus = {tid: os.sched_getaffinity(tid) for tid in tids}
        with pytest.raises(RuntimeError), cpustat.pinned([child.pid, 2**22 + 1], cpu):
            assert all(os.sched_getaffinity(tid) == {cpu} for tid in tids)
            assert os.sched_getaffinity(0) == {cpu}
            raise RuntimeError("the measurement failed")
        assert {tid: os.sched_getaffinity(tid) for tid in tids} == child_cpus
        assert os.sched_getaffinity(0) == mine
    finally:
        child.kill()
        child.wait()
    assert cpustat.threads(child.pid) == []
