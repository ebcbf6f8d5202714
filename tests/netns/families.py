"""What the dual-stack (test_dualstack.py) and the IPv6-only (test_ipv6only.py) namespace tests
check alike, on a lab whose myproject has nginx1, nginx2 (UDP echo port 9999 on its Service)
and nginx3, and Services ``web`` (nginx2 and nginx3, port 80 -> targetPort "app") and
``front`` (nginx2). Each file says what may cross the wire between the project's addresses
(``tunnel``: the tunnel's datagrams of its family; ``also``: what else, e.g. IPv6's neighbour
discovery); the checks here assert it from a capture of node1's bridge.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable
from typing import Any

from tencrypt.lab.capture import Capture, Frame
from tencrypt.lab.cluster import Lab
from tencrypt.linux import netns

HELLO = re.compile(r"Hello from (\w+)")
FramePredicate = Callable[[Frame], bool]


def project_addresses(lab: Lab, project: str = "myproject") -> set[str]:
    """Every address of the project's pods and Services, both families."""
    pods = [p for p in lab.pods.values() if p.project == project]
    services = [s for s in lab.services if s.project == project]
    return {ip for p in pods for ip in (*p.ips, *p.vips)} | {
        ip for s in services for ip in s.cluster_ips
    }


def sealed(
    lab: Lab,
    action: Callable[[], Any],
    marker: str,
    tunnel: FramePredicate,
    also: FramePredicate = lambda f: False,
) -> Any:
    """Run ``action``; assert ``marker`` never crossed node1's bridge in the clear, that the
    tunnel carried something between the project's addresses and that nothing went between
    them but ``tunnel`` (or ``also``) frames. Returns what ``action`` returned."""
    node = lab.nodes["node1"]
    project = project_addresses(lab)
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        result = action()
        frames = cap.stop()
    assert marker.encode() not in cap.data
    between = [f for f in frames if f.src in project and f.dst in project]
    assert any(tunnel(f) for f in between), "no tunnel datagram between the project's pods"
    for f in between:
        assert tunnel(f) or also(f), f
    return result


def curl(
    lab: Lab, url: str, *flags: str, pod: str = "nginx1", marker: str = "m"
) -> tuple[str, str]:
    """(who answered, the address curl connected to); ("", "") when it failed."""
    proc = lab.exec(
        pod,
        ["curl", "-sS", "--max-time", "10", *flags, "-H", f"X-Marker: {marker}"]
        + ["-w", "\\n%{remote_ip}", url],
        check=False,
        timeout=30,
    )
    found = HELLO.search(proc.stdout)
    if proc.returncode or not found:
        return "", ""
    return found.group(1), proc.stdout.strip().splitlines()[-1]


def forty_to_web_over_ipv6(lab: Lab, seal: Callable[..., Any]) -> collections.Counter[str]:
    """40 new connections from nginx1 to web's IPv6 cluster IP, sealed (``seal(lab, action,
    marker)``): who answered each; none may fail."""
    web6 = lab.services_by_name["web"].vip_of(6)
    marker = f"tencrypt-lb6-{secrets.token_hex(4)}"
    script = (
        f'for i in $(seq 40); do curl -sS --max-time 5 -H "X-Marker: {marker}" '
        f"'http://[{web6}]/' || echo FAILED; echo; done"
    )
    out = seal(lab, lambda: lab.exec("nginx1", ["sh", "-c", script], timeout=300).stdout, marker)
    assert out.count("FAILED") == 0, out[-500:]
    return collections.Counter(m.group(1) for m in HELLO.finditer(out))


def pod_after_service_over_ipv6(lab: Lab, seal: Callable[..., Any]) -> tuple[str, ...]:
    """Who answers, sealed: front's IPv6 cluster IP from nginx1, then nginx2's IPv6 pod IP
    from nginx1 on the session the Service made, then nginx1's from nginx2 (the call back)."""
    marker = f"tencrypt-vp6-{secrets.token_hex(4)}"
    front6 = lab.services_by_name["front"].vip_of(6)
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")

    def calls() -> tuple[str, ...]:
        return (
            curl(lab, f"http://[{front6}]/", marker=marker)[0],
            curl(lab, f"http://[{n2.ip_of(6)}]:8080/", marker=marker)[0],
            curl(lab, f"http://[{n1.ip_of(6)}]:8080/", pod="nginx2", marker=marker)[0],
        )

    return seal(lab, calls, marker)  # type: ignore[no-any-return]


def udp_echo_over_ipv6(lab: Lab, seal: Callable[..., Any]) -> str:
    """A UDP/IPv6 echo server in nginx2 (port 9999) asked through nginx2's IPv6 cluster IP
    by a connected socket in nginx1, sealed: what nginx1 printed (the marker upper-cased
    when the answer came back from the cluster IP, i.e. translated back)."""
    n2 = lab.pod("nginx2")
    marker = f"tencrypt-udp6-{secrets.token_hex(4)}"
    echo = netns.spawn(
        n2.netns,
        [
            sys.executable,
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "s.bind(('::',9999))\n"
            "while True:\n d,a=s.recvfrom(2048); s.sendto(d.upper(),a)\n",
        ],
    )
    try:
        client = (
            "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(2)\n"
            f"s.connect(('{n2.vip_of(6)}',9999))\n"
            "for i in range(20):\n"
            f"  s.send(b'{marker}')\n"
            "  try:\n    print(s.recv(2048).decode()); break\n"
            "  except OSError: pass\n"
        )
        out: str = seal(
            lab,
            lambda: lab.exec("nginx1", [sys.executable, "-c", client], timeout=90).stdout,
            marker,
        )
        assert marker.upper() in out  # answered from the VIP: the reply translated back
        return out
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait()


def path_mtu_after_packet_too_big(lab: Lab, dst: str) -> tuple[int, int, int]:
    """tenc0's MTU in nginx1 raised by 60 behind setup's back, one UDP/IPv6 datagram of the
    old MTU's size sent to ``dst``: the proxy answers it with an ICMPv6 Packet Too Big (it is
    above the MTU it was set up with). Returns (tenc0's MTU, the sending socket's path MTU
    before, after). The socket stays open and polls its path MTU (IPV6_MTU): the kernel
    applies a UDP Packet Too Big only while a socket matches its quote."""
    mtu = int(lab.exec("nginx1", ["cat", "/sys/class/net/tenc0/mtu"]).stdout)
    lab.exec("nginx1", ["ip", "link", "set", "tenc0", "mtu", str(mtu + 60)])
    try:
        send = (
            "import socket, time\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, 23, 0)\n"  # IPV6_MTU_DISCOVER: PMTUDISC_DONT
            f"s.connect(('{dst}', 9))\nbefore = s.getsockopt(socket.IPPROTO_IPV6, 24)\n"
            f"s.send(b'x'*{mtu})\n"
            "for _ in range(200):\n"  # IPV6_MTU (24): the path MTU this socket knows
            f"    if s.getsockopt(socket.IPPROTO_IPV6, 24) <= {mtu}: break\n"
            "    time.sleep(0.05)\n"
            "print(before, s.getsockopt(socket.IPPROTO_IPV6, 24))\n"
        )
        before, after = lab.exec("nginx1", [sys.executable, "-c", send]).stdout.split()
        return mtu, int(before), int(after)
    finally:
        lab.exec("nginx1", ["ip", "link", "set", "tenc0", "mtu", str(mtu)], check=False)
        lab.exec("nginx1", ["ip", "-6", "route", "flush", "cache"], check=False)
