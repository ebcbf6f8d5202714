"""The proxy's read rule (daemon.py READS) on a real lab: a sparse exchange (one byte each way,
one every 20 ms, over one connection through nginx2's Service) gets every answer right and
costs each proxy one tenc0 read per packet, not a second read that finds EAGAIN; a bulk
download still arrives intact. With the polling window (``--spin-us``, default) and without.

    nginx1 (client) -- tenc0 -> proxy A == UDP 1337 == proxy B -> tenc0 -- nginx2 (echo :5202)

The reads are counted from ``/proc/PID/io`` (``syscr``: the read family of system calls, which
a tenc0 ``readv`` is and a UDP ``recvmsg`` is not), so the figure is a count, not a time.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import pytest

from bench import measure
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import proxy_pid
from tencrypt.lab.topology import Topology
from tencrypt.linux import netns
from tests.netns.conftest import built_lab, download_sha256

pytestmark = pytest.mark.netns

PORT = 5202
REQUESTS = 100
CLIENT = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
wrong = 0
for i in range(n):
    time.sleep(0.02)
    b = bytes([65 + i % 26])
    s.sendall(b)
    wrong += s.recv(64) != b
s.close()
print(wrong)
"""

SPINS = ["400", "0"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """The default lab, nginx2's Service with the echo port too."""
    topology = Topology.default()
    topology.pods[1] = dataclasses.replace(
        topology.pods[1],
        service_ports=[
            {"name": "http", "port": 8080, "targetPort": 8080},
            {"name": "echo", "port": PORT, "targetPort": PORT},
        ],
    )
    with built_lab(1, topology, prefix="rl") as built:
        yield built


@pytest.fixture(params=SPINS)
def proxies(lab: Lab, request: pytest.FixtureRequest) -> Iterator[dict[str, int]]:
    """Both pods patched with ``--spin-us`` the parameter; always unpatched."""
    args = ("--spin-us", request.param)
    try:
        for pod in ("nginx2", "nginx1"):
            lab.patch(pod, run_args=args)
        pids = {p: proxy_pid(lab, lab.pod(p)) for p in ("nginx1", "nginx2")}
        assert all(pids.values()), pids
        yield {p: int(pid or 0) for p, pid in pids.items()}
    finally:
        for pod in ("nginx1", "nginx2"):
            lab.unpatch(pod)


def listening(ns: str) -> bool:
    return bool(netns.run(ns, ["ss", "-Hlnt", f"sport = :{PORT}"], check=False).stdout.strip())


def reads(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscr:"))


def test_sparse_exchange_is_answered_with_one_read_per_packet(lab, proxies):
    server_ns, vip = lab.pod("nginx2").netns, lab.pod("nginx2").vip
    server = netns.spawn(server_ns, [sys.executable, "-I", "-c", measure.RR_SERVER, str(PORT)])
    try:
        netns.wait_for(lambda: listening(server_ns), what=f"the echo server on :{PORT}")
        before = {p: reads(pid) for p, pid in proxies.items()}
        client = [sys.executable, "-I", "-c", CLIENT, vip, str(PORT), str(REQUESTS)]
        proc = netns.run(lab.pod("nginx1").netns, client, check=False, timeout=60)
        after = {p: reads(pid) for p, pid in proxies.items()}
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 0 and proc.stdout.split() == ["0"], proc.stderr[-500:]
    # each proxy reads one packet from tenc0 per request (plus the connection's handshake,
    # teardown and an occasional pure ACK): a second read per packet would double it
    for pod in proxies:
        assert REQUESTS <= after[pod] - before[pod] < 1.5 * REQUESTS, (pod, before, after)


def test_bulk_download_arrives_intact(lab, proxies):
    path, digest = lab.make_blob("nginx2", 50)
    assert download_sha256(lab, "nginx1", f"http://nginx2:8080{path}") == digest
