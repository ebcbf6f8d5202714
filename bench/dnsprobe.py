"""Sequential DNS lookups of one name, timed, to one or more servers interleaved: the
benchmark's DNS client, run inside a pod.

Run as a script (``python -I bench/dnsprobe.py SERVERS NAME COUNT SECONDS [WARMUP]``) through
``ip netns exec``, so it sees the pod's ``/etc/resolv.conf``; it needs nothing beyond the
standard library. Rules:
- ``SERVERS`` is a comma-separated list of servers, each an IPv4 address or ``resolv`` for the
  first ``nameserver`` of ``/etc/resolv.conf`` (what the pod's applications ask: the embedded
  DNS proxy once the pod is patched, the cluster DNS before).
- Each server has its own connected UDP socket, its own counts and its own times. Queries are
  type A, class IN, recursion desired, a fresh random ID each; one query is in flight at a
  time, to one server: the next query (to whichever server) leaves when the answer to this one
  has arrived or it has failed.
- Interleaved: the servers take turns, one query each per round, and the order rotates by one
  per round (two servers: AB, BA, AB, …), so every server goes first as often as last. The
  machine's speed drifts from moment to moment; asked in turns, every server is measured
  across the same moments and the comparison of their medians is fair, which two runs one
  after the other are not. (Where each server runs relative to the client matters as much:
  the harness pins them to one CPU.) A server that has reached its ``COUNT`` sits its turns
  out.
- A lookup counts when an answer with the query's ID, rcode NOERROR and at least one answer
  record arrives; a datagram with another ID is ignored (a late answer to an earlier query);
  an error rcode, an ICMP refusal, an empty answer or no answer within ``TIMEOUT`` counts as
  failed and is not timed.
- Bounded twice: at most ``COUNT`` lookups per server (answered or failed) and at most
  ``SECONDS`` seconds for all of them. ``WARMUP`` lookups per server (default 0) go first,
  interleaved the same way, untimed and uncounted: they fill a cache on the way.
- Output: one JSON line, a list with one object ``{"server", "lookups", "failed", "seconds",
  "times_ns"}`` per server in the order given: the address asked, every answered lookup's time
  in order, and ``seconds`` the time spent on that server's own lookups (answered or failed),
  so that ``lookups / seconds`` is its sequential rate. Percentiles are the reader's
  (``bench.measure.parse_dns``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

TIMEOUT = 1.0  # seconds per lookup
PORT = 53


def build_query(name: str, ident: int) -> bytes:
    """A standard query for ``name`` A IN with ID ``ident`` and RD set (RFC 1035 §4.1)."""
    labels = [label for label in name.strip(".").split(".") if label]
    qname = b"".join(bytes([len(lab)]) + lab.encode("ascii") for lab in labels) + b"\x00"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def answer_status(reply: bytes, ident: int) -> str:
    """``ok``, ``other`` (not the answer to query ``ident``: ignore it) or ``failed`` (the
    answer, with an error rcode or no answer record)."""
    if len(reply) < 12:
        return "other"
    rid, flags, _qd, ancount = struct.unpack("!HHHH", reply[:8])
    if rid != ident or not flags & 0x8000:
        return "other"
    return "ok" if flags & 0x000F == 0 and ancount > 0 else "failed"


def resolver(text: str) -> str:
    """The first ``nameserver`` of a resolv.conf text."""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    raise SystemExit("resolv.conf names no nameserver")


def turns(n: int, rnd: int) -> list[int]:
    """The order in which ``n`` servers are asked in round ``rnd``: rotated by one per round."""
    return [(rnd + i) % n for i in range(n)]


@dataclass(slots=True)
class Probe:
    """One server's socket and accounting."""

    server: str
    sock: socket.socket
    failed: int = 0
    busy_ns: int = 0
    times: list[int] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.times) + self.failed

    def lookup(self, query: bytes, ident: int) -> None:
        """One query and its answer (or failure), timed and counted."""
        clock = time.perf_counter_ns
        t0 = clock()
        status = "other"
        try:
            self.sock.send(query)
            while status == "other":
                status = answer_status(self.sock.recv(4096), ident)
        except (TimeoutError, ConnectionRefusedError):
            status = "failed"
        elapsed = clock() - t0
        self.busy_ns += elapsed
        if status == "ok":
            self.times.append(elapsed)
        else:
            self.failed += 1

    def result(self) -> dict[str, object]:
        return {
            "server": self.server,
            "lookups": len(self.times),
            "failed": self.failed,
            "seconds": self.busy_ns / 1e9,
            "times_ns": self.times,
        }


def interleaved(
    servers: list[str], name: str, count: int, seconds: float, port: int = PORT
) -> list[dict[str, object]]:
    """Up to ``count`` lookups of ``name`` per server, in rotating turns, within ``seconds``."""
    probes = []
    for server in servers:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((server, port))
        sock.settimeout(TIMEOUT)
        probes.append(Probe(server, sock))
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    try:
        rnd = 0
        while any(p.done < count for p in probes) and time.perf_counter_ns() < deadline:
            for i in turns(len(probes), rnd):
                if probes[i].done < count and time.perf_counter_ns() < deadline:
                    ident = int.from_bytes(os.urandom(2), "big")
                    probes[i].lookup(build_query(name, ident), ident)
            rnd += 1
    finally:
        for p in probes:
            p.sock.close()
    return [p.result() for p in probes]


def main(argv: list[str]) -> int:
    servers, name, count, seconds = argv[0].split(","), argv[1], int(argv[2]), float(argv[3])
    warmup = int(argv[4]) if len(argv) > 4 else 0
    if "resolv" in servers:
        with open("/etc/resolv.conf") as f:
            ns = resolver(f.read())
        servers = [ns if s == "resolv" else s for s in servers]
    if warmup:
        interleaved(servers, name, warmup, seconds, PORT)
    print(json.dumps(interleaved(servers, name, count, seconds, PORT)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
