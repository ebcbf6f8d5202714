"""``tencrypt lab status``: what the lab is made of and what runs in it, as readable tables.

Everything shown is checked live (namespace present, daemon alive, proxy running), not just
read back from the state file, so a half-dead lab shows which part died. Addresses are shown
for every IP family the lab runs, primary first, separated by a space (an IPv4 lab's tables
are as they always were).
"""

from __future__ import annotations

from collections.abc import Sequence

from tencrypt.core import TUNNEL_PORT
from tencrypt.lab import proxy
from tencrypt.lab.view import LabView
from tencrypt.linux import netns, procs


def table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _daemon(lab: LabView, what: str) -> str:
    pid = procs.read_pid(lab.pid_file(what))
    return f"up (pid {pid})" if pid and procs.alive(pid) else "DOWN"


def _present(ns: str) -> str:
    return ns if netns.exists(ns) else f"{ns} (MISSING)"


def _proxy(lab: LabView, pod_name: str) -> str:
    pod = lab.pods[pod_name]
    if not netns.exists(pod.netns):
        return "-"
    pids = proxy.proxies_in(pod.netns)
    return f"yes (pid {', '.join(map(str, pids))})" if pids else "no"


def _families(lab: LabView) -> str:
    return " + ".join(f"IPv{f}" for f in lab.families)


def render(lab: LabView) -> str:
    out = [
        f"lab {lab.name}: {len(lab.nodes)} node(s), {len(lab.pods)} pods, projects "
        f"{', '.join(lab.projects)}; state in {lab.state_dir}"
        + ("" if lab.families == (4,) else f"; IP families {_families(lab)}"),
        "",
        "NODES",
    ]
    out += table(
        ["NODE", "NETNS", "BRIDGE", "POD CIDR", "UNDERLAY", "DNS " + " ".join(lab.dns_ips)],
        [
            [
                n.name,
                _present(n.netns),
                f"{n.bridge} {' '.join(n.bridge_ips or [n.bridge_ip])}",
                " ".join(n.pod_cidrs or [n.pod_cidr]),
                f"{n.underlay_if} {n.underlay_ip}" if n.underlay_if else "-",
                "dnsmasq " + _daemon(lab, f"{n.name}.dnsmasq"),
            ]
            for n in lab.nodes.values()
        ],
    )
    out += ["", "PODS"]
    out += table(
        ["POD", "PROJECT", "NODE", "NETNS", "IP", "VIP", "MTU", "HTTP", "TENCRYPT"],
        [
            [
                p.name,
                p.project,
                p.node,
                _present(p.netns),
                " ".join(p.ips or [p.ip]),
                " ".join(p.vips or [p.vip]),
                str(p.mtu),
                _daemon(lab, f"{p.name}.http"),
                _proxy(lab, p.name),
            ]
            for p in lab.pods.values()
        ],
    )
    out += ["", "SERVICES (DNAT on every node)"]
    out += table(
        ["SERVICE", "NAME", "VIP", "PORTS", "ENDPOINTS"],
        [
            [
                s.name,
                s.fqdn,
                " ".join(s.cluster_ips) or "None (headless)",
                ", ".join(f"{p.port}/{p.protocol.lower()}->{p.target}" for p in s.ports)
                + (f", {TUNNEL_PORT}/udp+tcp" if s.vip else ""),
                " ".join(f"{e.pod}{'' if e.ready else '(not ready)'}" for e in s.endpoints),
            ]
            for s in lab.services
        ],
    )
    return "\n".join(out) + "\n"
