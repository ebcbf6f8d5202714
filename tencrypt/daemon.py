"""`tencrypt run`: the proxy in one pod's network namespace — the composition root.

It owns the event loop (uvloop), the file descriptors and the order of things; the pure core
decides. Two pipelines, each read top to bottom, each stage taking what the previous returned:

Outbound, when tenc0 is readable (`_on_tun`):
 1. read up to BATCH frames from tenc0 — on the batch path (default) TCP super-packets of up
    to 64 KiB behind a virtio-net header, otherwise one packet each;
 2. a super-packet: NAT out once, then split into MSS-sized segments (headers and checksums
    computed for all of them at once, core.batch) that all go to step 4 together; any other
    packet gets its checksum completed, and: not IPv4 -> dropped; a DF packet above tenc0's
    MTU -> ICMP "fragmentation needed" back (path-MTU discovery); a SYN -> MSS clamped;
 3. NAT out: replies of flows that came in through the tunnel get their Service VIP back as source;
 4. classify the destination: a tunnel peer or an address the DNS proxy called internal -> seal,
    each segment its own datagram (`Tunnel.send`); external -> re-sent in the clear out of the
    uplink (bypass socket); not yet known -> held while a reverse (PTR) lookup decides;
 5. flush: the datagrams the tunnel produced go out of the UDP socket, a run to one peer as
    one UDP GSO `sendmsg` on the batch path.
Inbound, when the UDP socket is readable (`_on_udp`):
 1. receive up to BATCH datagrams (UDP GRO: many per call on the batch path);
 2. `Tunnel.receive`: authenticate, replay window, handshakes (every failure a counted drop);
    peer events (routes, firewall) are applied at once: the reply to this packet needs them;
 3. on the batch path, consecutive segments of one TCP flow are coalesced again (core.batch);
 4. NAT in: Service VIP -> this pod's IP, flow remembered (once per coalesced packet);
 5. inject: on the batch path as TSO frames written to tenc0 (the kernel completes the TCP
    checksum), otherwise through the raw socket; either way the packet arrives like any other;
 6. flush replies (handshake responses, keepalives).
Timers (`_timer_loop`): handshake retries, keepalives, re-keys, flow and DNS expiry.

Shutdown (SIGTERM/SIGINT): stop reading, close the DNS proxy, remove the routes and firewall
rules added at run time; `tencrypt setup --undo` then restores the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from tencrypt.core.batch import (
    VNET_HDR_LEN,
    build_gso_vnet_hdr,
    coalesce_batch,
    rewrite_partial_csum,
    split_tcp_batch,
)
from tencrypt.core.classify import AddrClass, Change
from tencrypt.core.nat import FlowTable
from tencrypt.core.packet import build_icmp_frag_needed, rewrite_tcp_mss
from tencrypt.core.podconfig import PodConfig, in_cidr
from tencrypt.core.psk import parse_psk
from tencrypt.core.session import Limits, PeerDown, PeerUnreachable, PeerUp, Tunnel
from tencrypt.core.stats import DropReason, Stats, render_prometheus
from tencrypt.errors import UsageError
from tencrypt.linux import firewall, metrics, netlink, podnet, sockets
from tencrypt.linux.classroutes import RouteApplier
from tencrypt.linux.dns import DnsProxy
from tencrypt.linux.gso import UdpBatch
from tencrypt.linux.tun import READ_SIZE, Tun
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.run")
BATCH = 64  # packets or datagrams handled per readiness event before yielding to the loop
HOLD_LIMIT = 64  # packets held per destination while a PTR lookup classifies it
PLAINTEXT_FOR = 60.0  # --no-strict: seconds an internal peer without a proxy is reached in clear
NO_STRICT_GIVE_UP = 5.0  # --no-strict: seconds of unanswered handshakes before the clear


def read_psk(args: argparse.Namespace) -> bytes | None:
    """The project key from --psk-file or TENCRYPT_PROJECT_PSK (never argv)."""
    if args.psk_file:
        try:
            text = Path(args.psk_file).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read --psk-file {args.psk_file}: {exc.strerror}") from exc
        return parse_psk(text)
    env = os.environ.get("TENCRYPT_PROJECT_PSK")
    return parse_psk(env) if env else None


class Proxy:
    def __init__(self, config: PodConfig, psk: bytes, strict: bool, stats: Stats,
                 limits: Limits | None = None, batch: bool = True) -> None:
        self.config = config
        self.strict = strict
        self.batch = batch
        self.split_buffer = bytearray(2 * 65536)  # reused by every split (core.batch)
        self.read_buffer = bytearray(READ_SIZE)  # reused by every read from tenc0
        self.read_view = memoryview(self.read_buffer)
        self.inject_via_tun = batch  # measured: cheaper than the raw socket (bench/batch_micro.py)
        self.stats = stats
        self.tunnel = Tunnel(psk, config.pod_ip, stats, limits or Limits(), port=config.port)
        self.flows = FlowTable(config.pod_ip, config.service_cidr, stats)
        self.peer_routes: set[str] = set()
        # the DNS proxy's /32s; a peer's route (same kernel route) is the daemon's to remove
        self.routes = RouteApplier(config, stats, pinned=self.peer_routes.__contains__)
        self.dns = DnsProxy(config, stats, on_change=self._on_dns_change)
        self.firewall = firewall.StrictFirewall(config.dev, config.port) if strict else None
        self.ratelog = RateLimitedLog(log)
        self.held: dict[str, list[bytes]] = {}
        self.plaintext_until: dict[str, float] = {}
        self.stopping = asyncio.Event()
        self.tun: Tun | None = None
        self.udp: socket.socket | None = None
        self.udp_batch: UdpBatch | None = None
        self.inject: socket.socket | None = None
        self.bypass: socket.socket | None = None

    # ---- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        self.tun = Tun(c.tun, vnet_hdr=self.batch)
        self.udp = sockets.tunnel_socket(c.port, c.fwmark)
        self.udp_batch = UdpBatch(self.udp, self.stats, gso=self.batch, gro=self.batch)
        log.info("data path: %s (UDP GSO %s, GRO %s)", "batch" if self.batch else "one packet",
                 "on" if self.udp_batch.gso else "off", "on" if self.udp_batch.gro else "off")
        self.inject = sockets.raw_socket()
        self.bypass = sockets.raw_socket(mark=c.fwmark)
        if self.firewall:
            self.firewall.install()
        await self.dns.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.tun.fileno(), self._on_tun)
        loop.add_reader(self.udp.fileno(), self._on_udp)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for obj in (self.tun, self.udp):
            if obj is not None:
                loop.remove_reader(obj.fileno())
        await self.dns.close()
        self.routes.close()
        for ip in self.peer_routes:
            netlink.remove_route(ip)
        if self.firewall:
            firewall.remove_table()
        for obj in (self.tun, self.udp, self.inject, self.bypass):
            if obj is not None:
                obj.close()

    # ---- outbound: tenc0 -> classify -> seal -> udp -------------------------------------
    def _on_tun(self) -> None:
        assert self.tun is not None
        now, wall = time.monotonic(), time.time()
        # every frame is read into one reused buffer and rewritten in place: whatever must
        # outlive this iteration (queued, held) is copied by its keeper
        read, view = self.tun.readinto, self.read_view
        for _ in range(BATCH):
            n = read(self.read_buffer)
            if not n:
                break
            frame = view[:n]
            if not self.batch:
                self._outbound(frame, now, wall)
            elif frame[1]:  # virtio-net gso_type: a TCP super-packet
                self._outbound_super(frame, now, wall)
            else:  # one packet, its checksum completed (the kernel may leave it partial)
                for pkt in split_tcp_batch(frame, self.stats):
                    self._outbound(pkt, now, wall)
        self._flush()

    def _outbound(self, buf: bytearray | memoryview, now: float, wall: float) -> None:
        if len(buf) < 20 or buf[0] >> 4 != 4:
            self.stats.drop(DropReason.MALFORMED_PACKET)
            return
        mtu = self.config.mtu
        if len(buf) > mtu:
            self._too_big(buf, mtu)
            return
        if buf[9] == 6:
            rewrite_tcp_mss(buf, mtu - 40)
        if self.flows.rewrite_outbound(buf, now):  # False: malformed, counted
            self._dispatch(socket.inet_ntoa(buf[16:20]), buf, now, wall)

    def _outbound_super(self, frame: memoryview, now: float, wall: float) -> None:
        """NAT and classify once per super-packet; split recomputes every checksum after."""
        if len(frame) < VNET_HDR_LEN + 20 or frame[VNET_HDR_LEN] >> 4 != 4:
            self.stats.drop(DropReason.MALFORMED_PACKET)
            return
        if not self.flows.rewrite_outbound(frame[VNET_HDR_LEN:], now):
            return
        dst = socket.inet_ntoa(frame[VNET_HDR_LEN + 16:VNET_HDR_LEN + 20])
        segments = split_tcp_batch(frame, self.stats, self.split_buffer)
        self.stats.inc("super_packets_split")
        if self.tunnel.knows(dst):  # the common case: a peer with a session
            self.tunnel.send_batch(dst, segments, now, wall)
            return
        for seg in segments:
            self._dispatch(dst, seg, now, wall)

    def _too_big(self, buf: bytearray | memoryview, mtu: int) -> None:
        self.stats.drop(DropReason.TOO_BIG)
        if buf[6] & 0x40:  # DF: tell the sender, as a router would (RFC 1191)
            icmp = build_icmp_frag_needed(bytes(buf), mtu, self.config.pod_ip)
            if icmp:
                self._send_raw(self.inject, icmp)

    def _dispatch(self, dst: str, buf: bytearray | memoryview, now: float, wall: float) -> None:
        if self.tunnel.knows(dst):
            self.tunnel.send(dst, buf, now, wall)
            return
        cls = self.dns.lookup(dst, now)
        if cls is AddrClass.INTERNAL:
            self._seal(dst, buf, now, wall)
        elif cls is AddrClass.EXTERNAL or not in_cidr(dst, self.config.service_cidr):
            self.stats.inc("packets_bypassed")
            self._send_raw(self.bypass, buf)
        else:
            self._hold(dst, bytes(buf))

    def _seal(self, dst: str, pkt: bytes | bytearray | memoryview, now: float, wall: float) -> None:
        """An internal destination: sealed, unless --no-strict found no proxy there lately."""
        if self.plaintext_until.get(dst, 0.0) > now:
            self.stats.inc("packets_plaintext_fallback")
            self._send_raw(self.bypass, pkt)
        else:
            self.tunnel.send(dst, pkt, now, wall)

    def _hold(self, dst: str, pkt: bytes) -> None:
        """Keep packets for an unclassified address while a reverse lookup decides."""
        queue = self.held.get(dst)
        if queue is None:
            self.held[dst] = [pkt]
            asyncio.get_running_loop().create_task(self._classify_held(dst))
        elif len(queue) < HOLD_LIMIT:
            queue.append(pkt)
        else:
            self.stats.drop(DropReason.QUEUE_FULL)

    async def _classify_held(self, dst: str) -> None:
        try:
            cls = await self.dns.classify_address(dst)
        except Exception:  # a failed lookup must not strand the packets: treat as unknown
            log.exception("reverse lookup of %s failed", dst)
            cls = None
        now, wall = time.monotonic(), time.time()
        for pkt in self.held.pop(dst, []):
            if cls is AddrClass.INTERNAL:
                self._seal(dst, pkt, now, wall)
            else:  # external or unknown: never sealed to a pod that may have no proxy
                self.stats.inc("packets_bypassed")
                self._send_raw(self.bypass, pkt)
        self._flush()

    # ---- inbound: udp -> open -> nat -> inject ------------------------------------------
    def _on_udp(self) -> None:
        assert self.udp_batch is not None
        now, wall = time.monotonic(), time.time()
        opened: list[bytes] = []
        for _ in range(BATCH):
            try:
                got = self.udp_batch.recv_batch()
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                self.ratelog.warn("udp-error", "tunnel socket: %s", exc)
                continue
            if got is None:
                break
            datagrams, addr = got
            for data in datagrams:
                pkt = self.tunnel.receive(data, addr, now, wall)
                if self.tunnel.table.events:  # before injecting: a PeerUp routes the reply
                    for event in self.tunnel.pop_events():
                        self._on_peer_event(event)
                if pkt is not None:
                    opened.append(pkt)
            if len(opened) >= BATCH:
                self._inject(opened, now)
                opened = []
        self._inject(opened, now)
        self._flush()

    def _inject(self, packets: list[bytes], now: float) -> None:
        """NAT in and inject. The batch path merges a flow's consecutive segments first (NAT
        and the system call then cost once per merged packet) and writes them to tenc0 as TSO
        frames whose TCP checksum the kernel completes (CHECKSUM_PARTIAL): no 64 KiB checksum
        in Python. The one-packet path and the fallback inject through the raw socket."""
        if not self.inject_via_tun:
            merged = [c.packet for c in coalesce_batch(packets)] if self.batch else packets
            for pkt in merged:
                buf = pkt if isinstance(pkt, bytearray) else bytearray(pkt)
                if self.flows.rewrite_inbound(buf, now):
                    self._send_raw(self.inject, buf)
            return
        assert self.tun is not None
        for pkt, gso_size in coalesce_batch(packets, partial=True):
            buf = pkt if isinstance(pkt, bytearray) else bytearray(pkt)
            if not self.flows.rewrite_inbound(buf, now):
                continue
            if gso_size:
                rewrite_partial_csum(buf)
            try:
                self.tun.write_frame(build_gso_vnet_hdr(buf, gso_size), buf)
            except OSError as exc:  # a kernel that refuses TSO frames: raw socket from now on
                log.warning("writing to %s refused (%s): injecting through the raw socket",
                            self.config.tun, exc)
                self.inject_via_tun = False
                self.stats.inc("tun_inject_errors")

    # ---- shared --------------------------------------------------------------------------
    def _send_raw(self, sock: socket.socket | None, buf: bytes | bytearray | memoryview) -> None:
        assert sock is not None
        try:
            sock.sendto(buf, (socket.inet_ntoa(buf[16:20]), 0))
        except OSError as exc:
            self.ratelog.warn("raw-" + str(exc.errno), "raw send failed: %s", exc)

    def _flush(self) -> None:
        assert self.udp_batch is not None
        transmits = self.tunnel.pop_transmits()
        if transmits:
            try:
                sent = self.udp_batch.send_many(transmits)
            except OSError as exc:
                self.ratelog.warn("udp-send-" + str(exc.errno), "tunnel send failed: %s", exc)
                sent = 0
            if sent < len(transmits):
                self.stats.inc("datagrams_send_dropped", len(transmits) - sent)
        for event in self.tunnel.pop_events():
            self._on_peer_event(event)

    def _on_peer_event(self, event: object) -> None:
        if isinstance(event, PeerUp):
            log.info("peer %s up (endpoint %s:%d)", event.pod_ip, *event.endpoint)
            if not in_cidr(event.pod_ip, self.config.service_cidr) and event.pod_ip != self.config.pod_ip:
                netlink.ensure_route(event.pod_ip, dev=self.config.tun, src=self.config.pod_ip)
                self.peer_routes.add(event.pod_ip)
            if self.firewall:
                self.firewall.add([event.pod_ip])
        elif isinstance(event, PeerUnreachable):
            if self.strict:
                self.ratelog.warn("unreachable", "no tencrypt proxy answers at %s: strict mode "
                                  "refuses plaintext to this project's pods", ", ".join(event.addresses))
            else:
                log.warning("no tencrypt proxy answers at %s: --no-strict, in the clear for %.0f s",
                            ", ".join(event.addresses), PLAINTEXT_FOR)
                until = time.monotonic() + PLAINTEXT_FOR
                self.plaintext_until.update((a, until) for a in event.addresses)
        elif isinstance(event, PeerDown):
            log.info("peer %s down", event.pod_ip)
            if event.pod_ip in self.peer_routes:
                self.peer_routes.discard(event.pod_ip)
                netlink.remove_route(event.pod_ip)

    def _on_dns_change(self, changes: list[Change]) -> None:
        self.routes.on_change(changes)
        if not self.firewall:
            return
        self.firewall.add(c.ip for c in changes if c.new is AddrClass.INTERNAL)
        self.firewall.discard(c.ip for c in changes
                              if c.new is not AddrClass.INTERNAL and c.ip not in self.peer_routes)

    async def timers(self) -> None:
        last_expiry = 0.0
        while not self.stopping.is_set():
            now, wall = time.monotonic(), time.time()
            self.tunnel.on_timer(now, wall)
            self._flush()
            if now - last_expiry > 5.0:
                self.flows.expire(now)
                last_expiry = now
            deadline = self.tunnel.next_timer()
            wait = 1.0 if deadline is None else min(1.0, max(0.01, deadline - now))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)

    def render_metrics(self) -> str:
        return render_prometheus(self.stats, {
            "sessions": self.tunnel.session_count(), "peers": self.tunnel.peer_count(),
            "flow_table_entries": len(self.flows), "dns_table_entries": self.dns.table_size(),
        })


async def serve(args: argparse.Namespace) -> int:
    config = podnet.load_config(args.state_dir)
    psk = read_psk(args)
    if psk is None:
        raise UsageError("no project key: pass --psk-file FILE or set TENCRYPT_PROJECT_PSK")
    strict = True if args.strict is None else args.strict
    # without strict mode an unpatched peer is reached in the clear once the handshake gives
    # up: give up early enough for a TCP connect to survive it
    limits = Limits() if strict else Limits(handshake_give_up=NO_STRICT_GIVE_UP)
    proxy = Proxy(config, psk, strict, Stats(), limits, batch=args.batch)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.stopping.set)
    pid_file = podnet.namespace_state_dir(args.state_dir) / podnet.PID_FILE
    await proxy.start()
    server = await metrics.serve(args.metrics, proxy.render_metrics) if args.metrics else None
    pid_file.write_text(f"{os.getpid()}\n")
    print(f"tencrypt: ready: pod {config.pod_ip}, project {config.domain}, udp :{config.port}, "
          f"{'strict' if strict else 'not strict'}", file=sys.stderr, flush=True)
    try:
        await proxy.timers()
    finally:
        log.info("shutting down")
        if server:
            server.close()
        await proxy.stop()
        pid_file.unlink(missing_ok=True)
    log.info("stopped; counters: %s", proxy.stats.counters)
    return 0


def main(args: argparse.Namespace) -> int:
    import uvloop

    return uvloop.run(serve(args))
