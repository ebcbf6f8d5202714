"""CPU of the tunnel processes during a run, per end of the tunnel.

Rules:
- Read from ``/proc/<pid>/stat``: utime + stime of the whole process (the process's line sums
  all its threads), in clock ticks (``os.sysconf("SC_CLK_TCK")``), at the start and the end of
  a run.
- Each process is assigned to the pod whose network namespace it runs in: the client's end or
  the server's end of the tunnel. A process in neither, or gone, is left out.
- Cores per Gbit/s = CPU-seconds used during the run / gigabits received in it, which is
  (CPU-seconds per second) / (Gbit/s): a figure that does not depend on how the machine's
  cores happened to be shared during the run.
- ``pinned`` puts processes on one CPU for a measurement (the DNS rows, see bench/harness.py)
  and gives every thread its own CPUs back afterwards, also when the measurement fails.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


def parse_stat_ticks(text: str) -> int:
    """utime + stime (clock ticks) from a ``/proc/<pid>/stat`` text. The command name in
    parentheses may hold spaces and parentheses: fields are counted after the last ``)``;
    utime and stime are fields 14 and 15 of proc(5), the 12th and 13th after it."""
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


CLIENT_END, SERVER_END = "client", "server"


@dataclass(slots=True, frozen=True)
class Snapshot:
    """utime + stime (clock ticks) of each process, and the end of the tunnel it runs at."""

    ticks: dict[int, int]
    ends: dict[int, str]
    at: float  # time.monotonic() when taken


def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def snapshot(pids: list[int], client_ns: str, server_ns: str) -> Snapshot:
    """The processes' CPU so far; a process in neither pod's namespace, or gone, is left out."""
    where = {
        netns_inode(f"/run/netns/{client_ns}"): CLIENT_END,
        netns_inode(f"/run/netns/{server_ns}"): SERVER_END,
    }
    where.pop(None, None)
    ticks, ends = {}, {}
    for pid in pids:
        end = where.get(netns_inode(f"/proc/{pid}/ns/net"))
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if end is not None:
            ticks[pid], ends[pid] = parse_stat_ticks(text), end
    return Snapshot(ticks, ends, time.monotonic())


def seconds_used(before: Snapshot, after: Snapshot, clk_tck: int | None = None) -> dict[str, float]:
    """CPU-seconds used between two snapshots, per end (``client``, ``server``), counting the
    processes present in both (one that started or ended in between is left out: its share of
    the window is unknown)."""
    tck = clk_tck or os.sysconf("SC_CLK_TCK")
    used = {CLIENT_END: 0.0, SERVER_END: 0.0}
    for pid, ticks in after.ticks.items():
        if pid in before.ticks and before.ends[pid] == after.ends[pid]:
            used[after.ends[pid]] += (ticks - before.ticks[pid]) / tck
    return used


def cores_per_gbps(cpu_s: float, gigabits: float) -> float | None:
    """CPU-seconds per gigabit received = (CPU-seconds per second) / (Gbit/s): how many cores
    the tunnel keeps busy per Gbit/s it carries. None when nothing was received."""
    return cpu_s / gigabits if gigabits > 0 else None


def threads(pid: int) -> list[int]:
    """The thread IDs of process ``pid``; none if it is gone."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


@contextlib.contextmanager
def pinned(pids: Iterable[int], cpu: int) -> Iterator[None]:
    """Every thread of ``pids``, and the calling thread, on CPU ``cpu`` until the block ends
    (programs the block starts inherit the pin); afterwards each thread is given back the CPUs
    it had, a thread started meanwhile those of its process. A process or thread that is gone
    is left alone."""
    saved: dict[int, dict[int, set[int]]] = {0: {0: os.sched_getaffinity(0)}}
    for pid in pids:
        for tid in threads(pid):
            with contextlib.suppress(OSError):
                saved.setdefault(pid, {})[tid] = os.sched_getaffinity(tid)
    try:
        for tids in saved.values():
            for tid in tids:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, saved[0][0])
        for pid, tids in saved.items():
            if pid == 0:
                continue
            for tid in threads(pid):
                cpus = tids.get(tid, tids.get(pid, next(iter(tids.values()))))
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)
