"""In-memory stand-ins for what the proxy reads from and writes to (tencrypt.ports), so the
daemon's pipelines run in unit tests without root, the way wireguard-go's tuntest/bindtest do.

    [app A]--FakeTun--Proxy A--FakeUdp--+   Wire: delivers datagrams, DNATs VIP:1337 to   +--...B
                          FakeRaw x2    +-- the pod behind it, replies come back from the VIP
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tencrypt.core.classify import AddrClass, ClassTable, Domains, RouteAction
from tencrypt.core.conntrack import ServiceFlows
from tencrypt.core.membership import Members
from tencrypt.core.packet import checksum
from tencrypt.core.peer import Transmit
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.psk import parse_psk
from tencrypt.core.session import Limits, datagrams_of
from tencrypt.core.stats import Stats
from tencrypt.daemon import Proxy
from tencrypt.errors import SetupError
from tencrypt.linux.members import MembersFile, write_members
from tencrypt.ports import Ports

PSK = parse_psk("AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=")
SERVICE_CIDR, POD_CIDR = "172.30.0.0/16", "10.128.0.0/14"
DOMAIN = "shop.svc.cluster.local"


def udp_packet(
    src: str,
    dst: str,
    payload: bytes = b"ping",
    sport: int = 40000,
    dport: int = 9999,
    df: bool = False,
) -> bytes:
    """An IPv4/UDP packet with correct checksums."""
    length = 8 + len(payload)
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    pseudo = s + d + struct.pack("!BBH", 0, 17, length)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000 if df else 0, 64, 17, 0, s, d
    )
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + udp


class FakeKernel:
    """A main table (``routes``) and the firewall's sets (``fw``) as plain containers; refuses
    the routes in ``refuse_routes`` and the next ``refuse_changes`` transactions."""

    def __init__(self, refuse_routes=(), refuse_changes=0):
        self.routes: dict[str, RouteAction] = {}
        self.fw: set[str] = set()
        self.refuse_routes, self.refuse_changes = set(refuse_routes), refuse_changes

    def install_firewall(self):
        pass

    def remove_firewall(self):
        self.fw.clear()

    def route(self, ip, action):
        if ip in self.refuse_routes:
            raise SetupError(f"netlink refused {ip}")
        self.routes[ip] = action

    def unroute(self, ip):
        self.routes.pop(ip, None)

    def change(self, add, delete):
        if self.refuse_changes:
            self.refuse_changes -= 1
            raise SetupError("nft refused")
        if set(delete) - self.fw:  # nft refuses deleting a missing element
            raise SetupError("no such element")
        self.fw.difference_update(delete)
        self.fw.update(add)

    def elements(self):
        return set(self.fw)

    def counters(self):
        return {"refused_out_ipv4": 3}

    def open_inbound_queue(self, stats):
        self.queue = FakeQueue()
        return self.queue

    def open_outbound_queue(self, stats):
        self.out_queue = FakeQueue()
        return self.out_queue


class FakeQueue:
    """NFQUEUE: packets the kernel holds (``held``) and the verdicts given (``given``)."""

    def __init__(self):
        self.held: list = []
        self.given: dict[int, bool] = {}
        self.closed = False

    def fileno(self):
        return -3

    def read_batch(self, max_packets=64):
        out, self.held = self.held[:max_packets], self.held[max_packets:]
        return out

    def verdicts(self, decisions):
        self.given.update(decisions)

    def close(self):
        self.closed = True


class FakeTun:
    def __init__(self) -> None:
        self.inbox: deque[bytes] = deque()  # what the app sends (read by the proxy)
        self.written: list[tuple[bytes, bytes]] = []  # (vnet header, packet) injected
        self.refuse_frames = False

    def fileno(self) -> int:
        return -1

    def readinto(self, buf: bytearray) -> int:
        if not self.inbox:
            return 0
        data = self.inbox.popleft()
        buf[: len(data)] = data
        return len(data)

    def write_frame(self, vnet_hdr: bytes, packet: bytes | bytearray | memoryview) -> None:
        if self.refuse_frames:
            raise OSError(22, "Invalid argument")
        self.written.append((bytes(vnet_hdr), bytes(packet)))

    def close(self) -> None:
        pass


class FakeUdp:
    gso = gro = False

    def __init__(self) -> None:
        self.inbox: deque[tuple[list[bytes], Any]] = deque()
        self.sent: list[tuple[bytes, Any]] = []

    def fileno(self) -> int:
        return -2

    def recv_batch(self) -> tuple[list[memoryview], Any] | None:
        if not self.inbox:
            return None
        datagrams, addr = self.inbox.popleft()
        return [memoryview(d) for d in datagrams], addr

    def send_runs(self, runs: Sequence[Transmit]) -> int:
        sent = [(bytes(d), a) for d, a in datagrams_of(runs)]
        self.sent += sent
        return len(sent)

    def close(self) -> None:
        pass


class FakeRaw:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes | bytearray | memoryview, addr: tuple[str, int]) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def close(self) -> None:
        pass


class FakeResolver:
    """The DNS proxy as the data path sees it: its table, and reverse lookups answered from
    ``ptr`` (address -> class, or None for "no record")."""

    def __init__(self, ptr: dict[str, AddrClass | None] | None = None, clock: Any = None) -> None:
        self.clock = clock or (lambda: 0.0)
        self.table = ClassTable(Domains.of(DOMAIN, "cluster.local"), min_ttl=1)
        self.on_change: Any = None
        self.pending_effects: Any = None
        self.applied = 0  # effects_applied calls
        self.ptr = ptr or {}
        self.asked: list[str] = []

    async def classify_address(self, ip: str) -> AddrClass | None:
        self.asked.append(ip)
        cls = self.ptr.get(ip)
        if cls is not None:
            changes = self.table.learn(ip, cls, 60, self.clock())
            if self.on_change:
                self.on_change(changes)
        return cls

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def effects_applied(self) -> None:
        self.applied += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pod_config(ip: str) -> PodConfig:
    return PodConfig(
        pod_ip=ip,
        dev="eth0",
        gateway="10.128.0.1",
        dns="172.30.0.2",
        domain=DOMAIN,
        search=(DOMAIN,),
        cluster_domain="cluster.local",
        service_cidr=SERVICE_CIDR,
        pod_cidrs=(POD_CIDR,),
        mtu=1440,
    )


class Pod:
    """One proxy with fake ports, a fake kernel and a settable clock."""

    def __init__(
        self,
        ip: str,
        *,
        strict: bool = True,
        batch: bool = False,
        ptr: dict[str, AddrClass | None] | None = None,
        limits: Limits | None = None,
        members: Members | None = None,
        rng: Any = None,
        config: PodConfig | None = None,
    ) -> None:
        """``members``: a membership file the proxy finds at start (the agent's part);
        ``rng``: the Service translation's endpoint choice (default: always the first);
        ``config``: another PodConfig than ``pod_config(ip)`` (e.g. a dual-stack pod's)."""
        self.ip = ip
        self.tun, self.udp, self.inject, self.bypass = FakeTun(), FakeUdp(), FakeRaw(), FakeRaw()
        self.kernel, self.clock = FakeKernel(), Clock()
        self.resolver = FakeResolver(ptr, self.clock)
        self.stats = Stats()
        self._members_tmp = tempfile.TemporaryDirectory(prefix="tencrypt-fake-members-")
        self.members_dir = Path(self._members_tmp.name)  # removed with the Pod
        if members is not None:
            write_members(self.members_dir, members)
        self.proxy = Proxy(
            config or pod_config(ip),
            PSK,
            strict,
            self.stats,
            Ports(self.tun, self.udp, self.inject, self.bypass),
            self.resolver,
            self.kernel,
            limits=limits,
            batch=batch,
            clock=self.clock,
            wall=lambda: 1_700_000_000.0 + self.clock.now,
            members=MembersFile(self.members_dir / "members.json"),
            services=ServiceFlows(self.stats, rng or (lambda bound: 0)),
        )

    def set_members(self, members: Members) -> None:
        """The agent writes a new membership file; the proxy's next sweep reads it."""
        write_members(self.members_dir, members)
        self.proxy._poll_members(self.clock.now)

    def app_sends(self, packet: bytes) -> None:
        self.tun.inbox.append(packet)
        self.proxy._on_tun()


class Wire:
    """Delivers what proxies send: VIP:1337 is DNATed to the pod behind it, and a reply to a
    client that asked a VIP comes back from the VIP (as conntrack does)."""

    def __init__(self, *pods: Pod, vips: dict[str, str] | None = None) -> None:
        self.pods = {p.ip: p for p in pods}
        self.vips = vips or {}
        self.conntrack: dict[tuple[str, str], str] = {}
        self.dropped_port = False  # lose every datagram (UDP 1337 blocked on the node)

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for src, pod in self.pods.items():
                sent, pod.udp.sent = pod.udp.sent, []
                for datagram, (dst, port) in sent:
                    moved = True
                    if self.dropped_port:
                        continue
                    target = self.vips.get(dst, dst)
                    if target != dst:
                        self.conntrack[(src, target)] = dst
                    seen_from = self.conntrack.get((dst, src), src)
                    if target in self.pods:
                        self.pods[target].udp.inbox.append(([datagram], (seen_from, port)))
                        self.pods[target].proxy._on_udp()
            if not moved:
                return
        raise AssertionError("the proxies never went quiet")


async def until(predicate: Callable[[], object], rounds: int = 2000) -> None:
    """Let the loop run until ``predicate()`` holds (a bound on loop turns, never on time)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")
