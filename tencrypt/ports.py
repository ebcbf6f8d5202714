"""What the proxy reads from and writes to, as small Protocols: the real devices and sockets
(``open_ports``) in production, in-memory fakes (tests/unit/fakes.py) in unit tests — the
seams that let the data path be tested without root, as wireguard-go's tuntest/bindtest do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from tencrypt.core.classify import AddrClass, Change, ClassTable
from tencrypt.core.peer import Transmit
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.stats import Stats


class TunDevice(Protocol):  # linux.tun.Tun
    def fileno(self) -> int: ...
    def readinto(self, buf: bytearray) -> int: ...
    def write_frame(self, vnet_hdr: bytes, packet: bytes | bytearray | memoryview) -> None: ...
    def close(self) -> None: ...


class DatagramSocket(Protocol):  # linux.gso.UdpBatch
    gso: bool
    gro: bool

    def fileno(self) -> int: ...
    def recv_batch(self) -> tuple[Sequence[memoryview], Any] | None: ...
    def send_runs(self, runs: Sequence[Transmit]) -> int: ...
    def close(self) -> None: ...


class RawSocket(Protocol):  # linux.sockets.RawSockets: raw IPv4 and IPv6, header included
    def sendto(self, data: bytes | bytearray | memoryview, addr: tuple[str, int]) -> int: ...
    def close(self) -> None: ...


class Resolver(Protocol):  # linux.dns.DnsProxy, as the data path sees it
    table: ClassTable
    on_change: Callable[[list[Change]], None] | None
    pending_effects: Callable[[str], bool] | None  # answers wait while an address is pending

    def effects_applied(self) -> None: ...

    def classify_address(self, ip: str) -> Awaitable[AddrClass | None]: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclasses.dataclass(slots=True)
class Ports:
    """Everything the proxy reads from and writes to; ``serve()`` opens the real ones."""

    tun: TunDevice
    udp: DatagramSocket
    inject: RawSocket  # decrypted packets (and ICMP errors) into the local stack
    bypass: RawSocket  # the clear, out of the uplink (carries the bypass fwmark)

    def close(self) -> None:
        for port in (self.tun, self.udp, self.inject, self.bypass):
            port.close()


def open_ports(config: PodConfig, stats: Stats, batch: bool) -> Ports:
    from tencrypt.linux import sockets
    from tencrypt.linux.gso import UdpBatch
    from tencrypt.linux.tun import Tun

    # the tunnel's family is the pod's primary one: UDP/IPv6 on an IPv6-only pod
    sock = sockets.tunnel_socket(config.port, config.fwmark, config.version)
    udp = UdpBatch(sock, stats, gso=batch, gro=batch)
    return Ports(
        Tun(config.tun, vnet_hdr=batch),
        udp,
        sockets.RawSockets(),
        sockets.RawSockets(mark=config.fwmark),
    )
