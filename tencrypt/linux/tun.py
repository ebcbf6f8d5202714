"""The TUN device tenc0: open it (created persistent by `tencrypt setup`) and move IP packets.

One packet per read/write (``IFF_NO_PI``: no packet-information header). With ``vnet_hdr=True``
the device is opened with ``IFF_VNET_HDR`` and TCP segmentation offloads, so reads return
super-packets of up to 64 KiB behind a 10-byte virtio-net header (the batch path); without it the
kernel segments to tenc0's MTU first. Kernel constants (linux/if_tun.h) in linux/kernel.py.
"""

from __future__ import annotations

import fcntl
import os
import struct

from tencrypt.core.batch import VNET_HDR_LEN
from tencrypt.errors import SetupError
from tencrypt.linux.kernel import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
)

READ_SIZE = VNET_HDR_LEN + 65536  # the largest TSO frame (gso_max_size 65536) and its header


class Tun:
    """A non-blocking file descriptor on a TUN device."""

    def __init__(self, name: str, *, vnet_hdr: bool = False) -> None:
        self.name = name
        self.vnet_hdr = vnet_hdr
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SetupError(f"cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            if vnet_hdr:
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as exc:
            os.close(self.fd)
            raise SetupError(
                f"cannot attach to TUN {name} ({exc.strerror}); did `tencrypt setup` "
                "run in this namespace?"
            ) from exc

    def fileno(self) -> int:
        return self.fd

    def read(self, size: int = READ_SIZE) -> bytes | None:
        """One packet, or None when nothing is waiting."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None

    def readinto(self, buf: bytearray) -> int:
        """One packet into ``buf`` (reused: no allocation per read); 0 when nothing waits."""
        try:
            return os.readv(self.fd, (buf,))
        except BlockingIOError:
            return 0

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        os.write(self.fd, packet)

    def write_frame(self, vnet_hdr: bytes, packet: bytes | bytearray | memoryview) -> None:
        """One packet behind its virtio-net header (``vnet_hdr=True``), without joining them."""
        os.writev(self.fd, (vnet_hdr, packet))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
