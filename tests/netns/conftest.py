"""Fixtures for the namespace tests: labs and packet captures.

- ``lab``: a one-node ``Lab`` (module-scoped) with a unique name (``l<suffix>``), built once
  per test module and always removed afterwards, also when a test or ``up`` fails.
- ``lab2``: the same with two nodes joined over VXLAN (pod nginx2 on node2).
- ``capture``: ``tencrypt.lab.capture.Capture`` in pytest's tmp dir, for tests that need to see what
  crossed a wire::

      def test_sealed(lab2, capture):
          node1 = lab2.nodes["node1"]
          with capture(node1.netns, node1.underlay_if, "udp port 4789") as cap:
              lab2.exec("nginx1", ["curl", "-sS", "http://nginx2:8080/"])
              cap.wait_for(lambda c: b"Hello from nginx2" in c.read())   # optional
          assert b"Hello from nginx2" in cap.data       # raw pcap bytes: grep payloads
          frames = cap.frames()                          # tencrypt.lab.capture.Frame list

  tcpdump runs in ``netns`` on ``iface`` with the BPF filter ``bpf``, packet-buffered into a
  pcap file (``cap.path``, in pytest's tmp dir) and bounded by ``timeout seconds`` in case the
  block never ends; leaving the block stops it (SIGINT) and loads ``cap.data``. Packets are
  delivered to the file as they arrive (``--immediate-mode``), so a capture stopped right
  after the traffic holds all of it, and the absence of a packet in it means something.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tencrypt.lab.capture import Capture
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import METRICS
from tencrypt.lab.topology import Topology
from tencrypt.linux import netns


@pytest.fixture
def capture(tmp_path: Path) -> Callable[..., Capture]:
    """``capture(netns, iface, bpf="", seconds=30)``: see the module docstring."""

    def start(ns: str, iface: str, bpf: str = "", seconds: float = 30.0) -> Capture:
        return Capture(ns, iface, bpf, limit=seconds, directory=tmp_path)

    return start


@contextmanager
def standalone_pod(
    prefix: str,
    address: str,
    gateway: str,
    resolv: str,
    mtu: int = 1500,
    name: str | None = None,
) -> Iterator[str]:
    """A pod-like namespace of its own, no lab: eth0 (a veth whose peer stays inside) with
    ``address``, a default route via ``gateway``, and ``resolv`` as its resolv.conf. Removed
    afterwards, also after a failure. ``name``: a namespace made already, to be equipped
    (named ``<prefix><suffix>`` and made here otherwise). An IPv6 ``address`` makes an
    IPv6-only pod: added without duplicate address detection (usable at once), the default
    route via ``gateway`` on eth0 (IPv6's usual next hop is link-local)."""
    name = name or f"{prefix}{netns.unique_suffix()}"
    etc = Path("/etc/netns") / name
    v6 = ":" in address
    add = (
        ["ip", "-6", "addr", "add", address, "dev", "eth0", "nodad"]
        if v6
        else ["ip", "addr", "add", address, "dev", "eth0"]
    )
    default = (
        ["ip", "-6", "route", "add", "default", "via", gateway, "dev", "eth0"]
        if v6
        else ["ip", "route", "add", "default", "via", gateway]
    )
    try:
        netns.create(name)
        for cmd in (
            ["ip", "link", "add", "eth0", "mtu", str(mtu), "type", "veth", "peer", "name", "peer0"],
            add,
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "link", "set", "peer0", "up"],
            default,
        ):
            netns.run(name, cmd)
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(resolv)
        yield name
    finally:
        netns.delete(name)
        (etc / "resolv.conf").unlink(missing_ok=True)
        if etc.exists():
            etc.rmdir()
    assert not netns.exists(name)


def curl(lab: Lab, pod: str, url: str, marker: str, timeout: int = 15):
    """curl ``url`` from ``pod`` with ``marker`` in a request header (to grep captures for)."""
    return lab.exec(
        pod,
        ["curl", "-sS", "--max-time", str(timeout), "-H", f"X-Marker: {marker}", url],
        check=False,
        timeout=timeout + 15,
    )


def metrics(lab: Lab, pod: str) -> dict[str, float]:
    """The pod's proxy's /metrics (127.0.0.1:9137 in the pod), sample name -> value."""
    text = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"]).stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def drops(m: dict[str, float], reason: str) -> float:
    return m.get(f'tencrypt_drops_total{{reason="{reason}"}}', 0.0)


def all_drops(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("tencrypt_drops_total"))


def send_datagrams(lab: Lab, node: str, dst: str, payloads: list[bytes]) -> None:
    """Inject UDP datagrams (UDP/IPv6 to an IPv6 ``dst``) at dst:1337 from the node
    namespace (the eavesdropper's seat)."""
    family = "AF_INET6" if ":" in dst else "AF_INET"
    script = (
        f"import socket,sys\ns=socket.socket(socket.{family},socket.SOCK_DGRAM)\n"
        "for h in sys.stdin.read().split():\n"
        f"    s.sendto(bytes.fromhex(h), ('{dst}', 1337))\n"
    )
    netns.run(
        lab.nodes[node].netns,
        [sys.executable, "-c", script],
        input="\n".join(p.hex() for p in payloads),
    )


def forgeries_are_counted(lab: Lab, pod: str, node: str, dst: str, data: list[bytes]) -> None:
    """Send ``pod``'s proxy (at ``dst``:1337, from ``node``) 50 random datagrams and, for
    every captured data message in ``data``, a copy with a bit flipped in its ciphertext (a
    seen counter: the replay window refuses it before the AEAD), a copy with a flipped high
    counter bit (a fresh counter whose tag cannot verify) and the message itself again (a
    replay); assert each is exactly one counted drop and none is opened."""
    rng = random.Random(1337)
    garbage = [rng.randbytes(rng.randrange(0, 200)) for _ in range(50)]
    replayed_flips, forged = [], []
    for d in data:
        b = bytearray(d)
        b[rng.randrange(16, len(b))] ^= 1 << rng.randrange(8)
        replayed_flips.append(bytes(b))
        b = bytearray(d)
        b[14] ^= 1 << rng.randrange(8)
        forged.append(bytes(b))
    before = metrics(lab, pod)
    send_datagrams(lab, node, dst, garbage + replayed_flips + forged + data)
    total = len(garbage) + 3 * len(data)
    netns.wait_for(
        lambda: all_drops(metrics(lab, pod)) >= all_drops(before) + total,
        timeout=20,
        what="the forged datagrams to be counted",
    )
    after = metrics(lab, pod)
    assert drops(after, "bad_tag") - drops(before, "bad_tag") == len(forged)
    assert drops(after, "replay") - drops(before, "replay") == 2 * len(data)
    moved = {  # when this fails: which reasons counted more than the datagrams sent here
        k: after[k] - before.get(k, 0.0)
        for k in after
        if k.startswith("tencrypt_drops_total") and after[k] != before.get(k, 0.0)
    }
    assert all_drops(after) - all_drops(before) == total, moved  # one verdict each, none accepted
    assert after["tencrypt_packets_opened_total"] == before["tencrypt_packets_opened_total"]


def line_echo_server(port: int) -> str:
    """A script: one connection on ``port``, every line sent back upper-cased."""
    return f"""
import socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {port})); srv.listen(1)
conn, _ = srv.accept()
f = conn.makefile("rwb")
while line := f.readline():
    f.write(line.upper()); f.flush()
"""


def line_echo_client(port: int, marker: str) -> str:
    """A script (argv: host, seconds): one connection to ``line_echo_server``, a line carrying
    ``marker`` every 20 ms, each reply checked; prints JSON ``ok`` (replies right), ``error``
    (the first failure, or "") and ``worst`` (the slowest round trip, s)."""
    return f"""
import json, socket, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
ok, error, worst, i = 0, "", 0.0, 0
try:
    s = socket.create_connection((host, {port}), timeout=10)
    f = s.makefile("rwb")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        i += 1
        msg, t = ("{marker}-%d\\n" % i).encode(), time.monotonic()
        f.write(msg); f.flush()
        if f.readline() != msg.upper():
            error = "wrong reply"; break
        ok += 1; worst = max(worst, time.monotonic() - t)
        time.sleep(0.02)
except OSError as exc:
    error = repr(exc)
print(json.dumps({{"ok": ok, "error": error, "worst": worst}}))
"""


def download_sha256(lab: Lab, client: str, url: str, timeout: int = 240) -> str:
    """The sha256 of what ``client`` downloads from ``url``, hashed as it streams in."""
    proc = lab.exec(
        client,
        ["sh", "-c", f"curl -sS --max-time {timeout} {url} | sha256sum"],
        timeout=timeout + 20,
    )
    return proc.stdout.split()[0]


@contextmanager
def built_lab(nodes: int = 1, topology: Topology | None = None, prefix: str = "l") -> Iterator[Lab]:
    """A lab named ``<prefix><suffix>``, up for the block and removed afterwards, also when
    ``up`` or the block fails."""
    lab = Lab(f"{prefix}{netns.unique_suffix()}", topology=topology, nodes=nodes)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab(1) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    with built_lab(2) as lab:
        yield lab
