"""core.nfqmsg: nfnetlink_queue messages, from byte tables written out of the kernel headers
(linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h) and from
messages a real kernel sent (tests/unit/data/nfqueue, saved by tests/netns/test_nfqueue.py).

The netlink headers are in host order: the tables are written for a little-endian host.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tencrypt.core import nfqmsg
from tencrypt.core.nfqmsg import (
    Flow,
    NetlinkAck,
    NetlinkMessage,
    QueuedPacket,
    QueueStatus,
    build_attr,
    build_bind,
    build_config,
    build_unbind,
    build_verdict,
    build_verdict_batch,
    parse_ack,
    parse_attrs,
    parse_flow,
    parse_packet,
    parse_queue_status,
    split_messages,
)

DATA = Path(__file__).parent / "data" / "nfqueue"
little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="tables are little-endian")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# NFQNL_MSG_CONFIG binding queue 7: bind, copy 128 bytes, maxlen 1024, fail-open off
BIND_7 = h("""
40000000 0203 0500 01000000 00000000
00 00 0007
0800 0100 01 00 0000
0900 0200 00000080 02 000000
0800 0300 00000400
0800 0400 00000001
0800 0500 00000000
""")
#          len       type: 3<<8|2   flags: REQUEST|ACK   seq 1   portid 0
#          nfgenmsg  family AF_UNSPEC, version 0, res_id be16 7
#          NFQA_CFG_CMD       command BIND, pad, pf be16 0
#          NFQA_CFG_PARAMS    copy_range be32 128, copy_mode PACKET (packed, 5 bytes) + pad
#          NFQA_CFG_QUEUE_MAXLEN be32 1024
#          NFQA_CFG_MASK      be32 NFQA_CFG_F_FAIL_OPEN
#          NFQA_CFG_FLAGS     be32 0

UNBIND_7 = h("1c000000 0203 0100 02000000 00000000 00 00 0007 0800 0100 02 00 0000")

# NFQNL_MSG_VERDICT: NF_ACCEPT for packet 5 of queue 7 (no ack asked)
VERDICT_ACCEPT_5 = h("""
20000000 0103 0100 00000000 00000000
00 00 0007
0c00 0200 00000001 00000005
""")
VERDICT_DROP_5 = VERDICT_ACCEPT_5[:-8] + h("00000000 00000005")
BATCH_DROP_UPTO_9 = h("20000000 0303 0100 00000000 00000000 00 00 0007 0c00 0200 00000000 00000009")

UDP_V4 = h("45000026 f7464000 40112da8 0aeb0001 0aeb0002 e1ad14e9 0012c9ec") + b"hello-udp\n"

# NFQNL_MSG_PACKET as the kernel writes it: the final NFQA_PAYLOAD is not padded
PACKET_3 = (
    h("""
00000000 0003 0000 00000000 00000000
02 00 0007
0b00 0100 00000003 0800 01 00
0800 0500 00000002
0800 0300 0000002a
0800 0d00 000005dc
""")
    + struct.pack("<HH", 4 + len(UDP_V4), 10)
    + UDP_V4
)
PACKET_3 = struct.pack("<I", len(PACKET_3)) + PACKET_3[4:]
#          type 3<<8|0, flags 0, seq 0, portid 0; family AF_INET, res_id 7
#          NFQA_PACKET_HDR    packet_id 3, hw_protocol ETH_P_IP, hook NF_INET_LOCAL_IN + pad
#          NFQA_IFINDEX_INDEV 2;  NFQA_MARK 42;  NFQA_CAP_LEN 1500;  NFQA_PAYLOAD


@little_endian
def test_bind_is_one_config_message_with_everything():
    assert build_bind(7, seq=1) == BIND_7
    assert len(BIND_7) == 64


@little_endian
def test_unbind_and_verdicts():
    assert build_unbind(7, seq=2) == UNBIND_7
    assert build_verdict(7, 5, accept=True) == VERDICT_ACCEPT_5
    assert build_verdict(7, 5, accept=False) == VERDICT_DROP_5
    assert build_verdict_batch(7, 9, accept=False) == BATCH_DROP_UPTO_9


@little_endian
def test_config_builds_only_what_is_asked():
    pf_bind = build_config(0, 3, command=nfqmsg.CfgCmd.PF_BIND, pf=socket.AF_INET, ack=False)
    assert pf_bind == h("1c000000 0203 0100 03000000 00000000 00 00 0000 0800 0100 03 00 0002")
    meta = build_config(65535, 4, copy=(nfqmsg.CopyMode.META, 0))
    assert meta == h("20000000 0203 0500 04000000 00000000 00 00 ffff 0900 0200 00000000 01 000000")


def test_attr_padding():
    assert build_attr(1, b"") == h("0400 0100")
    assert build_attr(2, b"\x07") == h("0500 0200 07 000000")
    assert build_attr(3, b"abcd") == h("0800 0300") + b"abcd"


def test_constants_match_the_headers():
    assert (
        nfqmsg.MsgType.PACKET,
        nfqmsg.MsgType.VERDICT,
        nfqmsg.MsgType.CONFIG,
        nfqmsg.MsgType.VERDICT_BATCH,
    ) == (0x300, 0x301, 0x302, 0x303)
    assert (nfqmsg.NF_DROP, nfqmsg.NF_ACCEPT, nfqmsg.NFQA_CFG_F_FAIL_OPEN) == (0, 1, 1)
    assert nfqmsg.NLA_TYPE_MASK == 0x3FFF


@little_endian
def test_parse_a_packet_message():
    (msg,), broken = split_messages(PACKET_3)
    assert not broken and len(PACKET_3) % 4 != 0
    assert parse_packet(msg) == QueuedPacket(
        queue=7,
        family=socket.AF_INET,
        packet_id=3,
        hw_protocol=0x0800,
        hook=1,
        payload=UDP_V4,
        length=1500,
        indev=2,
        mark=42,
    )
    assert parse_ack(msg) is None


def test_parse_the_kernels_packet_message():
    """Captured from Linux 6.18: NFQA_HWADDR (9) comes too, and is ignored."""
    raw = (DATA / "nfq_packet_udp.bin").read_bytes()
    (msg,), broken = split_messages(raw)
    packet = parse_packet(msg)
    assert not broken and packet is not None
    assert (packet.queue, packet.family, packet.hw_protocol, packet.hook, packet.mark) == (
        7,
        socket.AF_INET,
        nfqmsg.ETH_P_IP,
        nfqmsg.NF_INET_LOCAL_IN,
        0,
    )
    assert packet.packet_id >= 1 and packet.indev > 0
    assert packet.payload == UDP_V4 and packet.length == len(UDP_V4)  # 38 bytes: not cut
    assert parse_flow(packet.payload) == Flow(
        4, 17, socket.inet_aton("10.235.0.1"), socket.inet_aton("10.235.0.2"), 57773, 5353
    )


def test_parse_the_kernels_refusal():
    """A verdict for an id the kernel no longer holds: NLMSG_ERROR, -ENOENT, NLM_F_CAPPED."""
    raw = (DATA / "nfq_error_enoent.bin").read_bytes()
    (msg,), broken = split_messages(raw)
    assert not broken and msg.kind == nfqmsg.NLMSG_ERROR
    assert parse_ack(msg) == NetlinkAck(errno=2, seq=0)
    assert parse_packet(msg) is None


@little_endian
def test_acks_and_errors():
    ack = h("24000000 0200 0001 01000000 9a1f0000 00000000") + BIND_7[:16]
    (msg,), _ = split_messages(ack)
    assert parse_ack(msg) == NetlinkAck(0, 1)
    eperm = h("24000000 0200 0001 05000000 9a1f0000 ffffffff") + BIND_7[:16]
    assert parse_ack(split_messages(eperm)[0][0]) == NetlinkAck(1, 5)
    positive = h("14000000 0200 0000 05000000 00000000 01000000")
    assert parse_ack(split_messages(positive)[0][0]) is None
    short = h("12000000 0200 0000 05000000 00000000 0100")
    assert parse_ack(split_messages(short)[0][0]) is None


@little_endian
def test_several_messages_in_one_datagram():
    two = VERDICT_ACCEPT_5 + PACKET_3 + bytes(-len(PACKET_3) % 4) + UNBIND_7
    messages, broken = split_messages(two)
    assert not broken
    assert [m.kind for m in messages] == [0x301, 0x300, 0x302]
    assert parse_packet(messages[1]) is not None


@little_endian
@pytest.mark.parametrize(
    "raw, count",
    [
        (h("10000000 0300 0000 00000000"), 0),  # shorter than a header
        (h("0c000000 0300 0000 00000000 00000000"), 0),  # length below the header's
        (h("20000000 0300 0000 00000000 00000000"), 0),  # length past the end
        (VERDICT_ACCEPT_5 + h("ff"), 1),  # trailing garbage after a good message
    ],
)
def test_broken_framing_is_reported(raw, count):
    messages, broken = split_messages(raw)
    assert broken and len(messages) == count


@little_endian
@pytest.mark.parametrize(
    "body",
    [
        h("02 00 0007"),  # no packet header
        h("02 00 0007 0a00 0100 00000003 0800"),  # packet header too short (6 < 7)
        h("02 00 0007 0b00 0100 00000003 0800 01 00 0600 0d00 0000"),  # CAP_LEN of 2 bytes
        h("02 00 0007 0b00 0100 00000003 0800 01 00 0300 0a00"),  # attribute length below 4
        h("02 00 0007 0b00 0100 00000003 0800 01 00 4000 0a00 45"),  # attribute past the end
        h("02 00 0007 0b00 0100 00000003 0800 01 00 ff"),  # a stray byte after the attributes
        h("02 00"),  # no room for nfgenmsg
    ],
)
def test_malformed_packet_messages_are_none(body):
    assert parse_packet(NetlinkMessage(0x300, 0, 0, 0, body)) is None


def test_a_packet_of_another_type_is_none():
    assert parse_packet(NetlinkMessage(0x302, 0, 0, 0, PACKET_3[16:])) is None


@little_endian
def test_attribute_flags_are_masked_and_the_last_wins():
    data = h("0800 0380 00000001 0800 0340 00000002")  # NFQA_MARK with NESTED, then BYTEORDER
    assert parse_attrs(data) == {3: h("00000002")}
    assert parse_attrs(b"") == {}


def test_parse_flow():
    syn = h("45000028 00004000 40060000 0a000001 0a000002 c0001f90 00000000 00000000 50020000")
    assert parse_flow(syn) == Flow(4, 6, h("0a000001"), h("0a000002"), 0xC000, 8080)
    frag = syn[:6] + h("0010") + syn[8:]  # fragment offset 128: no ports
    assert parse_flow(frag) == Flow(4, 6, h("0a000001"), h("0a000002"), -1, -1)
    options = h("46000030 00004000 40110000 0a000001 0a000002 01010101 0035 0035 0008 0000")
    assert parse_flow(options).dport == 53  # type: ignore[union-attr]
    v6 = h("60000000 0008 1140") + bytes(15) + b"\x01" + bytes(15) + b"\x02" + h("1234 0035")
    assert parse_flow(v6) == Flow(6, 17, bytes(15) + b"\x01", bytes(15) + b"\x02", 0x1234, 53)
    assert parse_flow(syn[:22]) == Flow(4, 6, h("0a000001"), h("0a000002"), -1, -1)  # cut short
    for bad in (b"", syn[:19], h("44") + syn[1:], h("75") + syn[1:], v6[:39]):
        assert parse_flow(bad) is None


def test_parse_queue_status():
    text = (
        "    7   8090     1 2   128     8     3       60  1\n"
        "  300      0     0 2 65531     0     0        0  1\n"
        "garbage line\n\n"
    )
    assert parse_queue_status(text) == {
        7: QueueStatus(7, 8090, 1, 2, 128, 8, 3, 60),
        300: QueueStatus(300, 0, 0, 2, 65531, 0, 0, 0),
    }


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    messages, _ = split_messages(data)
    for msg in messages:
        parse_packet(msg)
        parse_ack(msg)
    parse_packet(NetlinkMessage(0x300, 0, 0, 0, data))
    parse_attrs(data)
    parse_flow(data)
    parse_queue_status(data.decode("latin-1"))


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.booleans(), st.integers(0, 2**32 - 1))
def test_verdicts_split_back(queue, packet_id, accept, seq):
    (msg,), broken = split_messages(build_verdict(queue, packet_id, accept, seq))
    assert not broken and msg.kind == nfqmsg.MsgType.VERDICT and msg.seq == seq
    attrs = parse_attrs(msg.body, nfqmsg.NFGENMSG_LEN)
    assert attrs == {nfqmsg.Attr.VERDICT_HDR: struct.pack(">II", int(accept), packet_id)}
    assert struct.unpack(">H", msg.body[2:4])[0] == queue


def test_rule_specs():
    """The iptables rules of linux/nfqueue.py: tunnel port first, no bypass, INPUT jumps last."""
    from tencrypt.linux.nfqueue import rule_specs

    specs = rule_specs(7, "eth0", ["10.128.0.0/14"], 1337)
    assert [" ".join(s) for s in specs] == [
        "-N TENCRYPT-NFQ",
        "-A TENCRYPT-NFQ -p udp --dport 1337 -j RETURN",
        "-A TENCRYPT-NFQ -s 10.128.0.0/14 -p tcp -m conntrack --ctstate NEW -j NFQUEUE "
        "--queue-num 7",
        "-A TENCRYPT-NFQ -s 10.128.0.0/14 -p udp -m conntrack --ctstate NEW -j NFQUEUE "
        "--queue-num 7",
        "-I INPUT -i eth0 -j TENCRYPT-NFQ",
    ]
    assert not any("bypass" in part for s in specs for part in s)
