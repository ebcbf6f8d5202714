"""The nfnetlink_queue messages: bind a queue, read queued packets, give verdicts.

Rules:
1. Pure: bytes in, dataclasses out, and the reverse. The socket is ``linux/nfqueue.py``.
2. Byte order is the kernel's: the netlink headers (``nlmsghdr``, ``nlattr``, the error code
   of ``nlmsgerr``) are in host order, everything nfnetlink_queue defines is big-endian
   (``__be16``/``__be32`` in linux/netfilter/nfnetlink_queue.h, ``res_id`` of ``nfgenmsg``).
3. Input from the kernel that does not parse gives ``None`` (or ``malformed=True`` for a
   broken stream), never an exception: the shell counts it.
4. One config message binds a queue completely: the kernel (nfqnl_recv_config in
   net/netfilter/nfnetlink_queue.c) applies NFQA_CFG_CMD, then NFQA_CFG_PARAMS,
   NFQA_CFG_QUEUE_MAXLEN and NFQA_CFG_MASK/FLAGS of one message in that order, so no packet
   is ever queued to a bound queue in the default COPY_NONE mode (which the kernel refuses
   and therefore drops) and fail-open is never on, not even for a moment.
5. ``NFQNL_CFG_CMD_PF_BIND``/``PF_UNBIND`` are accepted by ``build_config`` for completeness
   but have been no-ops since Linux 3.8 (the kernel returns 0 before looking at them); the
   shell never sends them.
6. Verdicts are NF_ACCEPT or NF_DROP, nothing else (linux/netfilter.h); a verdict message
   carries no NLM_F_ACK, so the kernel answers only when it refuses one (ENOENT: no such id).

Message layout (linux/netlink.h, linux/netfilter/nfnetlink.h)::

    nlmsghdr  u32 len | u16 type | u16 flags | u32 seq | u32 portid       host order
    nfgenmsg  u8 family | u8 version (0) | be16 res_id (the queue number)
    nlattr*   u16 len | u16 type | value, padded to 4 bytes                 host order header

    type = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_*
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# linux/netlink.h
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_OVERRUN = 0x4
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLMSG_ALIGNTO = 4
NLA_ALIGNTO = 4
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
NLMSG_HDRLEN = 16  # NLMSG_ALIGN(sizeof(struct nlmsghdr))
NLA_HDRLEN = 4  # NLA_ALIGN(sizeof(struct nlattr))

# linux/netfilter/nfnetlink.h
NFNETLINK_V0 = 0
NFNL_SUBSYS_QUEUE = 3
NFGENMSG_LEN = 4  # sizeof(struct nfgenmsg)

# linux/netfilter.h
NF_DROP = 0
NF_ACCEPT = 1
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4

# linux/socket.h (nfgen_family of a packet message: NFPROTO_IPV4/IPV6 equal these)
AF_UNSPEC = 0
AF_INET = 2
AF_INET6 = 10

# linux/if_ether.h (hw_protocol of nfqnl_msg_packet_hdr)
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# linux/in.h
IPPROTO_TCP = 6
IPPROTO_UDP = 17


class MsgType(enum.IntEnum):
    """enum nfqnl_msg_types (linux/netfilter/nfnetlink_queue.h), with the subsystem byte."""

    PACKET = NFNL_SUBSYS_QUEUE << 8 | 0  # NFQNL_MSG_PACKET: kernel -> us
    VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1  # NFQNL_MSG_VERDICT
    CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2  # NFQNL_MSG_CONFIG
    VERDICT_BATCH = NFNL_SUBSYS_QUEUE << 8 | 3  # NFQNL_MSG_VERDICT_BATCH


class Attr(enum.IntEnum):
    """enum nfqnl_attr_type (linux/netfilter/nfnetlink_queue.h): the ones we read or write."""

    PACKET_HDR = 1  # NFQA_PACKET_HDR: struct nfqnl_msg_packet_hdr
    VERDICT_HDR = 2  # NFQA_VERDICT_HDR: struct nfqnl_msg_verdict_hdr
    MARK = 3  # NFQA_MARK: be32
    IFINDEX_INDEV = 5  # NFQA_IFINDEX_INDEV: be32
    PAYLOAD = 10  # NFQA_PAYLOAD: the packet from its network header, up to copy_range
    CAP_LEN = 13  # NFQA_CAP_LEN: be32, the packet's length when PAYLOAD was cut short


class CfgAttr(enum.IntEnum):
    """enum nfqnl_attr_config (linux/netfilter/nfnetlink_queue.h)."""

    CMD = 1  # NFQA_CFG_CMD: struct nfqnl_msg_config_cmd
    PARAMS = 2  # NFQA_CFG_PARAMS: struct nfqnl_msg_config_params
    QUEUE_MAXLEN = 3  # NFQA_CFG_QUEUE_MAXLEN: be32
    MASK = 4  # NFQA_CFG_MASK: be32, which flags this message changes
    FLAGS = 5  # NFQA_CFG_FLAGS: be32, their values


class CfgCmd(enum.IntEnum):
    """enum nfqnl_msg_config_cmds (linux/netfilter/nfnetlink_queue.h)."""

    NONE = 0
    BIND = 1
    UNBIND = 2
    PF_BIND = 3  # obsolete since Linux 3.8 (rule 5)
    PF_UNBIND = 4


class CopyMode(enum.IntEnum):
    """enum nfqnl_config_mode (linux/netfilter/nfnetlink_queue.h)."""

    NONE = 0
    META = 1
    PACKET = 2


# Flags for NFQA_CFG_FLAGS (linux/netfilter/nfnetlink_queue.h)
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_CONNTRACK = 1 << 1
NFQA_CFG_F_GSO = 1 << 2

DEFAULT_COPY_RANGE = 128  # an IPv4 (60) + TCP (60) header at their longest fit; IPv6 + TCP too
DEFAULT_MAXLEN = 1024  # NFQNL_QMAX_DEFAULT in net/netfilter/nfnetlink_queue.c

_NLMSGHDR = struct.Struct("=IHHII")  # host order
_NLATTR = struct.Struct("=HH")  # host order
_NFGENMSG = struct.Struct(">BBH")
_CFG_CMD = struct.Struct(">BxH")  # command, _pad, be16 pf
_CFG_PARAMS = struct.Struct(">IB")  # be32 copy_range, u8 copy_mode (packed: 5 bytes)
_BE32 = struct.Struct(">I")
_VERDICT_HDR = struct.Struct(">II")  # be32 verdict, be32 id
_PACKET_HDR = struct.Struct(">IHB")  # be32 packet_id, be16 hw_protocol, u8 hook (packed: 7)
_ERRNO = struct.Struct("=i")  # nlmsgerr.error, host order, negative errno or 0 for an ack


def _align(n: int) -> int:
    return (n + 3) & ~3


def build_attr(kind: int, value: bytes) -> bytes:
    """One nlattr: header, value, zero padding to 4 bytes (NLA_ALIGN)."""
    size = NLA_HDRLEN + len(value)
    return _NLATTR.pack(size, kind) + value + bytes(_align(size) - size)


def build_message(
    kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b""
) -> bytes:
    """An nfnetlink request: nlmsghdr, nfgenmsg (version 0), then ``attrs`` (already aligned).
    ``portid`` is 0: the message is for the kernel."""
    body = _NFGENMSG.pack(family, NFNETLINK_V0, res_id) + attrs
    return _NLMSGHDR.pack(NLMSG_HDRLEN + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def build_config(
    queue_num: int,
    seq: int,
    *,
    command: CfgCmd | None = None,
    pf: int = AF_UNSPEC,
    copy: tuple[CopyMode, int] | None = None,
    maxlen: int | None = None,
    flags: tuple[int, int] | None = None,
    ack: bool = True,
) -> bytes:
    """NFQNL_MSG_CONFIG for queue ``queue_num`` with the attributes asked for: ``copy`` is
    (mode, range), ``flags`` is (mask, values). With ``ack`` the kernel answers an
    NLMSG_ERROR carrying 0 or the reason it refused."""
    attrs = b""
    if command is not None:
        attrs += build_attr(CfgAttr.CMD, _CFG_CMD.pack(command, pf))
    if copy is not None:
        attrs += build_attr(CfgAttr.PARAMS, _CFG_PARAMS.pack(copy[1], copy[0]))
    if maxlen is not None:
        attrs += build_attr(CfgAttr.QUEUE_MAXLEN, _BE32.pack(maxlen))
    if flags is not None:
        attrs += build_attr(CfgAttr.MASK, _BE32.pack(flags[0]))
        attrs += build_attr(CfgAttr.FLAGS, _BE32.pack(flags[1]))
    return build_message(MsgType.CONFIG, NLM_F_ACK if ack else 0, seq, AF_UNSPEC, queue_num, attrs)


def build_bind(
    queue_num: int, seq: int, copy_range: int = DEFAULT_COPY_RANGE, maxlen: int = DEFAULT_MAXLEN
) -> bytes:
    """Bind ``queue_num`` to the sending socket in one message (rule 4): copy the first
    ``copy_range`` bytes of each packet, hold at most ``maxlen`` packets awaiting a verdict,
    and fail-open explicitly off (mask FAIL_OPEN, value 0): a full queue drops."""
    return build_config(
        queue_num,
        seq,
        command=CfgCmd.BIND,
        copy=(CopyMode.PACKET, copy_range),
        maxlen=maxlen,
        flags=(NFQA_CFG_F_FAIL_OPEN, 0),
    )


def build_unbind(queue_num: int, seq: int, ack: bool = False) -> bytes:
    """Unbind ``queue_num``; the kernel drops every packet still awaiting a verdict."""
    return build_config(queue_num, seq, command=CfgCmd.UNBIND, ack=ack)


def build_verdict(queue_num: int, packet_id: int, accept: bool, seq: int = 0) -> bytes:
    """NFQNL_MSG_VERDICT: NF_ACCEPT or NF_DROP for the one packet ``packet_id``."""
    hdr = _VERDICT_HDR.pack(NF_ACCEPT if accept else NF_DROP, packet_id)
    return build_message(
        MsgType.VERDICT, 0, seq, AF_UNSPEC, queue_num, build_attr(Attr.VERDICT_HDR, hdr)
    )


def build_verdict_batch(queue_num: int, max_id: int, accept: bool, seq: int = 0) -> bytes:
    """NFQNL_MSG_VERDICT_BATCH: the same verdict for every queued packet whose id is not after
    ``max_id`` (ids compare modulo 2**32, nfq_id_after in the kernel)."""
    hdr = _VERDICT_HDR.pack(NF_ACCEPT if accept else NF_DROP, max_id)
    return build_message(
        MsgType.VERDICT_BATCH, 0, seq, AF_UNSPEC, queue_num, build_attr(Attr.VERDICT_HDR, hdr)
    )


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    kind: int  # nlmsg_type
    flags: int
    seq: int
    portid: int
    body: bytes  # everything after the nlmsghdr


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One NFQNL_MSG_PACKET: a packet the kernel holds until we give its verdict."""

    queue: int  # res_id: the queue number
    family: int  # nfgen_family: AF_INET or AF_INET6 for an ip/ip6 table
    packet_id: int
    hw_protocol: int  # ETH_P_IP, ETH_P_IPV6
    hook: int  # NF_INET_LOCAL_IN for an INPUT rule
    payload: bytes  # from the network header, at most copy_range bytes
    length: int  # the packet's full length (NFQA_CAP_LEN, or len(payload) if not cut)
    indev: int  # NFQA_IFINDEX_INDEV, 0 when absent
    mark: int  # NFQA_MARK, 0 when absent


@dataclass(frozen=True, slots=True)
class NetlinkAck:
    """An NLMSG_ERROR: ``errno`` 0 is the ack of a request with NLM_F_ACK."""

    errno: int  # positive errno, or 0
    seq: int  # the seq of the request it answers


@dataclass(frozen=True, slots=True)
class Flow:
    """Addresses and ports of a queued packet's headers (enough to classify its source)."""

    version: int  # 4 or 6
    proto: int  # IPPROTO_*; for IPv6, the first next-header
    src: bytes  # 4 or 16 bytes
    dst: bytes
    sport: int  # TCP/UDP ports; -1 when not known (other protocol, fragment, cut short)
    dport: int


def split_messages(buf: bytes) -> tuple[list[NetlinkMessage], bool]:
    """The netlink messages in one datagram, and whether a broken header ended the walk
    early (the rest of ``buf`` is lost: its length fields cannot be trusted)."""
    out: list[NetlinkMessage] = []
    off, end = 0, len(buf)
    while off < end:
        if end - off < NLMSG_HDRLEN:
            return out, True
        size, kind, flags, seq, portid = _NLMSGHDR.unpack_from(buf, off)
        if size < NLMSG_HDRLEN or off + size > end:
            return out, True
        out.append(NetlinkMessage(kind, flags, seq, portid, buf[off + NLMSG_HDRLEN : off + size]))
        off += _align(size)
    return out, False


def parse_attrs(data: bytes, start: int = 0) -> dict[int, bytes] | None:
    """Attributes from ``start`` to the end, by type (flag bits masked off; a later one of a
    type wins, as in the kernel's nla_parse). The last may lack its padding (the kernel does
    not pad a packet message's final NFQA_PAYLOAD). None if a length is impossible."""
    attrs: dict[int, bytes] = {}
    off, end = start, len(data)
    while end - off >= NLA_HDRLEN:
        size, kind = _NLATTR.unpack_from(data, off)
        if size < NLA_HDRLEN or off + size > end:
            return None
        attrs[kind & NLA_TYPE_MASK] = data[off + NLA_HDRLEN : off + size]
        off += _align(size)
    return attrs if off >= end else None


def parse_packet(msg: NetlinkMessage) -> QueuedPacket | None:
    """A NFQNL_MSG_PACKET; None for another message or one without a valid packet header."""
    if msg.kind != MsgType.PACKET or len(msg.body) < NFGENMSG_LEN:
        return None
    family, _version, queue = _NFGENMSG.unpack_from(msg.body, 0)
    attrs = parse_attrs(msg.body, NFGENMSG_LEN)
    if attrs is None:
        return None
    hdr = attrs.get(Attr.PACKET_HDR)
    if hdr is None or len(hdr) < _PACKET_HDR.size:
        return None
    packet_id, hw_protocol, hook = _PACKET_HDR.unpack_from(hdr, 0)
    payload = attrs.get(Attr.PAYLOAD, b"")
    cap_len, indev, mark = (
        _u32(attrs.get(a)) for a in (Attr.CAP_LEN, Attr.IFINDEX_INDEV, Attr.MARK)
    )
    if cap_len < 0 or indev < 0 or mark < 0:
        return None
    return QueuedPacket(
        queue, family, packet_id, hw_protocol, hook, payload, cap_len or len(payload), indev, mark
    )


def _u32(value: bytes | None) -> int:
    """A be32 attribute; 0 when absent, -1 when it has the wrong size."""
    if value is None:
        return 0
    return int(_BE32.unpack(value)[0]) if len(value) == 4 else -1


def parse_ack(msg: NetlinkMessage) -> NetlinkAck | None:
    """An NLMSG_ERROR (an ack when its errno is 0); None for any other message."""
    if msg.kind != NLMSG_ERROR or len(msg.body) < _ERRNO.size:
        return None
    error = _ERRNO.unpack_from(msg.body, 0)[0]
    return NetlinkAck(-error, msg.seq) if error <= 0 else None


def parse_flow(payload: bytes) -> Flow | None:
    """Version, protocol, addresses and ports from the first bytes of an IP packet (cut to a
    copy range: the total length is not checked against ``payload``). None if the fixed IP
    header is not all there or is not IPv4/IPv6."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4:
        hlen = (payload[0] & 0x0F) * 4
        if len(payload) < 20 or hlen < 20:
            return None
        proto, src, dst = payload[9], payload[12:16], payload[16:20]
        first = (struct.unpack_from(">H", payload, 6)[0] & 0x1FFF) == 0
    elif version == 6:
        if len(payload) < 40:
            return None
        hlen, proto, src, dst, first = 40, payload[6], payload[8:24], payload[24:40], True
    else:
        return None
    sport = dport = -1
    if first and proto in (IPPROTO_TCP, IPPROTO_UDP) and len(payload) >= hlen + 4:
        sport, dport = struct.unpack_from(">HH", payload, hlen)
    return Flow(version, proto, bytes(src), bytes(dst), sport, dport)


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One line of /proc/net/netfilter/nfnetlink_queue (seq_show in nfnetlink_queue.c)."""

    queue: int
    portid: int  # the bound socket's netlink port id
    waiting: int  # queue_total: packets awaiting a verdict now
    copy_mode: int
    copy_range: int
    dropped_full: int  # queue_dropped: refused because ``waiting`` reached maxlen
    dropped_user: int  # queue_user_dropped: could not be delivered (our socket was full)
    last_id: int  # id_sequence: ids handed out so far


def parse_queue_status(text: str) -> dict[int, QueueStatus]:
    """The bound queues of a namespace, by number. Lines that do not parse are skipped."""
    out: dict[int, QueueStatus] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or not all(f.isdigit() for f in fields[:8]):
            continue
        status = QueueStatus(*(int(f) for f in fields[:8]))
        out[status.queue] = status
    return out
