"""Attaching a system to the benchmark's two pods: nothing (vanilla), a peer tunnel, or
Tencrypt in both pods; and the lab whose nginx2 Service has the ports the benchmark uses.

``attach`` yields a ``Target``: where the client connects (over IPv4, and over IPv6 on a
dual-stack lab when the system has an IPv6 path: nginx2's IPv6 Service VIP for vanilla and
Tencrypt, the tunnel's inner IPv6 address for wireguard-go, none for OpenVPN), the tunnel's
interface in the client pod (None: no tunnel) and how to find the tunnel's processes (for memory
and CPU). Leaving the ``with`` block always detaches, also after a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bench import measure, peers
from bench.report import OPENVPN, TENCRYPT_NETPOL, VANILLA, WIREGUARD
from tencrypt.core import TUNNEL_PORT
from tencrypt.errors import SetupError
from tencrypt.lab.cluster import Lab
from tencrypt.lab.proxy import READY, proxies_in
from tencrypt.lab.topology import Pod, Topology
from tencrypt.linux import netns

SERVER = "nginx2"  # whose Service carries the benchmark's ports


@dataclass(slots=True)
class Target:
    host: str  # where iperf3 and the request/response client connect
    ping_host: str
    iface: str | None  # the tunnel's interface in the client pod (None: no tunnel)
    pids: Callable[[], list[int]]  # the tunnel's processes, for memory
    note: str = ""
    host6: str | None = None  # where to connect over IPv6 (None: no IPv6 path)


def bench_topology(ip_family: str = "ipv4") -> Topology:
    """The default lab (of ``ip_family``), nginx2's Service with the benchmark's ports too, as a
    Service with more ports would be (kube-proxy programs them, for each cluster IP; the agent's
    membership lists them, so Tencrypt's sender resolves them): 5201 tcp+udp (iperf3) and 5202
    tcp (request/response)."""
    topology = Topology.default()
    topology.ip_family = ip_family
    ports: list[dict[str, object]] = [{"name": "http", "port": 8080, "targetPort": 8080}]
    ports += [
        {
            "name": f"bench-{proto.lower()}-{port}",
            "port": port,
            "targetPort": port,
            "protocol": proto,
        }
        for proto, port in (
            ("TCP", measure.IPERF_PORT),
            ("UDP", measure.IPERF_PORT),
            ("TCP", measure.RR_PORT),
        )
    ]
    topology.pods = [
        dataclasses.replace(p, service_ports=ports) if p.name == SERVER else p
        for p in topology.pods
    ]
    return topology


@contextlib.contextmanager
def attach(
    system: str, lab: Lab, a: Pod, b: Pod, binary: tuple[str, str] | None = None
) -> Iterator[Target]:
    """``binary``: (system, path) of a --peer-binary, run in place of the Debian one."""
    if binary is not None:
        system = binary[0]
    vip6 = b.vip_of(6) if 6 in lab.families else None
    if system == VANILLA:
        yield Target(
            b.vip,
            b.ip,
            None,
            list,
            "Service VIP via kube-proxy DNAT; ping to the pod IP (a VIP answers no ICMP)",
            vip6,
        )
    elif system in (WIREGUARD, OPENVPN):
        path = binary[1] if binary else system
        if system == WIREGUARD:
            tun = peers.wireguard_up(a, b, netns.unique_suffix(), path, ipv6=vip6 is not None)
        else:
            tun = peers.openvpn_up(a, b, netns.unique_suffix(), path)
        try:
            yield Target(
                tun.server_addr,
                tun.server_addr,
                tun.client_if,
                tun.pids,
                f"{tun.note}; UDP socket buffers forced to {peers.BUFFER_BYTES >> 20} "
                f"MiB (SO_RCVBUF reads {sorted(set(tun.rcvbuf))})",
                tun.server_addr6,
            )
        finally:
            tun.stop()
    else:
        try:
            if system == TENCRYPT_NETPOL:
                lab.set_network_policies(bench_policies(a, b))
            for pod in (a, b):
                lab.patch(pod.name)
            yield Target(
                b.vip,
                b.vip,
                "tenc0",
                lambda: proxies_in(a.netns) + proxies_in(b.netns),
                _ready_line(lab, a),
                vip6,
            )
        finally:
            for pod in (b, a):
                with contextlib.suppress(SetupError, OSError, subprocess.TimeoutExpired):
                    lab.unpatch(pod.name)
            if system == TENCRYPT_NETPOL:
                lab.set_network_policies([])


def bench_policies(a: Pod, b: Pod) -> list[dict[str, object]]:
    """NetworkPolicies that isolate both pods both ways and admit exactly the benchmark:
    ``b``'s ingress from ``a``, ``a``'s egress to ``b`` (every port: ping is ICMP, which a
    rule with ports never admits) and to the cluster DNS, and the tunnel port
    (scripts/k8s/networkpolicy-tunnel.yaml and its egress twin). Every packet of the
    benchmark then goes through both proxies' policy flows."""

    def np(name: str, pod: Pod, kind: str, rules: list[dict[str, object]]) -> dict[str, object]:
        spec: dict[str, object] = {
            "podSelector": {"matchLabels": {"app": pod.name}},
            "policyTypes": [kind],
            kind.lower(): rules,
        }
        meta = {"name": name, "namespace": pod.project}
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta,
            "spec": spec,
        }

    tunnel = [{"protocol": p, "port": TUNNEL_PORT} for p in ("UDP", "TCP")]
    dns = [{"protocol": p, "port": 53} for p in ("UDP", "TCP")]
    project: list[dict[str, object]] = [{"podSelector": {}}]
    return [
        np(
            f"{b.name}-in",
            b,
            "Ingress",
            [
                {"from": [{"podSelector": {"matchLabels": {"app": a.name}}}]},
                {"from": project, "ports": tunnel},
            ],
        ),
        np(
            f"{a.name}-out",
            a,
            "Egress",
            [
                {"to": [{"podSelector": {"matchLabels": {"app": b.name}}}]},
                {"to": project, "ports": tunnel},
                {"ports": dns},
            ],
        ),
        np(f"{a.name}-in", a, "Ingress", [{"from": project, "ports": tunnel}]),
        np(f"{b.name}-out", b, "Egress", [{"to": project, "ports": tunnel}, {"ports": dns}]),
    ]


def _ready_line(lab: Lab, pod: Pod) -> str:
    try:
        text = lab.log_file(f"{pod.name}.tencrypt").read_text(errors="replace")
    except OSError:
        return ""
    return next((line.strip() for line in text.splitlines() if READY in line), "")
