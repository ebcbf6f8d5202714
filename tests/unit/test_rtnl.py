"""linux.rtnl's messages byte by byte (linux/rtnetlink.h), and its reading of the kernel's
answers; tests/netns/test_rtnl.py checks the routes against pyroute2's in a namespace."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from tencrypt.linux import rtnl


def test_replace_message_layout():
    msg = rtnl.build_route_message(
        rtnl.RTM_NEWROUTE,
        rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
        "10.0.0.5/32",
        oif=7,
        gateway="10.0.0.1",
        src="10.0.0.2",
        proto=137,
        route_type=1,
        seq=9,
    )
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (len(msg), 24, 9, 0)
    assert flags == 0x1 | 0x4 | 0x100 | 0x400
    assert struct.unpack_from("=BBBBBBBBI", msg, 16) == (2, 32, 0, 0, 254, 137, 0, 1, 0)
    attrs, pos = {}, 28
    while pos < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, pos)
        attrs[atype] = msg[pos + 4 : pos + alen]
        pos += (alen + 3) & ~3
    assert attrs == {
        1: bytes([10, 0, 0, 5]),
        4: struct.pack("=I", 7),
        5: bytes([10, 0, 0, 1]),
        7: bytes([10, 0, 0, 2]),
    }


def test_delete_message_names_only_the_destination():
    msg = rtnl.build_route_message(rtnl.RTM_DELROUTE, 0, "10.0.0.5")
    assert struct.unpack_from("=HH", msg, 4) == (25, 0x1 | 0x4)
    assert struct.unpack_from("=BBBBBBBBI", msg, 16) == (2, 32, 0, 0, 254, 0, 0, 0, 0)
    assert len(msg) == 28 + 8


def test_acks_and_errors():
    def err(code, seq):
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", code) + bytes(16)

    assert rtnl.parse_ack(err(0, 1), 1) == 0
    assert rtnl.parse_ack(err(-3, 1), 1) == 3  # ESRCH
    assert rtnl.parse_ack(err(-3, 2) + err(0, 1), 1) == 0  # another request's answer first
    assert rtnl.parse_ack(b"", 1) == -1


@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_garbage_answers_never_raise(data, seq):
    assert rtnl.parse_ack(data, seq) >= -(2**31)
