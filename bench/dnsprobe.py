"""Sequential DNS lookups of one name, timed: the benchmark's DNS client, run inside a pod.

Run as a script (``python -I bench/dnsprobe.py SERVER NAME COUNT SECONDS [WARMUP]``) through
``ip netns exec``, so it sees the pod's ``/etc/resolv.conf``; it needs nothing beyond the
standard library. Rules:
- ``SERVER`` is an IPv4 address, or ``resolv`` for the first ``nameserver`` of
  ``/etc/resolv.conf`` (what the pod's applications ask: the embedded DNS proxy once the pod is
  patched, the cluster DNS before).
- One query at a time, type A, class IN, recursion desired, a fresh random ID each, on one
  connected UDP socket; the next query leaves when the answer to this one has arrived.
- A lookup counts when an answer with the query's ID, rcode NOERROR and at least one answer
  record arrives; a datagram with another ID is ignored (a late answer to an earlier query);
  an error rcode, an empty answer or no answer within ``TIMEOUT`` counts as failed and is not
  timed.
- Bounded twice: at most ``COUNT`` lookups and at most ``SECONDS`` seconds. ``WARMUP``
  lookups (default 0) go first, untimed and uncounted: they fill a cache on the way.
- Output: one JSON line ``{"server", "lookups", "failed", "seconds", "times_ns"}`` with every
  answered lookup's time, in order; percentiles are the reader's (``bench.measure.parse_dns``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

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


def lookups(server: str, name: str, count: int, seconds: float) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((server, PORT))
    sock.settimeout(TIMEOUT)
    clock, failed = time.perf_counter_ns, 0
    times: list[int] = []
    start = clock()
    deadline = start + int(seconds * 1e9)
    while len(times) + failed < count and clock() < deadline:
        ident = int.from_bytes(os.urandom(2), "big")
        t0 = clock()
        sock.send(build_query(name, ident))
        status = "other"
        try:
            while status == "other":
                status = answer_status(sock.recv(4096), ident)
        except (TimeoutError, ConnectionRefusedError):
            status = "failed"
        if status == "ok":
            times.append(clock() - t0)
        else:
            failed += 1
    return {
        "server": server,
        "lookups": len(times),
        "failed": failed,
        "seconds": (clock() - start) / 1e9,
        "times_ns": times,
    }


def main(argv: list[str]) -> int:
    server, name, count, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    warmup = int(argv[4]) if len(argv) > 4 else 0
    if server == "resolv":
        with open("/etc/resolv.conf") as f:
            server = resolver(f.read())
    if warmup:
        lookups(server, name, warmup, seconds)
    print(json.dumps(lookups(server, name, count, seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
