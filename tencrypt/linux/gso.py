"""UDP segmentation offload (GSO) to send and generic receive offload (GRO) to receive.

Python pays per system call, so the tunnel socket moves a super-packet's worth of datagrams
per call. Kernel interface: linux/udp.h (``UDP_SEGMENT``, ``UDP_GRO``), net/ipv4/udp.c.

Sending (``UdpBatch.send_batch``):
 1. the caller lays datagrams out back to back, each ``size`` bytes but the last, which may be
    shorter: what sealing the segments of one TCP super-packet gives;
 2. one ``sendmsg`` per ``max_segments(size)`` datagrams, with a (SOL_UDP, UDP_SEGMENT, u16
    size) control message: the kernel cuts the buffer into datagrams after routing;
 3. when the kernel refuses (EIO: before 6.11 a device without UDP checksum offload, as after
    ``ethtool -K dev tx off``, made GSO fail; a kernel without UDP_SEGMENT) the socket falls
    back for good to one ``sendto`` per datagram, counted (``gso_fallback``); EINVAL (a
    datagram larger than the route's MTU: GSO never fragments) sends that batch one by one,
    counted (``gso_oversize``). EAGAIN ends the batch: the rest are dropped, as the one-packet
    path drops them, and the caller counts the difference.
``send_many`` groups a list of (datagram, address) pairs into such runs for ``send_batch``.

Receiving (``UdpBatch.recv_batch``):
 1. ``recvmsg_into`` one reused 64 KiB buffer; with UDP_GRO on, the kernel hands several
    datagrams of one sender as one, with a (SOL_UDP, UDP_GRO, int size) control message;
 2. the buffer is cut every ``size`` bytes (the last piece may be shorter); without the
    message it holds one datagram. A GRO socket also receives GSO packets that were never
    segmented (same host, veth), so the two ends meet without any copy in between.
Without GRO (old kernel, or turned off) every datagram is one call: ``gro`` says which.

Both families: an AF_INET6 socket (an IPv6-only pod's tunnel) segments and coalesces the same
way (net/ipv6/udp.c; ``UDP_MAX_PAYLOAD`` is IPv4's, below IPv6's, so one limit serves both).
Its ``recvmsg`` names the sender as (host, port, flowinfo, scope_id): ``recv_batch`` hands the
core (host, port) with the host's canonical text (``core.wire.outer_ip``, a link-local's zone
dropped), as an IPv4 socket's address is; sending to (host, port) needs no more.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tencrypt.core.batch import Rows
from tencrypt.core.stats import Counter, Stats
from tencrypt.core.wire import outer_ip
from tencrypt.linux.kernel import SOL_UDP, UDP_GRO, UDP_MAX_SEGMENTS, UDP_SEGMENT

if TYPE_CHECKING:
    from tencrypt.core.peer import Transmit

log = logging.getLogger("tencrypt.gso")

MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: IntFlag arithmetic is slow per packet
UDP_MAX_PAYLOAD = 65535 - 20 - 8  # IPv4 total length minus IPv4 and UDP headers
RECV_BUFFER = 65536

Address = tuple[str, int]
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")


def endpoint(addr: tuple[object, ...]) -> Address:
    """A ``recvmsg`` address as the core's endpoint: IPv4's (host, port) as it is, IPv6's
    (host, port, flowinfo, scope_id) as (canonical host, port)."""
    if len(addr) == 2:
        return addr  # type: ignore[return-value]
    return outer_ip(str(addr[0])), int(addr[1])  # type: ignore[call-overload]


def max_segments(size: int) -> int:
    """Datagrams of ``size`` bytes that one UDP_SEGMENT sendmsg may carry."""
    return max(1, min(UDP_MAX_SEGMENTS, UDP_MAX_PAYLOAD // max(1, size)))


def probe_gso(sock: socket.socket) -> bool:
    """True when this kernel knows UDP_SEGMENT (4.18+); the device may still refuse (EIO)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def enable_gro(sock: socket.socket) -> bool:
    """Turn UDP_GRO on (5.0+); True when the kernel confirms it."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return sock.getsockopt(SOL_UDP, UDP_GRO) == 1
    except OSError:
        return False


class UdpBatch:
    """A UDP socket moving runs of datagrams per system call, GSO out and GRO in."""

    def __init__(
        self, sock: socket.socket, stats: Stats | None = None, *, gso: bool = True, gro: bool = True
    ) -> None:
        self.sock = sock
        self.stats = stats if stats is not None else Stats()
        self.gso = gso and probe_gso(sock)
        self.gro = gro and enable_gro(sock)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._cmsg_space = socket.CMSG_SPACE(_INT.size)
        self._last: tuple[tuple[object, ...], Address] = ((), ("", 0))  # endpoint's last answer

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # ---- sending ------------------------------------------------------------------------------
    def send_batch(self, data: bytes | bytearray | memoryview, size: int, addr: Address) -> int:
        """Send ``data`` as datagrams of ``size`` bytes (the last may be shorter).

        Returns how many datagrams the kernel took; fewer only when its buffer was full.
        """
        if size <= 0:
            return self._send_one(data, addr)
        view = memoryview(data)
        total = len(view)
        step = size * max_segments(size)
        sent = 0
        pos = 0
        while pos < total:
            chunk = view[pos : pos + step]
            count = -(-len(chunk) // size)
            done = self._send_chunk(chunk, size, count, addr)
            sent += done
            if done < count:
                break
            pos += step
        return sent

    def _send_chunk(self, chunk: memoryview, size: int, count: int, addr: Address) -> int:
        if self.gso and count > 1:
            try:
                self.sock.sendmsg([chunk], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
                self.stats.inc(Counter.UDP_GSO_SENDS)
                return count
            except BlockingIOError:
                return 0
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT):
                    raise
                if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                    self.stats.inc(Counter.GSO_OVERSIZE)  # a datagram above the route's MTU
                else:
                    self.gso = False
                    self.stats.inc(Counter.GSO_FALLBACK)
                    log.warning(
                        "UDP GSO refused (%s): one datagram per system call from now on",
                        exc.strerror,
                    )
        return self._send_each(chunk, size, addr)

    def _send_each(self, chunk: memoryview, size: int, addr: Address) -> int:
        done = 0
        for pos in range(0, len(chunk), size):
            if not self._send_one(chunk[pos : pos + size], addr):
                break
            done += 1
        return done

    def send_many(self, datagrams: Sequence[tuple[bytes | bytearray | memoryview, Address]]) -> int:
        """Send (datagram, address) pairs in order, each run to one address of equal sizes
        (the last of a run may be shorter) as one GSO batch. Returns datagrams sent."""
        sent = 0
        i, n = 0, len(datagrams)
        while i < n:
            first, addr = datagrams[i]
            size = len(first)
            j = i + 1
            end = min(n, i + max_segments(size)) if size else j
            while j < end and datagrams[j][1] == addr:
                length = len(datagrams[j][0])
                if length > size:
                    break
                j += 1
                if length < size:
                    break  # a shorter datagram ends the run
            if j - i == 1:
                sent += self._send_one(first, addr)
            else:
                sent += self.send_batch(b"".join([d for d, _ in datagrams[i:j]]), size, addr)
            i = j
        return sent

    def send_runs(self, runs: Sequence[Transmit]) -> int:
        """Send what the tunnel asked (core.peer.Transmit), in order: a run of equal datagrams
        as it lies (GSO, no copy), consecutive single datagrams through ``send_many``.
        Returns datagrams sent."""
        sent, singles = 0, []
        for data, addr, size in runs:
            if not size:
                singles.append((data, addr))
                continue
            if singles:
                sent += self.send_many(singles)
                singles = []
            sent += self.send_batch(data, size, addr)
        if singles:
            sent += self.send_many(singles)
        return sent

    def _send_one(self, datagram: bytes | bytearray | memoryview, addr: Address) -> int:
        try:
            self.sock.sendto(datagram, addr)
        except BlockingIOError:
            return 0
        return 1

    # ---- receiving ----------------------------------------------------------------------------
    def recv_batch(self) -> tuple[Sequence[memoryview], Address] | None:
        """The datagrams of one receive, in a buffer that the next call reuses (a GRO read
        as one ``Rows``); None when nothing is waiting."""
        try:
            nbytes, ancdata, flags, addr = self.sock.recvmsg_into([self._view], self._cmsg_space)
        except BlockingIOError:
            return None
        if len(addr) != 2:  # IPv6: most receives come from the sender of the one before
            last = self._last
            addr = last[1] if last[0] == addr else self._remember(addr)
        size = nbytes
        for level, kind, value in ancdata:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= _INT.size:
                size = _INT.unpack_from(value)[0]
        view = self._view
        if flags & MSG_TRUNC:  # the buffer is 64 KiB: only a bigger-than-IP datagram
            self.stats.inc(Counter.UDP_TRUNCATED)
            if size <= 0 or size >= nbytes:
                return [], addr
            nbytes -= nbytes % size  # keep the complete datagrams
        if size <= 0 or size >= nbytes:
            return [view[:nbytes]], addr
        count = -(-nbytes // size)
        return Rows(view, size, size, count, nbytes - (count - 1) * size), addr

    def _remember(self, addr: tuple[object, ...]) -> Address:
        found = endpoint(addr)
        self._last = (addr, found)
        return found
