"""Tunnels linked in memory with an injected clock: the harness of the session tests.

    pod A 10.0.0.1 ----+                          +---- pod B 10.0.0.2   (behind VIP 172.30.0.10)
                       |   Net: delivers every     |
    pod C 10.0.0.3 ----+   datagram, DNATs VIPs,   +---- (attacker: any address, any bytes)
                           rewrites replies like
                           conntrack, logs the wire

Tests drive the cores the way the daemon does: send / receive / pop_transmits / pop_events /
on_timer, and check what arrives, what does not, and the exact drop counters.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tencrypt.core import TUNNEL_PORT, handshake, wire
from tencrypt.core.session import Limits, Tunnel
from tencrypt.core.stats import Stats

A, B, C, VIP = "10.0.0.1", "10.0.0.2", "10.0.0.3", "172.30.0.10"
PSK = bytes(range(1, 33))
PORT = TUNNEL_PORT
FAST = Limits(
    rekey_after_time=20.0,
    reject_after_time=30.0,
    rekey_timeout=1.0,
    handshake_give_up=5.0,
    keepalive_timeout=1.0,
    stale_timeout=2.5,
    initiation_max_age=30.0,
    handshake_rate=1000.0,
    handshake_burst=1000,
    tombstone_time=30.0,
)


TEMPLATES = handshake.Templates(PSK, X25519PrivateKey.generate)  # what a key holder can build


def remac(datagram: bytes) -> bytes:
    """``datagram`` with its mac1 recomputed under the project key, as an insider would."""
    return wire.add_mac(TEMPLATES.mac_key, datagram[: -wire.MAC_LEN])


def ipv4(src: str, dst: str, payload: bytes = b"x" * 20, proto: int = 17) -> bytes:
    total = 20 + len(payload)
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            0,
            0,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + payload
    )


def drops(t: Tunnel) -> int:
    return sum(t.stats.drops.values())


class Net:
    def __init__(self, limits: Limits = FAST) -> None:
        self.limits = limits
        self.now, self.wall = 1000.0, 1_700_000_000.0
        self.pods: dict[str, Tunnel] = {}
        self.vips: dict[str, str] = {}
        self.conntrack: dict[tuple[str, str], str] = {}  # (client, pod) -> VIP it asked for
        self.delivered: dict[str, list[bytes]] = {}
        self.events: dict[str, list] = {}
        self.wire: list[tuple[bytes, str, str]] = []  # (datagram, from pod, to address)
        self.block: set[int] = set()  # message types the network loses

    def add(self, ip: str, keys=None, **kw) -> Tunnel:
        """A pod holding ``keys`` (a KeyRing; default: PSK alone)."""
        self.pods[ip] = Tunnel(
            PSK if keys is None else keys, ip, Stats(), self.limits, port=PORT, **kw
        )
        self.delivered[ip] = []
        self.events[ip] = []
        return self.pods[ip]

    def send(self, pod: str, dst: str, packet: bytes) -> None:
        self.pods[pod].send(dst, packet, self.now, self.wall)

    def pump(self, hold: bool = False) -> list[tuple[bytes, str, str]]:
        """Deliver until quiet; with ``hold``, return one round of datagrams undelivered."""
        for _ in range(100):
            batch = []
            for ip, t in self.pods.items():
                self.events[ip] += t.pop_events()
                batch += [(d, ip, addr[0]) for d, addr in t.pop_transmits()]
            if hold or not batch:
                return batch
            for datagram, src, dst in batch:
                self.deliver(datagram, src, dst)
        raise AssertionError("the tunnels never went quiet")

    def deliver(self, datagram: bytes, src: str, dst: str) -> bytes | None:
        self.wire.append((datagram, src, dst))
        if wire.message_type(datagram) in self.block:
            return None
        pod = self.vips.get(dst, dst)
        if pod != dst:
            self.conntrack[(src, pod)] = dst
        seen_from = self.conntrack.get((dst, src), src)  # a reply comes back from the VIP
        t = self.pods.get(pod)
        if t is None:
            return None
        out = t.receive(datagram, (seen_from, PORT), self.now, self.wall)
        if out is not None:
            self.delivered[pod].append(out)
        return out

    def advance(self, seconds: float) -> None:
        """Move both clocks, running every timer that falls due on the way."""
        end = self.now + seconds
        for _ in range(10_000):  # a timer that never stops firing is a bug: fail, not hang
            due = min(
                (t for t in (p.next_timer() for p in self.pods.values()) if t is not None),
                default=None,
            )
            step_to = end if due is None or due > end else max(due, self.now)
            self.wall += step_to - self.now
            self.now = step_to
            for t in self.pods.values():
                t.on_timer(self.now, self.wall)
            self.pump()
            if step_to >= end:
                return
        raise AssertionError("timers kept firing at the same instant")

    def response_indices(self) -> list[int]:
        """Receiver index of every response on the wire: the initiator's new session index."""
        return [
            struct.unpack_from("<I", d, 4)[0]
            for d, _, _ in self.wire
            if wire.message_type(d) == wire.TYPE_RESPONSE
        ]

    def data_indices(self, src: str) -> list[int]:
        """Receiver index of every data message (keepalives excluded) ``src`` put on the wire."""
        return [
            wire.parse_header(d)[0]
            for d, s, _ in self.wire
            if s == src and wire.message_type(d) == wire.TYPE_DATA and len(d) > wire.DATA_OVERHEAD
        ]


def new_net(limits: Limits = FAST, pods: tuple[str, ...] = (A, B)) -> Net:
    net = Net(limits)
    for pod in pods:
        net.add(pod)
    return net


def connect(net: Net, dst: str = B) -> None:
    net.send(A, dst, ipv4(A, dst, b"hello"))
    net.pump()
    assert net.delivered[B] == [ipv4(A, dst, b"hello")]
    net.delivered[B].clear()


def handled(t: Tunnel) -> int:
    return sum(
        t.stats.get(k)
        for k in (
            "packets_opened",
            "handshakes_responded",
            "handshakes_completed",
            "keepalives_received",
        )
    )


def fast(**changes: float) -> Limits:
    """FAST with some limits changed."""
    return dataclasses.replace(FAST, **changes)
