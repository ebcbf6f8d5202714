"""The proxy's sockets: the tunnel's UDP socket and the raw sockets that inject and bypass.

- ``tunnel_socket``: UDP on 0.0.0.0:<port>, with ``SO_MARK`` so that `ip rule fwmark` sends it out
  of the uplink even to addresses tenc0 routes, and large buffers (``SO_RCVBUFFORCE``, root only,
  beats net.core.rmem_max): default buffers overflow under load and every overflow is a TCP loss.
  On an IPv6-only pod (the tunnel's family follows the pod's primary address) the same socket
  is AF_INET6 on [::]:<port> with ``IPV6_V6ONLY``: it never sees IPv4 as mapped addresses.
- ``inject_socket``: raw ``IPPROTO_RAW`` (implies ``IP_HDRINCL``): opened packets re-enter this
  namespace's stack through it, addressed to the pod itself, so they arrive like any packet.
- ``bypass_socket``: the same with the proxy's mark, to re-send in the clear out of the uplink a
  packet that reached tenc0 for an external destination before its bypass route existed.
- ``start_tcp_server``: ``asyncio.start_server`` on a socket bound here when the address is an
  IP literal (the DNS proxy's TCP side, the metrics endpoint). Given a host, the event loop
  resolves it with getaddrinfo in a thread pool (asyncio's default executor; libuv's under
  uvloop), which then keeps its threads for the proxy's whole life; a name still goes to
  start_server.
Constants from asm-generic/socket.h, in linux/kernel.py.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from tencrypt.errors import SetupError
from tencrypt.linux.kernel import SO_MARK, SO_RCVBUFFORCE, SO_SNDBUFFORCE

BUFFER_BYTES = 8 * 1024 * 1024


def _force_buffers(sock: socket.socket, size: int) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def tunnel_socket(port: int, mark: int, version: int = 4) -> socket.socket:
    """The tunnel's UDP socket over IP ``version`` (6: an IPv6-only pod's)."""
    v6 = version == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        _force_buffers(sock, BUFFER_BYTES)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if v6 else "0.0.0.0", port))
    except OSError as exc:
        sock.close()
        raise SetupError(
            f"cannot open the tunnel's UDP{'/IPv6' if v6 else ''} socket on :{port}: {exc.strerror}"
        ) from exc
    sock.setblocking(False)
    return sock


def raw_socket(mark: int | None = None, family: int = socket.AF_INET) -> socket.socket:
    """A raw ``IPPROTO_RAW`` socket of ``family``: the caller writes the whole IP header (for
    IPv6 too: IPPROTO_RAW implies IPV6_HDRINCL since Linux 4.5)."""
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    _force_buffers(sock, BUFFER_BYTES)
    sock.setblocking(False)
    return sock


class RawSockets:
    """Both families' raw sockets behind one ``sendto``: each packet goes out of the socket of
    its IP version (the first nibble). A kernel without IPv6 has no IPv6 socket: an IPv6
    packet is then refused with EAFNOSUPPORT, as the caller's send errors are (counted)."""

    def __init__(self, mark: int | None = None) -> None:
        self.v4 = raw_socket(mark)
        try:
            self.v6: socket.socket | None = raw_socket(mark, socket.AF_INET6)
        except OSError:
            self.v6 = None

    def sendto(self, data: bytes | bytearray | memoryview, addr: tuple[str, int]) -> int:
        if data and data[0] >> 4 == 6:
            if self.v6 is None:
                raise OSError(errno.EAFNOSUPPORT, "IPv6 is not available in this namespace")
            return self.v6.sendto(data, addr)
        return self.v4.sendto(data, addr)

    def close(self) -> None:
        self.v4.close()
        if self.v6 is not None:
            self.v6.close()


ClientHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def listening_socket(host: str, port: int) -> socket.socket | None:
    """A TCP socket bound to ``host``:``port`` as ``asyncio.start_server`` would bind it
    (SO_REUSEADDR; IPV6_V6ONLY for IPv6), non-blocking, not yet listening; None when
    ``host`` is not an IP literal. OSError when the address cannot be bound."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def start_tcp_server(handler: ClientHandler, host: str, port: int) -> asyncio.Server:
    """``asyncio.start_server(handler, host, port, reuse_address=True)``, without a name
    lookup when ``host`` is an IP literal (module docstring)."""
    sock = listening_socket(host, port)
    if sock is None:
        return await asyncio.start_server(handler, host, port, reuse_address=True)
    try:
        return await asyncio.start_server(handler, sock=sock)
    except BaseException:
        sock.close()
        raise
