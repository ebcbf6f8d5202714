"""The identity of the network namespace this process runs in (core/netnsid.py rule 1).

``current()`` asks the kernel for the namespace's cookie (``getsockopt(SOL_SOCKET,
SO_NETNS_COOKIE)`` on a socket made here: an AF_UNIX datagram socket, which binds nothing and
needs no route) and reads the boot's id. A kernel without the option (before 5.14:
``ENOPROTOOPT``) or a /proc without the boot id gives None, and the ownership of a state
directory falls back to core/netnsid.py rule 3; ``UNKNOWN_HINT`` says so in the log.
Constant from asm-generic/socket.h, in linux/kernel.py.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from tencrypt.core.netnsid import NetnsId
from tencrypt.linux.kernel import SO_NETNS_COOKIE

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
UNKNOWN_HINT = (
    "this kernel does not tell network namespaces apart (SO_NETNS_COOKIE, Linux 5.14): "
    "a state directory counts as this namespace's while the resolv.conf it names is "
    "rewritten by tencrypt"
)


def current(boot_id: Path = BOOT_ID) -> NetnsId | None:
    """This namespace's identity, or None where the kernel or /proc cannot tell it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        boot = boot_id.read_text().strip()
    except OSError:
        return None
    if len(raw) != 8 or not boot:
        return None
    return NetnsId(boot, int.from_bytes(raw, sys.byteorder))
