"""The proxy in one pod's network namespace: a pump. The pure core decides (``core.dispatch``
what happens to every packet from tenc0, ``core.session`` the tunnel); ``Proxy`` executes,
with the control plane (membership, keys, peer events, timers) in tencrypt/control.py and
its composition root in tencrypt/runcmd.py (unit tests hand it in-memory ports instead).

Outbound, when tenc0 is readable (``_on_tun``):
 1. read up to BATCH frames — on the batch path (default) TCP super-packets of up to 64 KiB
    behind a virtio-net header, otherwise one packet each;
 2. per packet: not IPv4 or IPv6 -> dropped; a DF packet (every IPv6 one) above tenc0's MTU
    -> ICMP "fragmentation needed" (ICMPv6 Packet Too Big) back, from the pod's address of
    its family (path-MTU discovery); a SYN -> MSS clamped (MTU - 40, IPv6 20 less);
 3. standalone's receiver NAT: replies of flows that came in for a VIP get it back (core.nat);
 4. ``Dispatcher.route``, once per super-packet before its split: cluster mode's Service
    translation (cluster IP:port -> the flow's endpoint:target port), then the verdict and
    the pod's egress NetworkPolicy for a new flow to the tunnel, executed by ``_act``: SEAL
    -> one datagram per segment, sealed by one call of the selected backend
    (``Tunnel.send_batch``, tencrypt/fastpath.py); CLEAR -> out of the uplink; HOLD -> kept
    while a reverse (PTR) lookup decides; WAIT -> kept until the membership lists a new
    Service; REFUSE, DENY -> ICMP "administratively prohibited"; REJECT -> ICMP "port
    unreachable" (no endpoint). Nothing leaves in the clear unless positively external;
 5. flush: the tunnel's datagrams out of the UDP socket, a run to one peer as one UDP GSO send.
    The tunnel's family is the pod's primary one (``PodConfig.version``): UDP/IPv4, or
    UDP/IPv6 on an IPv6-only pod, where every peer is an IPv6 address and ``_seal`` maps
    nothing (an IPv4 packet there has no tunnel address: refused, counted).
Inbound, when the UDP socket is readable (``_on_udp``):
 1. receive up to BATCH datagrams (UDP GRO: many per call on the batch path);
 2. ``Tunnel.receive_batch``: authenticate, replay window, handshakes (every failure a
    counted drop); a PeerUp is evidence (the peer's pod IP is internal) and wants a /32;
 3. a packet from a peer whose /32 into tenc0 is not in place yet waits for it (the reply
    must not take the uplink, where the firewall would refuse it);
 4. on the batch path, consecutive segments of one TCP flow are coalesced (core.batch);
 5. once per coalesced packet: standalone's VIP -> this pod's IP (core.nat); the pod's
    ingress NetworkPolicy for a new flow (denied: dropped, counted), then cluster mode's
    endpoint -> the cluster IP and port the app used (``Dispatcher.admit``);
 6. inject: TSO frames written to tenc0 on the batch path (the kernel completes the TCP
    checksum), otherwise through the raw socket; 7. flush replies (handshakes, keepalives).
The express lane (core/express.py, tencrypt/_lane.c; on unless ``--no-express``, an IPv6
tunnel, ``--no-batch`` or the pure backend): each readiness of tenc0 or of the UDP socket is
one C call that seals (opens) the packets of the flows ``_outbound`` learnt and hands back
the first it cannot take, which then takes the steps above; a super-packet or a GRO read
handed back lets the Python loop go on reading. Its tables are flushed on a new membership
and on peer events. It follows the read rule below: cold, it stops after a first packet of at
most LONE_BYTES that it took. With the loop's selector given (``tencrypt run``), the lane also
does the loop's epoll call (``_lane_wait``, linux/spin.py rule 5): a readiness of tenc0 or the
socket is served in C by one pump, by the read rule below (hot: the descriptor was served
within QUIET, so a stream such as a bulk transfer's ACKs is read until EAGAIN; cold: a lone
small packet is read alone, the next one being the next epoll call, in C too), and only what
it hands back or counts reaches the readers above, through the pump's next call; the socket
is served only while no sender waits for its route (``_udp_lane_ok``).
Reads (READS), both directions: level-triggered readiness, so a reader may stop at any point
and the loop calls it again while anything waits. A reader is hot when, within QUIET before
it starts, either reader met a burst (more than one read with data, a super-packet, a GRO
run) or this reader stopped early (below); hot, it reads until EAGAIN or BATCH: a bulk
transfer pays one readiness event per batch, and its small packets the other way (ACKs) are
not read one per loop turn behind it. Otherwise (idle, or one packet each way as in a
request and its answer), when its first read is a lone small packet (not a super-packet; one
datagram, not a GRO run), it stops there: the read that would only find EAGAIN costs 10-25
µs cold, on every hop of a sparse call (bench/results/cold-path.md). If more was queued, the
loop calls it again at once, and it is hot then.
Start: the firewall is checked (setup installed it), what a previous run left in its sets is
adopted, the membership loaded and applied — all before the first packet is read. Stop:
stop reading, close the DNS proxy, remove the /32s added at run time; the firewall stays
until `tencrypt setup --undo`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from tencrypt import fastpath, observe
from tencrypt.control import ControlPlane
from tencrypt.core.batch import (
    VNET_HDR_LEN,
    build_gso_vnet_hdr,
    coalesce_batch,
    is_super_packet,
    rewrite_partial_csum,
    split_tcp_batch,
)
from tencrypt.core.classify import ClassTable
from tencrypt.core.clustershape import claim_policy
from tencrypt.core.conntrack import ServiceFlows
from tencrypt.core.dispatch import Dispatcher, Out
from tencrypt.core.effects import Desired
from tencrypt.core.express import Express, read_datagrams
from tencrypt.core.holdqueue import HoldQueue
from tencrypt.core.keyring import KeyRing
from tencrypt.core.nat import FlowTable
from tencrypt.core.packet import (
    TCP,
    build_icmp_admin_prohibited,
    build_icmp_frag_needed,
    build_icmp_port_unreachable,
    dont_fragment,
    ip_proto,
    ip_version,
    rewrite_tcp_mss,
)
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.policy import Guard
from tencrypt.core.session import Limits, Tunnel
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.linux.effects import EffectApplier, Kernel
from tencrypt.linux.keyfile import KeyFile
from tencrypt.linux.members import MembersFile
from tencrypt.linux.spin import SpinSelector
from tencrypt.linux.tun import READ_SIZE
from tencrypt.logutil import RateLimitedLog
from tencrypt.ports import Ports, RawSocket, Resolver

if TYPE_CHECKING:  # imported by start() only in standalone strict mode (nfqueue, its parser)
    from tencrypt.linux.inbound import InboundGate

log = logging.getLogger("tencrypt.run")
BATCH = 64  # packets or datagrams handled per readiness event before yielding to the loop
QUIET = 200e-6  # seconds a burst, or a reader's early stop, keeps the readers hot (READS)
LONE_BYTES = 256  # express lane: a first packet this small, taken while cold, is read alone
HOLD_PER_PEER = 64  # opened packets waiting for their sender's route, per peer
HOLD_TOTAL = 4096  # ... and in total
NO_STRICT_GIVE_UP = 5.0  # --no-strict: seconds of unanswered handshakes before the clear
ADOPTED_EVIDENCE = 3600.0  # seconds what a previous run put in the firewall stays internal


class Proxy(ControlPlane):
    def __init__(
        self,
        config: PodConfig,
        psk: bytes | KeyRing,
        strict: bool,
        stats: Stats,
        ports: Ports,
        resolver: Resolver,
        kernel: Kernel,
        *,
        limits: Limits | None = None,
        batch: bool = True,
        members: MembersFile | None = None,
        keyfile: KeyFile | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        services: ServiceFlows | None = None,
        express: bool = False,
        selector: SpinSelector | None = None,
    ) -> None:
        self.config, self.strict, self.batch, self.stats = config, strict, batch, stats
        self.ports, self.resolver, self.kernel, self.members = ports, resolver, kernel, members
        self.keyfile, self.loaded_dir = keyfile, None  # where the agent reads the ring loaded
        self.clock, self.wall = clock, wall
        self.split_buffer = bytearray(2 * 65536)  # reused by every split (core.batch)
        self.read_buffer = bytearray(READ_SIZE)  # reused by every read from tenc0
        self.read_view = memoryview(self.read_buffer)
        # READS: when a reader last met a burst, when each last stopped after a lone packet
        self.busy = self.tun_cut = self.udp_cut = float("-inf")
        self.inject_via_tun = batch  # measured: cheaper than the raw socket (bench/batch_micro.py)
        self.tunnel = Tunnel(
            psk,
            config.pod_ip,
            stats,
            limits or Limits(),
            port=config.port,
            identity=claim_policy(config, self._is_member, config.pod_cidrs),
            secondary_ip=config.pod_ip6 or None,
        )
        self.flows = FlowTable(config.pod_ips, config.service_cidrs, stats)
        self.table: ClassTable = resolver.table
        self.table.reserved = config.is_boundary  # DNS never moves the pod's boundary
        resolver.on_change = self._on_changes
        self.dispatch = Dispatcher(
            self.table,
            Guard.of(config.service_cidrs, config.guarded_pods),
            strict,
            stats,
            self.tunnel.table.by_addr,
            services if services is not None else ServiceFlows(stats, random.randrange),
        )
        self.desired = Desired(config.service_cidrs, config.own_addresses)
        resolver.pending_effects = self.desired.pending  # no answer before its effects
        self.effects = EffectApplier(self.desired, stats, kernel, on_applied=self._on_applied)
        self.ratelog = RateLimitedLog(log)
        self.awaiting_route: HoldQueue[str, bytes] = HoldQueue(HOLD_PER_PEER, HOLD_TOTAL)
        self.up_peers: set[str] = set()
        self.cidr_mismatch: str | None = None  # the last mismatch reported (observe.py)
        self.gates: list[InboundGate] = []  # standalone strict mode only (linux.inbound)
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # ---- the express lane (core/express.py): tables here, the compiled pumps at start
        self.want_express = express
        self.express: Express | None = None
        self.lane: Any = None  # tencrypt._fastpath.Lane once started with --express
        self.selector = selector  # the loop's: the lane's wait serves its readiness (spin.py)

    # ---- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        """``prepare``, then the DNS proxy, the inbound gate (standalone) and the readers."""
        backend = fastpath.select(os.environ)  # before anything is set up: may refuse to start
        await self.prepare()
        c = self.config
        if self.batch:
            self.tunnel.fastpath = backend
        log.info(
            "data path: %s (UDP GSO %s, GRO %s), seal/open loops: %s",
            "batch" if self.batch else "one packet",
            "on" if self.ports.udp.gso else "off",
            "on" if self.ports.udp.gro else "off",
            fastpath.describe(backend) if self.batch else "one packet per call",
        )
        await self.resolver.start()
        loop = asyncio.get_running_loop()
        loaded = self.members.loaded if self.members else None
        if loaded is None:
            log.warning(
                "no membership file (%s): %s",
                self.members.path if self.members else "none given",
                observe.STANDALONE_LIMITS,
            )
        if self.strict and loaded is None:  # new connections with the pod network: gated
            from tencrypt.linux.inbound import open_gates

            self.gates = open_gates(self, lambda: self.dispatch.locked, self._refuse_queued)
            for gate in self.gates:
                loop.add_reader(gate.queue.fileno(), gate.on_readable)
        if self.want_express:
            self._start_express(backend)
        loop.add_reader(self.ports.tun.fileno(), self._on_tun)
        loop.add_reader(self.ports.udp.fileno(), self._on_udp)
        self._spawn(self.effects.run(self.stopping))
        log.info(
            "ready: pod %s, %s mode, pod network %s, %d members",
            c.pod_ip,
            observe.mode(self),
            ", ".join(str(n) for n in self.dispatch.guard.pods) or "-",
            len(loaded.addresses) if loaded else 0,
        )

    async def prepare(self) -> None:
        """Before the first packet is read: the firewall (setup installed it; repaired here),
        what a previous run left in its sets adopted, the membership loaded, and the routes
        and set elements they want applied."""
        now = self.clock()
        if self.strict:
            self.kernel.install_firewall()
            adopted = self.kernel.elements()
            self.desired.resync_elements(adopted)
            self._on_changes(self.table.adopt(sorted(adopted), now, ADOPTED_EVIDENCE))
        else:
            log.warning(
                "--no-strict: the firewall is removed; an internal peer without a proxy "
                "is reached in the clear after %.0f s of unanswered handshakes",
                self.tunnel.limits.handshake_give_up,
            )
            self.kernel.remove_firewall()
        self._poll_members(now)
        await self.effects.round()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for port in (self.ports.tun, self.ports.udp):
            loop.remove_reader(port.fileno())
        self._stop_express()  # the loop's epoll is plain again before the ports close
        for gate in self.gates:  # their rules stay: new connections wait for the next proxy
            loop.remove_reader(gate.queue.fileno())
            gate.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.resolver.close()
        self.effects.close()
        self.ports.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- outbound: tenc0 -> dispatch -> seal -> udp -------------------------------------
    def _on_tun(self) -> None:
        now, wall = self.clock(), self.wall()
        if self.lane is not None and self._lane_tun(now, wall):
            return
        # every frame is read into one reused buffer and rewritten in place: whatever must
        # outlive this iteration (queued, held) is copied by its keeper
        read, view = self.ports.tun.readinto, self.read_view
        # batch path: small packets to a peer with a session wait here (copied) and are sealed
        # by one call per destination, before any super-packet and at the end of the reads
        # (each destination's packets keep their order)
        to_peers: dict[str, list[bytes]] = {}
        lone = now - max(self.busy, self.tun_cut) > QUIET  # a lone packet is read alone (READS)
        burst = False
        for count in range(BATCH):  # noqa: B007 - read after the loop
            n = read(self.read_buffer)
            if not n:
                break
            frame = view[:n]
            if not self.batch:
                self._outbound(frame, now, wall)
            elif self._outbound_frame(frame, now, wall, to_peers):
                lone, burst = False, True
            if lone:
                break
        self._seal_small(to_peers, now, wall)
        self._flush()
        if lone:  # stopped after a lone packet: more may be queued
            self.tun_cut = self.clock()
        elif burst or count > 1:  # count: the packets read, when EAGAIN ended the reads
            self.busy = self.clock()

    def _outbound_frame(
        self, frame: memoryview, now: float, wall: float, to_peers: dict[str, list[bytes]]
    ) -> bool:
        """One frame of the batch path: a super-packet goes after the small packets collected
        so far (each destination's order kept); one packet, its checksum completed (the kernel
        may leave it partial), is collected. True: it was a super-packet."""
        if is_super_packet(frame):
            self._seal_small(to_peers, now, wall)
            self._outbound_super(frame, now, wall)
            return True
        for pkt in split_tcp_batch(frame, self.stats):
            self._outbound(pkt, now, wall, to_peers)
        return False

    def _seal_small(self, to_peers: dict[str, list[bytes]], now: float, wall: float) -> None:
        for dst, packets in to_peers.items():  # what _on_tun collected: one call per peer
            self._seal(dst, packets, now, wall)
        to_peers.clear()

    def _seal(
        self, dst: str, packets: Sequence[bytes | bytearray | memoryview], now: float, wall: float
    ) -> None:
        """Into the tunnel of ``dst``'s pod: the peer that has the address, else the address
        itself when it is of the tunnel's family, else its pod's address of that family
        (membership podIPs: a dual-stack pod is one peer, one session). No such address:
        refused, counted, never in the clear."""
        peer_ip = dst
        if dst not in self.tunnel.table.by_addr and (":" in dst) != (self.config.version == 6):
            loaded = self.members.loaded if self.members else None
            partner = loaded.partner(dst) if loaded is not None else None
            if partner is None:
                self.stats.drop(DropReason.NO_TUNNEL_ADDRESS, len(packets))
                self._refuse(packets, now, counted=True)
                return
            peer_ip = partner
        self.tunnel.send_batch(peer_ip, packets, now, wall)

    def _outbound(
        self,
        buf: bytearray | memoryview,
        now: float,
        wall: float,
        to_peers: dict[str, list[bytes]] | None = None,
    ) -> None:
        """Steps 2-4 for one packet."""
        version = ip_version(buf)
        if not version:
            self.stats.drop(DropReason.MALFORMED_PACKET)
            return
        key = self.express.before(buf) if self.express is not None else None  # as sent
        mtu = self.config.mtu
        if len(buf) > mtu:
            self._too_big(buf, mtu)
            return
        if ip_proto(buf) == TCP:  # behind IPv6's extension headers too; IPv6: MTU - 60
            rewrite_tcp_mss(buf, mtu - 40)
        if not self.flows.rewrite_outbound(buf, now):  # malformed, counted
            return
        out, dst = self.dispatch.route(buf, _dst(buf), now)
        if key is not None and out is Out.SEAL:  # the lane takes the flow's next packets
            self.express.learn(key, buf, dst, now)  # type: ignore[union-attr]
        if out is Out.SEAL and to_peers is not None:  # sealed after the reads
            to_peers.setdefault(dst, []).append(bytes(buf))
        else:
            self._act(out, dst, [buf], now, wall)

    def _outbound_super(self, frame: memoryview, now: float, wall: float) -> None:
        """NAT, translation and the verdict once per super-packet, on its headers; the split
        recomputes every checksum after."""
        head = frame[VNET_HDR_LEN:]
        if not ip_version(head):
            self.stats.drop(DropReason.MALFORMED_PACKET)
            return
        key = self.express.before(head) if self.express is not None else None  # as sent
        if not self.flows.rewrite_outbound(head, now):
            return
        out, dst = self.dispatch.route(head, _dst(head), now)
        if out is Out.DROP:
            return
        if key is not None and out is Out.SEAL:  # the lane takes the flow's next ones
            self.express.learn(key, head, dst, now)  # type: ignore[union-attr]
        backend = self.tunnel.fastpath  # its segment cuts in C when compiled
        segments = split_tcp_batch(
            frame, self.stats, self.split_buffer, backend.segment if backend is not None else None
        )
        self.stats.inc(Counter.SUPER_PACKETS_SPLIT)
        if segments:
            self._act(out, dst, segments, now, wall)

    def _too_big(self, buf: bytearray | memoryview, mtu: int) -> None:
        self.stats.drop(DropReason.TOO_BIG)
        source = self.config.source_for(_dst(buf))  # as a router would
        icmp = build_icmp_frag_needed(bytes(buf), mtu, source)
        if icmp and dont_fragment(buf):  # tell the sender (RFC 1191)
            self._send_raw(self.ports.inject, icmp)

    def _act(
        self,
        out: Out,
        dst: str,
        packets: Sequence[bytearray | memoryview],
        now: float,
        wall: float,
    ) -> None:
        """Step 4: execute the dispatcher's result for packets to one destination."""
        if out is Out.SEAL:
            if not self.dispatch.cluster:
                peer = self.tunnel.table.by_addr.get(dst)
                if peer is not None and peer.pinned:  # standalone's VIP path, counted
                    self.stats.inc(Counter.STANDALONE_VIP_PACKETS, len(packets))
            self._seal(dst, packets, now, wall)
        elif out is Out.CLEAR or out is Out.FALLBACK:
            fallback = out is Out.FALLBACK
            self.stats.inc(
                Counter.PACKETS_PLAINTEXT_FALLBACK if fallback else Counter.PACKETS_BYPASSED,
                len(packets),
            )
            for pkt in packets:
                self._send_raw(self.ports.bypass, pkt)
        elif out is Out.HOLD or out is Out.WAIT:
            if self.dispatch.hold(out, dst, packets, now):
                self._spawn(self._look_up(dst))
        elif out is Out.REFUSE or out is Out.DENY:  # DENY: a NetworkPolicy's, counted
            self._refuse(packets, now, counted=out is Out.DENY)
        elif out is Out.REJECT:  # no endpoint: as kube-proxy's REJECT, from the cluster IP
            icmp = build_icmp_port_unreachable(packets[0], dst) if packets else None
            if icmp:
                self._send_raw(self.ports.inject, icmp)

    def _refuse_queued(self, headers: bytes) -> None:  # an outbound gate's refusal (counted)
        self._refuse([headers], self.clock(), counted=True)

    def _refuse(
        self, packets: Sequence[bytes | bytearray | memoryview], now: float, counted: bool = False
    ) -> None:
        if not counted:
            self.stats.drop(DropReason.UNCLASSIFIED, len(packets))
        if not packets:
            return
        source = self.config.source_for(_dst(packets[0]))
        icmp = build_icmp_admin_prohibited(packets[0], source)
        if icmp:
            quote = bytearray(icmp)
            self.dispatch.on_reply(quote, now)  # a translated packet's quote: as the app sent it
            self._send_raw(self.ports.inject, quote)

    async def _look_up(self, dst: str) -> None:
        """A HOLD's reverse lookup; then its packets are routed again, ``looked_up``."""
        try:
            await self.resolver.classify_address(dst)
        except Exception:  # a failed lookup leaves the address unknown: refused, never clear
            log.exception("reverse lookup of %s failed", dst)
        now = self.clock()
        if self.table.lookup(dst, now) is None and not self.table.known_unknown(dst, now):
            self.table.note_unknown(dst, now)
        self._reroute(self.dispatch.release(dst), now, looked_up=True)

    def _reroute(self, packets: list[bytearray], now: float, looked_up: bool = False) -> None:
        wall = self.wall()
        for pkt in packets:
            out, dst = self.dispatch.route(pkt, _dst(pkt), now, looked_up)
            self._act(out, dst, [pkt], now, wall)
        self._flush()

    # ---- inbound: udp -> open -> nat -> inject ------------------------------------------
    def _on_udp(self) -> None:
        now, wall = self.clock(), self.wall()
        opened: list[bytes] = []
        if self.lane is not None and self._lane_udp(now, wall):
            return
        lone = now - max(self.busy, self.udp_cut) > QUIET  # a lone one is read alone (READS)
        burst = False
        for count in range(BATCH):  # noqa: B007 - read after the loop
            try:
                got = self.ports.udp.recv_batch()
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                self.ratelog.warn("udp-error", "tunnel socket: %s", exc)
                continue
            if got is None:
                break
            datagrams, addr = got
            opened = self._received(datagrams, addr, now, wall, opened)
            if lone and len(datagrams) == 1:  # one datagram: epoll reports the next
                break
            lone, burst = False, burst or len(datagrams) > 1
        self._inject(self._routed(opened), now)
        self._flush()
        if lone:
            self.udp_cut = self.clock()
        elif burst or count > 1:
            self.busy = self.clock()

    def _received(
        self,
        datagrams: Sequence[memoryview],
        addr: Any,
        now: float,
        wall: float,
        opened: list[bytes],
    ) -> list[bytes]:
        """Steps 2-3 for the datagrams of one receive (``_on_udp``'s, or one the express lane
        handed back); what is still to inject."""
        opened += self.tunnel.receive_batch(datagrams, addr, now, wall)
        if self.tunnel.table.events:  # a PeerUp: evidence, and a route for the reply
            self._on_peer_events(now)
        if len(opened) >= BATCH:
            self._inject(self._routed(opened), now)
            return []
        return opened

    def _routed(self, packets: list[bytes]) -> list[bytes]:
        """Step 3: packets whose sender's /32 is in place; the others wait for it."""
        waiting = self.awaiting_route
        if not self.desired.unrouted and not len(waiting):
            return packets
        ready = []
        for pkt in packets:
            src = _src(pkt)
            if self.desired.routed(src) and src not in waiting:
                ready.append(pkt)
                continue
            _, refused = waiting.add(src, [pkt])
            if refused:
                self.stats.drop(DropReason.QUEUE_FULL, refused)
        return ready

    def _on_applied(self) -> None:
        """Routes and elements were applied: answers and packets that waited for them go."""
        self.resolver.effects_applied()
        for ip in self.awaiting_route:
            if self.desired.routed(ip):
                self._inject(self.awaiting_route.pop(ip), self.clock())

    def _inject(self, packets: list[bytes], now: float) -> None:
        """NAT in, NetworkPolicy, inject. The batch path merges a flow's consecutive segments
        first (NAT, the policy and the system call then cost once per merged packet) and
        writes them to tenc0 as TSO
        frames whose TCP checksum the kernel completes (CHECKSUM_PARTIAL): no 64 KiB checksum
        in Python. The one-packet path and the fallback inject through the raw socket."""
        if not packets:
            return
        admit = self.dispatch.admit  # NetworkPolicy, then the Service reply's translation
        if not self.inject_via_tun:
            merged = [c.packet for c in coalesce_batch(packets)] if self.batch else packets
            for pkt in merged:
                buf = pkt if isinstance(pkt, bytearray) else bytearray(pkt)
                if self.flows.rewrite_inbound(buf, now) and admit(buf, now):
                    self._send_raw(self.ports.inject, buf)
            return
        backend = self.tunnel.fastpath  # its coalesce merges in C when compiled
        runs = (
            backend.coalesce(packets, True)
            if backend is not None
            else coalesce_batch(packets, partial=True)
        )
        for pkt, gso_size in runs:
            buf = pkt if isinstance(pkt, bytearray) else bytearray(pkt)
            if not self.flows.rewrite_inbound(buf, now) or not admit(buf, now):
                continue
            if gso_size:
                rewrite_partial_csum(buf)
            try:
                self.ports.tun.write_frame(build_gso_vnet_hdr(buf, gso_size), buf)
            except OSError as exc:  # a kernel that refuses TSO frames: raw socket from now on
                log.warning(
                    "writing to %s refused (%s): injecting through the raw socket",
                    self.config.tun,
                    exc,
                )
                self.inject_via_tun = False
                self.stats.inc(Counter.TUN_INJECT_ERRORS)

    # ---- the express lane (core/express.py, tencrypt/_lane.c) -----------------------------
    # Rules: the lane is only built on the batch path, injecting through tenc0, for a pod
    # whose tunnel is IPv4, with the compiled backend; its tables are core/express.py's,
    # learnt in ``_outbound`` and flushed on a new membership or peer events (the overrides
    # below); classes and key rings change nothing the lane takes (a learnt destination is
    # a peer's, which the verdict never overrides; every session keeps its key). A readiness
    # event calls one pump; what the pump hands back takes the Python path above, unchanged.
    # With ``--no-express`` nothing here runs.
    def _start_express(self, backend: Any) -> None:
        c = self.config
        why = (
            "the one-packet path (--no-batch)"
            if not self.batch
            else "an IPv6 tunnel"
            if c.version != 4
            else "the pure-Python backend"
            if getattr(backend, "Lane", None) is None
            else ""
        )
        if why:
            log.info("express lane off: not with %s", why)
            return
        self.express = Express(self.tunnel, self.dispatch, self.flows, self.stats, c.pod_ip, c.mtu)
        e = self.express
        self.lane = backend.Lane(e.out, e.inn, e.slots, e.pod4, c.mtu)
        if self.selector is not None:
            self.selector.wait = self._lane_wait
        log.info(
            "express lane on: established flows are sealed and opened in C%s",
            ", woken in C" if self.selector is not None else "",
        )

    def _lane_wait(self, epfd: int, timeout: float | None, maxevents: int) -> list[tuple[int, int]]:
        """The loop's epoll call while the lane runs (linux/spin.py rule 5): the lane's own
        readiness is served in C, by READS (QUIET) and the selector's polling window (spin);
        what it hands back or counts waits in the lane for the reader's next pump, which
        returns it first."""
        tun, udp = self.ports.tun.fileno(), self.ports.udp.fileno()
        at = None if self.clock is time.monotonic else self.clock()  # None: the lane's clock
        ok = self._udp_lane_ok()
        spin = self.selector.spin if self.selector is not None else 0.0  # its rules, in C
        try:
            return self.lane.wait(
                epfd, timeout, maxevents, tun, udp, ok, BATCH, LONE_BYTES, at, spin, QUIET
            )
        except Exception:  # never the loop's death: the lane stops, the Python path carries on
            log.exception("express lane failed: it stops; the Python path carries every packet")
            self.stats.inc(Counter.EXPRESS_FAILURES)
            self._stop_express()
            return []  # level-triggered: what is ready is reported by the next (plain) epoll

    def _udp_lane_ok(self) -> bool:
        """May the lane open datagrams: no sender waits for its route (step 3), and tenc0
        takes what is injected."""
        return not (self.desired.unrouted or len(self.awaiting_route)) and self.inject_via_tun

    def _lane_tun(self, now: float, wall: float) -> bool:
        """One pump of tenc0; a frame handed back takes the Python path. True: done; False:
        it was a super-packet (bulk), so the Python loop goes on reading as it always did."""
        cold = now - max(self.busy, self.tun_cut) > QUIET  # READS
        frames, dropped = self.lane.pump_tun(
            self.ports.tun.fileno(), self.ports.udp.fileno(), now, BATCH, LONE_BYTES if cold else 0
        )
        if cold:  # it may have stopped after a lone packet: more may be queued
            self.tun_cut = self.clock()
        if dropped:
            self.stats.inc(Counter.DATAGRAMS_SEND_DROPPED, dropped)
        bulk = False
        if frames:
            to_peers: dict[str, list[bytes]] = {}
            for frame in frames:
                if self._outbound_frame(memoryview(bytearray(frame)), now, wall, to_peers):
                    bulk = True
            self._seal_small(to_peers, now, wall)
            self._flush()
        return not bulk

    def _lane_udp(self, now: float, wall: float) -> bool:
        """One pump of the UDP socket, while no sender waits for its route (step 3), else
        only what the lane's wait kept (it comes first); what it hands back takes the Python
        path. True: done; False: that was a GRO read (bulk) or the lane may not open, so the
        Python loop goes on reading as it always did."""
        ok = self._udp_lane_ok()
        cold = now - max(self.busy, self.udp_cut) > QUIET  # READS
        reads, errors = self.lane.pump_udp(
            self.ports.udp.fileno(),
            self.ports.tun.fileno(),
            now,
            BATCH if ok else 0,
            LONE_BYTES if cold else 0,
        )
        if cold and ok:
            self.udp_cut = self.clock()
        if errors:  # as _inject: a kernel that refuses the frames
            log.warning("writing to %s refused: the express lane stops", self.config.tun)
            self.stats.inc(Counter.TUN_INJECT_ERRORS, errors)
            self.inject_via_tun = False
            self._stop_express()
        opened: list[bytes] = []
        bulk = False
        for data, gro_size, truncated, addr in reads:
            bulk = bulk or gro_size > 0
            datagrams = read_datagrams(data, gro_size, truncated, self.stats)
            opened = self._received(datagrams, addr, now, wall, opened)
        self._inject(self._routed(opened), now)
        self._flush()
        return ok and not bulk

    def status(self) -> dict[str, object]:
        doc = super().status()
        e = self.express
        if e is not None and self.lane is not None:
            sealed, opened = self.lane.counts()
            leased_out, leased_in = self.lane.leased()
            doc["express"] = {
                "flows": len(e.out),
                "learnt": e.learnt,
                "sealed": sealed,
                "opened": opened,
                "leased_sealed": leased_out,  # of those, admitted under a lease (rule 6)
                "leased_opened": leased_in,
                "woken_in_c": self.lane.woken(),
            }
        return doc

    def _stop_express(self) -> None:
        if self.express is not None:
            self.express.flush()
        if self.selector is not None:
            self.selector.wait = None
        self.lane = self.express = None

    def _apply_members(self, members: Any, now: float) -> None:
        if self.express is not None:
            self.express.flush()
        super()._apply_members(members, now)

    def _on_peer_events(self, now: float) -> None:
        if self.express is not None:
            self.express.flush()
        super()._on_peer_events(now)

    # ---- shared --------------------------------------------------------------------------
    def _send_raw(self, sock: RawSocket, buf: bytes | bytearray | memoryview) -> None:
        try:
            sock.sendto(buf, (_dst(buf), 0))
        except OSError as exc:
            self.ratelog.warn("raw-" + str(exc.errno), "raw send failed: %s", exc)

    def _flush(self) -> None:
        runs = self.tunnel.pop_transmit_runs()
        if runs:
            try:
                sent = self.ports.udp.send_runs(runs)
            except OSError as exc:
                self.ratelog.warn("udp-send-" + str(exc.errno), "tunnel send failed: %s", exc)
                sent = 0
            total = sum(-(-len(data) // size) if size else 1 for data, _, size in runs)
            if sent < total:
                self.stats.inc(Counter.DATAGRAMS_SEND_DROPPED, total - sent)
        if self.tunnel.table.events:
            self._on_peer_events(self.clock())
        self.deadlines_moved()  # control.py rule 4b: wakes a deep-sleeping timer task


def _src(buf: bytes | bytearray | memoryview) -> str:
    """The source address of an IPv4 packet (bytes 12-16 of its header) or of an IPv6 one
    (bytes 8-24)."""
    if buf[0] >> 4 == 6:
        return socket.inet_ntop(socket.AF_INET6, buf[8:24])
    return socket.inet_ntoa(buf[12:16])


def _dst(buf: bytes | bytearray | memoryview) -> str:
    """The destination address of an IPv4 packet (bytes 16-20) or of an IPv6 one (24-40)."""
    if buf[0] >> 4 == 6:
        return socket.inet_ntop(socket.AF_INET6, buf[24:40])
    return socket.inet_ntoa(buf[16:20])
