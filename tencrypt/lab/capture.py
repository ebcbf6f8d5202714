"""What an eavesdropper on the node sees: tcpdump on a lab interface, and the packets it caught.

``Capture`` runs tcpdump inside a namespace (bounded: it always ends by ``stop()`` or its own
timeout), writing a pcap file; ``read_pcap`` parses the classic pcap format (Ethernet or Linux
cooked captures) into ``Frame`` objects with the IP protocol, addresses, ports and raw bytes, so
the demo and tests can check for a marker string and for which protocols crossed the wire. IPv6
frames carry their upper-layer protocol (after the hop-by-hop, routing, fragment and
destination options headers) and its ports; a later fragment has no ports.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tencrypt.errors import SetupError
from tencrypt.linux import netns

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
ETH_P_IP, ETH_P_IPV6 = b"\x08\x00", b"\x86\xdd"  # linux/if_ether.h
IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options (RFC 8200 §4)
IPV6_FRAGMENT = 44


@dataclass(frozen=True, slots=True)
class Frame:
    raw: bytes
    proto: int | None  # IP protocol number (IPv6: the upper layer's), None for non-IP frames
    src: str | None
    dst: str | None
    sport: int | None
    dport: int | None


def read_pcap(data: bytes) -> list[Frame]:
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    frames, off = [], 24
    while off + 16 <= len(data):
        caplen = struct.unpack_from(endian + "I", data, off + 8)[0]
        raw = data[off + 16 : off + 16 + caplen]
        off += 16 + caplen
        frames.append(_frame(raw, linktype))
    return frames


def _frame(raw: bytes, linktype: int) -> Frame:
    if linktype == LINKTYPE_ETHERNET:
        ip_off, ethertype = 14, raw[12:14] if len(raw) >= 14 else b""
    elif linktype == LINKTYPE_LINUX_SLL:
        ip_off, ethertype = 16, raw[14:16] if len(raw) >= 16 else b""
    else:
        return Frame(raw, None, None, None, None, None)
    ip = raw[ip_off:]
    if ethertype == ETH_P_IPV6:
        return _frame6(raw, ip)
    if ethertype != ETH_P_IP or len(ip) < 20 or ip[0] >> 4 != 4:
        return Frame(raw, None, None, None, None, None)
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
    sport = dport = None
    if proto in (6, 17) and len(ip) >= ihl + 4:
        sport, dport = struct.unpack_from("!HH", ip, ihl)
    return Frame(raw, proto, src, dst, sport, dport)


def _frame6(raw: bytes, ip: bytes) -> Frame:
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return Frame(raw, None, None, None, None, None)
    src = str(ipaddress.IPv6Address(ip[8:24]))
    dst = str(ipaddress.IPv6Address(ip[24:40]))
    proto, off, first = ip[6], 40, True
    while len(ip) >= off + 8 and (proto in IPV6_EXTENSIONS or proto == IPV6_FRAGMENT):
        if proto == IPV6_FRAGMENT:
            first = struct.unpack_from("!H", ip, off + 2)[0] & 0xFFF8 == 0
            proto, off = ip[off], off + 8
        else:
            proto, off = ip[off], off + (ip[off + 1] + 1) * 8
    sport = dport = None
    if first and proto in (6, 17) and len(ip) >= off + 4:
        sport, dport = struct.unpack_from("!HH", ip, off)
    return Frame(raw, proto, src, dst, sport, dport)


class Capture:
    """tcpdump -i IFACE in namespace NS into a pcap file, for at most ``limit`` seconds.

    ``with Capture(...) as cap:`` starts it and returns once tcpdump listens (packets sent after
    that are caught); leaving the block, or ``stop()``, ends it and loads ``cap.data`` (the raw
    pcap bytes, to grep payloads) — ``cap.frames()`` parses them. ``read()`` and ``wait_for()``
    look at the file while the capture still runs.
    """

    def __init__(
        self, ns: str, iface: str, bpf: str = "", limit: float = 60.0, directory: Path | None = None
    ) -> None:
        fd, name = tempfile.mkstemp(prefix=f"cap-{ns}-{iface}-", suffix=".pcap", dir=directory)
        os.close(fd)
        self.path = Path(name)
        self.keep = directory is not None  # a caller's directory keeps the file for a post-mortem
        self.data = b""
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the capture
        # --immediate-mode: without it packets wait in the kernel's capture buffer, and those
        # still there at SIGINT are lost (a short exchange then shows up as 0 packets)
        argv = [
            "timeout",
            str(max(1, int(limit))),
            "tcpdump",
            "-i",
            iface,
            "-U",
            "--immediate-mode",
            "-n",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
            str(self.path),
            *bpf.split(),
        ]
        self.proc = subprocess.Popen(
            netns.exec_argv(ns, argv),
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
        )
        try:
            netns.wait_for(self._listening, timeout=10, what=f"tcpdump in {ns} on {iface}")
        except Exception:
            self.stop()
            raise

    def _listening(self) -> bool:
        self._err.seek(0)
        err = self._err.read()
        if self.proc.poll() is not None:
            raise SetupError(f"tcpdump failed: {err.decode(errors='replace').strip()}")
        return b"listening on" in err

    def read(self) -> bytes:
        """The pcap file as it is now (the capture may still be running)."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_for(self, predicate: Callable[[Capture], bool], timeout: float = 10.0) -> None:
        netns.wait_for(lambda: predicate(self), timeout=timeout, what=f"capture {self.path.name}")

    def frames(self) -> list[Frame]:
        return read_pcap(self.data or self.read())

    def stop(self) -> list[Frame]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # `timeout` passes it on; tcpdump flushes
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.data:
            self.data = self.read()
            if not self.keep:
                self.path.unlink(missing_ok=True)
            self._err.close()
        return read_pcap(self.data)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
