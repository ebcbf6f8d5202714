"""The two route changes the running proxy makes — replace a host route (/32, /128), delete it — as raw rtnetlink
messages (linux/rtnetlink.h, RFC 3549), so that ``tencrypt run`` never loads pyroute2 (about
23 MB of RSS per pod); setup and everything else keep using ``linux.netlink``.

Rules:
- The messages are the ones ``linux.netlink.ensure_route`` / ``remove_route`` make through
  pyroute2 (tests/netns/test_rtnl.py compares the routes they leave): replace = RTM_NEWROUTE
  with NLM_F_CREATE|NLM_F_REPLACE, table main, scope universe, type unicast, protocol
  ``RTPROT_TENCRYPT``, RTA_DST / RTA_OIF / RTA_GATEWAY / RTA_PREFSRC; delete = RTM_DELROUTE
  of the destination in table main, scope universe.
- Like ``linux.netlink``: acts on the namespace the process is in, one short-lived socket per
  call; replacing never fails because the route exists, deleting never because it is gone;
  any other refusal is a ``SetupError`` with the kernel's reason.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from tencrypt.errors import SetupError
from tencrypt.linux.kernel import RT_TABLE_MAIN

RTPROT_TENCRYPT = 137  # linux.netlink.RTPROT_TENCRYPT (that module imports pyroute2)

# linux/netlink.h, linux/rtnetlink.h
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")  # len, type


def _attr(kind: int, value: bytes) -> bytes:
    body = _RTATTR.pack(_RTATTR.size + len(value), kind) + value
    return body + bytes(-len(body) % 4)


def build_route_message(
    kind: int,
    flags: int,
    dst: str,
    *,
    oif: int | None = None,
    gateway: str | None = None,
    src: str | None = None,
    proto: int = 0,
    route_type: int = 0,
    seq: int = 1,
) -> bytes:
    """One RTM_NEWROUTE / RTM_DELROUTE request for the prefix ``dst`` (IPv4 or IPv6; a bare
    address is a host route) in table main."""
    net = ipaddress.ip_network(host_prefix(dst), strict=False)
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    body = _RTMSG.pack(
        family, net.prefixlen, 0, 0, RT_TABLE_MAIN, proto, RT_SCOPE_UNIVERSE, route_type, 0
    )
    body += _attr(RTA_DST, net.network_address.packed)
    if oif is not None:
        body += _attr(RTA_OIF, struct.pack("=I", oif))
    if gateway:
        body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    if src:
        body += _attr(RTA_PREFSRC, ipaddress.ip_address(src).packed)
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        + body
    )


def host_prefix(dst: str) -> str:
    """A route's destination: a bare address as a host prefix (``/32`` for IPv4, ``/128`` for
    IPv6), a prefix as it is. linux.netlink uses it too."""
    if "/" in dst:
        return dst
    return f"{dst}/128" if ":" in dst else f"{dst}/32"


def parse_ack(reply: bytes, seq: int) -> int:
    """The errno of the kernel's answer to request ``seq`` (0: done); -1 if there is none."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(reply):
        length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(reply, pos)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR and got_seq == seq and pos + 20 <= len(reply):
            return -struct.unpack_from("=i", reply, pos + 16)[0]
        pos += (length + 3) & ~3
    return -1


def _request(message: bytes, what: str, ignore: tuple[int, ...] = ()) -> None:
    seq = _NLMSGHDR.unpack_from(message)[3]
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
            sock.bind((0, 0))
            sock.send(message)
            code = -1
            for _ in range(8):  # the answer to our request is the first ACK with its seq
                code = parse_ack(sock.recv(65536), seq)
                if code != -1:
                    break
    except OSError as exc:
        raise SetupError(f"netlink refused {what}: {exc.strerror}") from exc
    if code and code not in ignore:
        reason = os.strerror(code) if code > 0 else "no answer"
        raise SetupError(f"netlink refused {what}: {reason}")


def replace_route(
    dst: str, *, dev: str, gateway: str | None = None, src: str | None = None
) -> None:
    """``linux.netlink.ensure_route(dst, dev=dev, gateway=gateway, src=src)``, pyroute2-free."""
    try:
        oif = socket.if_nametoindex(dev)
    except OSError as exc:
        raise SetupError(f"netlink refused route {dst} dev {dev}: no such device") from exc
    message = build_route_message(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_REPLACE,
        dst,
        oif=oif,
        gateway=gateway,
        src=src,
        proto=RTPROT_TENCRYPT,
        route_type=RTN_UNICAST,
    )
    _request(message, f"route {dst} dev {dev}")


def delete_route(dst: str) -> None:
    """``linux.netlink.remove_route(dst)``: gone already is fine."""
    _request(
        build_route_message(RTM_DELROUTE, 0, dst),
        f"removing route {dst}",
        ignore=(errno.ESRCH, errno.ENOENT),
    )
