"""The embedded DNS proxy: asyncio sockets around core.dnsmsg and core.classify.

A UDP query goes through these stages:
1. ``_on_client_datagram``: the client's datagram on 127.0.0.1:53 → ``PendingTable.on_query``:
   a live answer from the cache (core/dnscache.py: bounded by the records' TTLs, never served
   past them, and never classified again), a fresh random ID, or an error we answer
   ourselves (FORMERR, SERVFAIL when full), or a drop.
2. Sent on the ONE long-lived upstream UDP socket (connected: the kernel drops datagrams from
   anyone but the cluster DNS server; marked with setup's DNS mark, which routes it out of
   the uplink and which the firewall exempts from the project rules: no answer can cut it).
3. ``_on_upstream_datagram``: ``PendingTable.on_answer`` matches ID and question, then
   ``ClassTable.on_answer`` learns the addresses and ``on_change`` hears what changed.
4. The client gets the upstream's bytes with its own ID restored — once the addresses it makes
   internal have their route into tenc0 and their firewall element (``pending_effects``, the
   proxy's; DESIGN §1a "no answer before its effects"): an answer that would let the app send
   before them is held until ``effects_applied`` says they are in place, at most
   ANSWER_WAIT seconds, then answered SERVFAIL (the app retries; nothing left unprotected).
5. ``_on_timer``: queries past their deadline are answered SERVFAIL. Nothing about the upstream
   socket changes when the upstream is silent or refuses (ICMP errors are only counted), so
   the proxy answers again as soon as the upstream does.

Expiry (issue 26: an idle proxy wakes for nothing): no periodic sweep. ``_arm_sweep`` keeps
one timer at the classification table's earliest expiry (core/classify.py ``next_expiry``);
the table re-arms it through ``on_sooner`` whenever an expiry earlier than all others is
scheduled (an answer, a session's evidence, a membership), so a change is reported at its
due time exactly. The answer cache's expiry only frees memory (core/dnscache.py rule 3: an
entry is never served at or after its deadline): it rides on the same timer, which after an
answer that the cache kept is armed for the cache's earliest entry if nothing is armed.

Truncation: a truncated (TC) UDP answer is relayed to the UDP client as it is (it is the
upstream's answer, byte for byte), and its complete records are classified; the client then
retries over TCP, through us. TCP clients are served over TCP upstream: one private upstream
connection per client connection, messages answered in order, so IDs need no re-mapping
there. The proxy's own reverse lookups that come back truncated are repeated over TCP.

Reverse classification (``classify_address``): an address no answer covered gets a PTR query
through the same upstream socket; concurrent calls for one address share one query, an
answer is cached with its TTL, no answer is remembered for ``negative_ttl`` seconds.

Bounds: ``max_pending`` in-flight UDP queries, ``max_tcp_clients`` connections that each close
after ``tcp_idle_timeout`` idle seconds, queries of at most 4 KiB. Bad input is counted in
``Stats`` and logged at a bounded rate; it never stops the proxy.

Clock: ``now`` is ``time.monotonic()`` seconds everywhere, including ``lookup(ip, now)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dnslib import RCODE, DNSRecord

from tencrypt.core.classify import AddrClass, Change, ClassTable, Domains, parse_answer_classes
from tencrypt.core.dnscache import AnswerCache
from tencrypt.core.dnsmsg import (
    MAX_QUERY,
    PendingTable,
    QueryVerdict,
    build_error,
    check_answer,
    check_query,
    parse_message,
)
from tencrypt.core.flowstate import earliest
from tencrypt.core.podconfig import PodConfig, split_hostport
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.errors import UsageError
from tencrypt.linux.kernel import SO_MARK
from tencrypt.linux.sockets import start_tcp_server
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.dns")

SOCKET_BUFFER = 1 << 20  # room for a burst of queries while the loop is busy
UNREACHABLE_NEGATIVE_TTL = 5.0  # a PTR lookup that timed out is retried sooner than a miss
ANSWER_WAIT = 1.0  # seconds an answer waits for its routes and firewall elements, then SERVFAIL

OnChange = Callable[[list[Change]], None]


@dataclass(frozen=True, slots=True)
class DnsConfig:
    upstream: tuple[str, int]
    domain: str  # the project's domain, e.g. myproject.svc.cluster.local
    cluster_domain: str = "cluster.local"
    listen: tuple[str, int] = ("127.0.0.1", 53)
    timeout: float = 2.0
    fwmark: int | None = None
    max_pending: int = 4096
    max_tcp_clients: int = 64
    tcp_idle_timeout: float = 10.0
    min_ttl: float = 30.0
    negative_ttl: float = 30.0
    cache_entries: int = 1024  # answers kept for repeated UDP queries; 0: no cache

    @classmethod
    def from_pod(cls, pod: PodConfig, **overrides: Any) -> DnsConfig:
        """From setup's ``PodConfig`` (dns, domain, cluster_domain, and its DNS mark: the
        firewall exempts that mark alone, linux/firewall.py)."""
        fields = {
            "upstream": parse_hostport(pod.dns, 53),
            "domain": pod.domain,
            "cluster_domain": pod.cluster_domain,
            "fwmark": pod.dns_mark,
        }
        return cls(**{**fields, **overrides})


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT`` → (address, port); UsageError when malformed."""
    host, given = split_hostport(text)
    port = str(default_port) if given is None else given
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError as exc:
        raise UsageError(f"not an ADDR[:PORT]: {text!r}") from exc


def _udp_socket(family: int, fwmark: int | None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    if fwmark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
    return sock


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class _Datagrams(asyncio.DatagramProtocol):
    """Pumps datagrams into a handler; errors (ICMP unreachable) into another."""

    def __init__(
        self, on_datagram: Callable[[bytes, Any], None], on_error: Callable[[Exception], None]
    ) -> None:
        self.on_datagram, self.on_error = on_datagram, on_error

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.on_error(exc)


class _TcpUpstream:
    """One private TCP connection to the upstream, opened on first use (RFC 7766)."""

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, query: bytes) -> bytes:
        if self.writer is None:
            sock = socket.socket(_family(self.config.upstream[0]), socket.SOCK_STREAM)
            if self.config.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.config.fwmark)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, self.config.upstream)
            except BaseException:
                sock.close()
                raise
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        assert self.reader is not None
        self.writer.write(struct.pack("!H", len(query)) + query)
        await self.writer.drain()
        (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        return await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def class_table(config: DnsConfig, stats: Stats | None = None) -> ClassTable:
    """The classification table the DNS proxy fills and the data path reads (``serve`` builds
    it once and hands it to both)."""
    return ClassTable(
        Domains.of(config.domain, config.cluster_domain),
        min_ttl=config.min_ttl,
        negative_ttl=config.negative_ttl,
        stats=stats if stats is not None else Stats(),
    )


class DnsProxy:
    """The DNS proxy of one pod. ``start()``, then serve until ``close()``.

    ``config`` is a ``DnsConfig``, or setup's ``PodConfig`` (then the proxy listens on
    127.0.0.1:53 and asks the pod's cluster DNS server). ``on_change`` hears every change of
    an address's class, from the event loop; it must not block for long.
    """

    def __init__(
        self,
        config: DnsConfig | PodConfig,
        stats: Stats,
        on_change: OnChange | None = None,
        table: ClassTable | None = None,
    ) -> None:
        if not isinstance(config, DnsConfig):
            config = DnsConfig.from_pod(config)
        self.config, self.stats, self.on_change = config, stats, on_change
        self.table = table if table is not None else class_table(config, stats)
        # never served past the classification an answer made (core/dnscache.py rule 2)
        cache = (
            AnswerCache(config.cache_entries, max_ttl=int(self.table.max_ttl), stats=stats)
            if config.cache_entries > 0
            else None
        )
        self.pending = PendingTable(
            stats, timeout=config.timeout, max_pending=config.max_pending, cache=cache
        )
        # ip -> does it still wait for its route or firewall element? (the proxy's Desired)
        self.pending_effects: Callable[[str], bool] | None = None
        self._applied = asyncio.Event()
        self.rlog = RateLimitedLog(log)
        self._client: asyncio.DatagramTransport | None = None
        self._upstream: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._sweep: asyncio.TimerHandle | None = None  # at the earliest expiry (module doc)
        self._sweep_at = 0.0  # when it runs (monotonic)
        self._lookups: dict[str, asyncio.Future[AddrClass | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.listen
        up = _udp_socket(_family(self.config.upstream[0]), self.config.fwmark)
        up.connect(self.config.upstream)
        self._upstream, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._on_upstream_datagram, self._on_upstream_error), sock=up
        )
        listen = _udp_socket(_family(host), None)
        try:
            listen.bind((host, port))
        except OSError as exc:
            listen.close()
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._client, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._on_client_datagram, self._on_client_error), sock=listen
        )
        self._tcp = await start_tcp_server(self._on_tcp_client, host, port)
        self.table.on_sooner = self._arm_sweep
        self._rearm_sweep()
        log.info(
            "DNS proxy on %s:%d → %s:%d, project domain %s",
            host,
            port,
            *self.config.upstream,
            self.config.domain,
        )

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
        for task in [*self._tcp_clients, *self._tasks]:
            task.cancel()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self.table.on_sooner == self._arm_sweep:
            self.table.on_sooner = None
        for fut in self._lookups.values():
            if not fut.done():
                fut.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        for transport in (self._client, self._upstream):
            if transport is not None:
                transport.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tcp_clients, *self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # -- the data path's view --------------------------------------------------------------

    def lookup(self, ip: str, now: float) -> AddrClass | None:
        return self.table.lookup(ip, now)

    def table_size(self) -> int:
        return len(self.table)

    async def classify_address(self, ip: str) -> AddrClass | None:
        """The class of ``ip``: from the table, or by a (shared, cached) PTR lookup."""
        now = time.monotonic()
        cls = self.table.lookup(ip, now)
        if cls is not None or self.table.known_unknown(ip, now):
            return cls
        fut = self._lookups.get(ip)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._lookups[ip] = fut
            self._spawn(self._reverse_lookup(ip, fut))
        return await asyncio.shield(fut)

    async def _reverse_lookup(self, ip: str, result: asyncio.Future[AddrClass | None]) -> None:
        try:
            query = DNSRecord.question(ipaddress.ip_address(ip).reverse_pointer, "PTR").pack()
            record = await self._query_upstream(query)
            if record is not None and record.header.tc:
                record = await self._query_upstream_tcp(query)
            now = time.monotonic()
            if record is not None:
                self._notify(self.table.on_answer(record, now))
            cls = self.table.lookup(ip, now)
            if cls is None:
                ttl = None if record is not None else UNREACHABLE_NEGATIVE_TTL
                self.table.note_unknown(ip, now, ttl)
            self.stats.inc(Counter.DNS_REVERSE_LOOKUPS)
        except ValueError:
            pass  # not an IP address: nothing to look up, the result is None
        finally:
            if not result.done():
                result.set_result(self.table.lookup(ip, time.monotonic()))
            self._lookups.pop(ip, None)

    async def _query_upstream(self, query: bytes) -> DNSRecord | None:
        """Our own query through the shared upstream socket; None on SERVFAIL or timeout."""
        answer: asyncio.Future[DNSRecord | None] = asyncio.get_running_loop().create_future()
        outcome = self.pending.on_query(query, answer, time.monotonic())
        if outcome.verdict is not QueryVerdict.FORWARD or self._upstream is None:
            return None
        self._upstream.sendto(outcome.data)
        self._arm_timer()
        return await answer

    async def _query_upstream_tcp(self, query: bytes) -> DNSRecord | None:
        upstream = _TcpUpstream(self.config)
        try:
            data = await asyncio.wait_for(upstream.exchange(query), self.config.timeout)
        except (OSError, EOFError, TimeoutError):
            return None
        finally:
            upstream.close()
        sent = parse_message(query)
        parsed, ok = check_answer(sent, data) if sent is not None else (None, False)
        return parsed.record if ok and parsed is not None else None

    # -- UDP -------------------------------------------------------------------------------

    def _on_client_datagram(self, data: bytes, addr: Any) -> None:
        outcome = self.pending.on_query(data, addr, time.monotonic(), cache=True)
        if outcome.verdict is QueryVerdict.CACHED:
            self._reply(addr, outcome.data)
        elif outcome.verdict is QueryVerdict.FORWARD:
            assert self._upstream is not None
            self._upstream.sendto(outcome.data)
            self._arm_timer()
        elif outcome.verdict is QueryVerdict.REPLY:
            self._reply(addr, outcome.data)
            self.rlog.warn("query-error", "DNS query from %s answered with an error", addr[0])
        else:
            self.rlog.warn("query-drop", "DNS query from %s dropped (%d bytes)", addr[0], len(data))

    def _on_upstream_datagram(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        answered = self.pending.on_answer(data, now)
        if answered is None:
            self.rlog.warn("answer-drop", "DNS answer from upstream dropped (%d bytes)", len(data))
            return
        self._cache_kept()
        if answered.record is not None:
            self._notify(self.table.on_answer(answered.record, now))
            waiting = self._unapplied(answered.record, now)
            if waiting and not isinstance(answered.client, asyncio.Future):
                self._spawn(
                    self._deliver_applied(answered.client, answered.reply, answered.record, waiting)
                )
                return
        self._deliver(answered.client, answered.reply, answered.record)

    # -- no answer before its effects (DESIGN §1a) ------------------------------------------

    def effects_applied(self) -> None:
        """The proxy applied routes or firewall elements: held answers may go now."""
        self._applied.set()

    def _unapplied(self, record: DNSRecord, now: float) -> list[str]:
        """The answer's addresses that are internal and still wait for their route or their
        firewall element (``pending_effects``, the proxy's)."""
        if self.pending_effects is None:
            return []
        ips = parse_answer_classes(record, self.table.domains)
        return [
            ip
            for ip in ips
            if self.table.lookup(ip, now) is AddrClass.INTERNAL and self.pending_effects(ip)
        ]

    async def _until_applied(self, ips: list[str]) -> bool:
        """Wait (at most ANSWER_WAIT) until none of ``ips`` waits for an effect any more."""
        assert self.pending_effects is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANSWER_WAIT
        while any(self.pending_effects(ip) for ip in ips):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._applied.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._applied.wait(), left)
        return True

    async def _deliver_applied(
        self, client: object, reply: bytes, record: DNSRecord, ips: list[str]
    ) -> None:
        self.stats.inc(Counter.DNS_ANSWERS_HELD)
        if not await self._until_applied(ips):
            self.stats.inc(Counter.DNS_ANSWERS_HELD_TOO_LONG)
            self.rlog.warn(
                "held-too-long",
                "DNS answer for %s held %.1f s for its routes and firewall elements: SERVFAIL",
                record.questions[0].qname if record.questions else "?",
                ANSWER_WAIT,
            )
            reply = (
                build_error(record.header, record.questions[0], RCODE.SERVFAIL)
                if record.questions
                else reply
            )
        self._deliver(client, reply, record)

    def _deliver(self, client: object, reply: bytes, record: DNSRecord | None) -> None:
        if isinstance(client, asyncio.Future):
            ok = record is not None and record.header.rcode != RCODE.SERVFAIL
            if not client.done():
                client.set_result(record if ok else None)
        else:
            self._reply(client, reply)

    def _reply(self, addr: Any, data: bytes) -> None:
        if self._client is not None:
            self._client.sendto(data, addr)

    def _on_upstream_error(self, exc: Exception) -> None:
        self.stats.inc(Counter.DNS_UPSTREAM_ERRORS)
        self.rlog.warn("upstream-error", "DNS upstream %s:%d: %s", *self.config.upstream, exc)

    def _on_client_error(self, exc: Exception) -> None:
        self.stats.inc(Counter.DNS_CLIENT_ERRORS)
        self.rlog.warn("client-error", "DNS client socket: %s", exc)

    def _arm_timer(self) -> None:
        """Deadlines only grow (one timeout for all), so one timer at the earliest suffices."""
        deadline = self.pending.next_deadline()
        if self._timer is None and deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        expired = self.pending.on_timer(time.monotonic())
        for client, servfail in expired:
            self._deliver(client, servfail, None)
        if expired:
            self.rlog.warn(
                "timeout",
                "DNS upstream %s:%d silent: %d queries answered SERVFAIL",
                *self.config.upstream,
                len(expired),
            )
        self._arm_timer()

    # -- TCP -------------------------------------------------------------------------------

    async def _on_tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._tcp_clients) >= self.config.max_tcp_clients:
            self.stats.drop(DropReason.DNS_TCP_TOO_MANY_CLIENTS)
            self.rlog.warn(
                "tcp-full", "DNS over TCP: %d clients already, refusing one", len(self._tcp_clients)
            )
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tcp_clients.add(task)
        upstream = _TcpUpstream(self.config)
        try:
            while (query := await self._read_tcp_query(reader)) is not None:
                reply = await self._answer_tcp(query, upstream)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (OSError, EOFError, TimeoutError):
            pass  # the client went away or idled out: nothing to answer
        finally:
            self._tcp_clients.discard(task)
            upstream.close()
            writer.close()

    async def _read_tcp_query(self, reader: asyncio.StreamReader) -> bytes | None:
        head = await asyncio.wait_for(reader.readexactly(2), self.config.tcp_idle_timeout)
        (length,) = struct.unpack("!H", head)
        if length > MAX_QUERY:
            self.stats.drop(DropReason.DNS_TOO_BIG)
            self.rlog.warn("tcp-too-big", "DNS over TCP: %d-byte query, closing", length)
            return None
        return await asyncio.wait_for(reader.readexactly(length), self.config.timeout)

    async def _answer_tcp(self, query: bytes, upstream: _TcpUpstream) -> bytes | None:
        """The reply to one TCP query, or None to close the connection."""
        self.stats.inc(Counter.DNS_TCP_QUERIES)
        parsed, refused = check_query(query, self.stats)
        if parsed is None:  # a FORMERR answer, or close the connection on a drop
            return refused.data if refused and refused.verdict is QueryVerdict.REPLY else None
        try:
            data = await asyncio.wait_for(upstream.exchange(query), self.config.timeout)
        except (OSError, EOFError, TimeoutError) as exc:
            upstream.close()
            self.stats.drop(DropReason.DNS_UPSTREAM_TIMEOUT)
            self.rlog.warn("tcp-upstream", "DNS over TCP to upstream failed: %r", exc)
            return build_error(parsed.header, parsed.question, RCODE.SERVFAIL)
        answer, ok = check_answer(parsed, data)
        if not ok or answer is None or answer.record is None:
            upstream.close()
            self.stats.drop(DropReason.DNS_MALFORMED_ANSWER)
            return build_error(parsed.header, parsed.question, RCODE.SERVFAIL)
        now = time.monotonic()
        self._notify(self.table.on_answer(answer.record, now))
        waiting = self._unapplied(answer.record, now)
        if waiting:
            self.stats.inc(Counter.DNS_ANSWERS_HELD)
            if not await self._until_applied(waiting):
                self.stats.inc(Counter.DNS_ANSWERS_HELD_TOO_LONG)
                return build_error(parsed.header, parsed.question, RCODE.SERVFAIL)
        return data

    # -- housekeeping ----------------------------------------------------------------------

    def _arm_sweep(self, when: float) -> None:
        """The sweep runs at ``when`` (monotonic) or earlier: one timer, moved earlier only."""
        if self._sweep is not None:
            if self._sweep_at <= when:
                return
            self._sweep.cancel()
        self._sweep_at = when
        delay = max(0.0, when - time.monotonic())  # the loop's own clock may be another
        self._sweep = asyncio.get_running_loop().call_later(delay, self._on_sweep)

    def _rearm_sweep(self) -> None:
        cache = self.pending.cache  # its expiry rides on the sweep (module doc)
        when = earliest(self.table.next_expiry(), None if cache is None else cache.next_expiry())
        if when is not None:
            self._arm_sweep(when)

    def _on_sweep(self) -> None:
        self._sweep = None
        now = time.monotonic()
        self._notify(self.table.expire(now))
        if self.pending.cache is not None:
            self.pending.cache.expire(now)
        self._rearm_sweep()

    def _cache_kept(self) -> None:
        """After an answer: an entry the cache kept is forgotten by the armed sweep, or by
        one armed now for it (memory only: module doc)."""
        cache = self.pending.cache
        if self._sweep is None and cache is not None and len(cache):
            self._rearm_sweep()

    def _notify(self, changes: list[Change]) -> None:
        # a conflict is reported with the answer that made it, even when no class changed
        # (core/classify.py rule 5): nothing else polls for it since the timers sleep
        if (changes or self.table.has_conflicts()) and self.on_change is not None:
            self.on_change(changes)
        for ip in self.table.pop_lookups():  # forward answers only hint: a PTR decides
            self._spawn(self.classify_address(ip))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["DnsConfig", "DnsProxy", "class_table", "parse_hostport"]
