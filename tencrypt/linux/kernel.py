"""Kernel ABI numbers the shells use and Python's ``socket`` module does not name: each defined
once, here, with the header it comes from (x86-64/arm64 values, the asm-generic ones).

The virtio-net header that TUN frames carry with ``IFF_VNET_HDR`` (``VNET_HDR_LEN`` and its
flags, linux/virtio_net.h) is not here: pure code parses and builds it, so it lives in
``tencrypt.core.batch`` and the shells import it from there (core never imports linux).
"""

from __future__ import annotations

# asm-generic/socket.h (SOL_SOCKET options)
SO_MARK = 36
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SO_NETNS_COOKIE = 71  # u64, getsockopt only; Linux 5.14 (linux/netnsid.py)

# linux/in.h, linux/udp.h (SOL_UDP options)
SOL_UDP = 17  # IPPROTO_UDP
UDP_SEGMENT = 103  # u16 segment size, setsockopt or cmsg
UDP_GRO = 104  # int, setsockopt; cmsg on receive
UDP_MAX_SEGMENTS = 64  # 1 << 6 until 6.9 raised it to 128; the lower bound is safe

# linux/if_tun.h
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# linux/rtnetlink.h
RT_TABLE_MAIN = 254
