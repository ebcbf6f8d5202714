"""Issue 26, idle CPU zero: tenc0 sends no IPv6 router solicitation (linux/netlink.py
``ensure_tun``). Each one the kernel sends is read from tenc0 by the proxy and wakes it; the
kernel's default solicits forever with back-off (bench/results/idle.md, strace of an idle
proxy). A TUN made the way setup makes it has router_solicitations 0; one made otherwise in
the same namespace keeps the kernel's default (so the check can fail)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tencrypt.linux import netlink, netns

pytestmark = pytest.mark.skipif(
    not Path("/proc/sys/net/ipv6/conf/all").exists(), reason="IPv6 is off on this kernel"
)


def solicitations(name: str) -> int:
    return int(Path(f"/proc/sys/net/ipv6/conf/{name}/router_solicitations").read_text())


def test_setups_tun_sends_no_router_solicitation():
    ns = f"irs{netns.unique_suffix()}"
    netns.create(ns)
    try:
        with netns.entered(ns):
            netlink.ensure_tun("tenc0", 1400)
            ours = solicitations("tenc0")
        subprocess.run(
            ["ip", "-n", ns, "tuntap", "add", "dev", "other0", "mode", "tun"], check=True
        )
        with netns.entered(ns):
            default = solicitations("other0")
        assert ours == 0
        assert default != 0  # the kernel's default: it would solicit
    finally:
        netns.delete(ns)
