"""Fixtures for the namespace tests: labs and packet captures.

- ``lab``: a one-node ``Lab`` (module-scoped) with a unique name (``l<suffix>``), built once
  per test module and always removed afterwards, also when a test or ``up`` fails.
- ``lab2``: the same with two nodes joined over VXLAN (pod nginx2 on node2).
- ``capture``: the ``start_capture`` context manager below, for tests that need to see what
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

import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tencrypt.lab.capture import Frame, read_pcap
from tencrypt.lab.cluster import Lab
from tencrypt.linux import netns

PCAP_HEADER = 24  # bytes of the classic pcap global header


@dataclass
class Capture:
    path: Path
    err: Path
    data: bytes = b""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def read(self) -> bytes:
        """The pcap file as it is now (the capture may still be running)."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def frames(self) -> list[Frame]:
        return read_pcap(self.data or self.read())

    def count(self) -> int:
        return len(self.frames())

    def wait_for(self, predicate: Callable[[Capture], bool], timeout: float = 10.0) -> None:
        netns.wait_for(lambda: predicate(self), timeout=timeout, what=f"capture {self.path.name}")


@contextmanager
def start_capture(ns: str, iface: str, bpf: str = "", seconds: float = 30.0, *,
                  directory: Path | None = None) -> Iterator[Capture]:
    directory = directory or Path("/tmp")
    stem = f"cap-{ns}-{iface}-{netns.unique_suffix()}"
    cap = Capture(directory / f"{stem}.pcap", directory / f"{stem}.err")
    argv = ["timeout", str(max(1, int(seconds))), "tcpdump", "-i", iface, "-n", "-s", "0", "-U",
            "--immediate-mode", "-Z", "root", "-w", str(cap.path), *bpf.split()]
    with open(cap.err, "wb") as err:
        cap.proc = subprocess.Popen(netns.exec_argv(ns, argv), stdout=subprocess.DEVNULL,
                                    stderr=err, stdin=subprocess.DEVNULL)

    def listening() -> bool:
        if cap.proc is not None and cap.proc.poll() is not None:
            raise RuntimeError(f"tcpdump in {ns} on {iface} failed: {cap.err.read_text()}")
        return b"listening on" in cap.err.read_bytes()

    try:
        netns.wait_for(listening, timeout=10, what=f"tcpdump in {ns} on {iface}")
        yield cap
    finally:
        if cap.proc.poll() is None:
            cap.proc.send_signal(signal.SIGINT)  # `timeout` passes it on; tcpdump flushes
            try:
                cap.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cap.proc.kill()
                cap.proc.wait()
        cap.data = cap.read()


@pytest.fixture
def capture(tmp_path: Path) -> Callable[..., object]:
    """``capture(netns, iface, bpf="", seconds=30)``: see the module docstring."""

    def start(ns: str, iface: str, bpf: str = "", seconds: float = 30.0):  # type: ignore[no-untyped-def]
        return start_capture(ns, iface, bpf, seconds, directory=tmp_path)

    return start


def _built_lab(nodes: int) -> Iterator[Lab]:
    lab = Lab(f"l{netns.unique_suffix()}", nodes=nodes)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from _built_lab(1)


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    yield from _built_lab(2)
