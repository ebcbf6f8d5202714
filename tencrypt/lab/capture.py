"""What an eavesdropper on the node sees: tcpdump on a lab interface, and the packets it caught.

``Capture`` runs tcpdump inside a namespace (bounded: it always ends by ``stop()`` or its own
timeout), writing a pcap file; ``read_pcap`` parses the classic pcap format (Ethernet or Linux
cooked captures) into ``Frame`` objects with the IPv4 protocol, addresses, ports and raw bytes, so
the demo and tests can check for a marker string and for which protocols crossed the wire.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tencrypt.linux import netns

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113


@dataclass(frozen=True, slots=True)
class Frame:
    raw: bytes
    proto: int | None  # IPv4 protocol number, None for non-IPv4 frames
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
        raw = data[off + 16:off + 16 + caplen]
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
    if ethertype != b"\x08\x00" or len(ip) < 20 or ip[0] >> 4 != 4:
        return Frame(raw, None, None, None, None, None)
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
    sport = dport = None
    if proto in (6, 17) and len(ip) >= ihl + 4:
        sport, dport = struct.unpack_from("!HH", ip, ihl)
    return Frame(raw, proto, src, dst, sport, dport)


class Capture:
    """tcpdump -i IFACE in namespace NS, for at most ``limit`` seconds."""

    def __init__(self, ns: str, iface: str, bpf: str = "", limit: float = 60.0) -> None:
        self.file = Path(tempfile.mkstemp(prefix="tencrypt-cap-", suffix=".pcap")[1])
        # --immediate-mode: without it packets wait in the kernel's capture buffer, and those
        # still there at SIGINT are lost (a short exchange then shows up as 0 packets)
        argv = ["timeout", str(int(limit)), "tcpdump", "-i", iface, "-U", "--immediate-mode",
                "-n", "-s", "0", "-w", str(self.file), *bpf.split()]
        self.proc = subprocess.Popen(netns.exec_argv(ns, argv), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # tcpdump says "listening on ..." once the socket is open: packets after that are caught
        assert self.proc.stderr is not None
        self.proc.stderr.readline()

    def stop(self) -> list[Frame]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            return read_pcap(self.file.read_bytes())
        finally:
            self.file.unlink(missing_ok=True)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
