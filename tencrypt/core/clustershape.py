"""The cluster's shape as one pod's proxy sees it: the Service CIDRs, the pod network, and what
a peer may claim to be (DESIGN §1a "Identity is bound to the network").

Rules:
1. The pod network comes from the agent's membership (``podCIDRs``), else from setup's
   ``--pod-cidr``; never from this node's own subnet, which on clusters with a pod subnet
   per node (OpenShift SDN and OVN-Kubernetes, Calico blocks, Flannel) is a fraction of it:
   checking claims against it would refuse every pod of another node. Unknown: not checked.
2. The Service CIDRs are setup's (those routed into tenc0: IPv4, and IPv6 on a dual-stack
   pod) and the cluster's as the agent
   discovered them; a cluster Service CIDR setup did not route, or a Service IP outside every
   known one, is a mismatch to report loudly: those Services still reach tenc0 (their IPs
   are members, routed by /32), but an unknown address in the real range is not guarded.
3. A claimed pod IP must be the datagram's outer source (Kubernetes does not SNAT pod-to-pod
   traffic); sessions may be named after a VIP only on standalone's VIP path.
Pure: configuration and membership in, ranges and a ``ClaimPolicy`` out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from tencrypt.core.identity import ClaimPolicy
from tencrypt.core.membership import Members
from tencrypt.core.podconfig import PodConfig


@dataclass(frozen=True, slots=True)
class Ranges:
    services: tuple[str, ...]  # Service CIDRs: setup's (routed into tenc0) and the cluster's
    pods: tuple[str, ...]  # the pod network: the cluster's, else setup's --pod-cidr
    mismatch: str | None  # what is wrong with setup's view, to log loudly (None: nothing)
    guarded: tuple[str, ...] = ()  # where an unknown address is held: pods, else eth0's subnet


def cluster_ranges(config: PodConfig, members: Members) -> Ranges:
    """Rules 1-2: the ranges the guard and the claims use once a membership is loaded."""
    routed = {
        n.version: n for n in (ipaddress.ip_network(c, strict=False) for c in config.service_cidrs)
    }
    services = tuple(dict.fromkeys((*config.service_cidrs, *members.service_cidrs)))
    pods = members.pod_cidrs or config.pod_cidrs
    nets = [ipaddress.ip_network(c, strict=False) for c in services]
    outside = sorted(
        ip
        for ip in members.services
        if not any(ipaddress.ip_address(ip) in n for n in nets if n.version == _version(ip))
    )
    # IPv6 counts where the pod routes IPv6 (dual-stack, IPv6-only): elsewhere the firewall refuses
    # the project's IPv6 addresses, by design, not by a mismatch
    families = {config.version, 6} if config.pod_ip6 else {config.version}  # IPv6-only: 6
    unrouted = [
        c
        for c in members.service_cidrs
        if (n := ipaddress.ip_network(c, strict=False)).version in families
        and not _within(n, routed.get(n.version))
    ]
    problems = []
    if unrouted:
        problems.append(
            f"the cluster's Service CIDR ({', '.join(unrouted)}) is not the one setup routed "
            f"into {config.tun} ({', '.join(config.service_cidrs)})"
        )
    if outside:
        problems.append(
            f"{len(outside)} Service IPs of the membership lie outside every known Service "
            f"CIDR (e.g. {outside[0]})"
        )
    mismatch = None
    if problems:
        mismatch = (
            "Service CIDR mismatch: "
            + "; ".join(problems)
            + ": the project's listed Services still reach the tunnel (members get a /32 "
            "into it), but any other address of that range leaves by the uplink unchecked; "
            "set the agent's --service-cidr (or fix what it discovers) and restart the pod's "
            "proxy so that setup routes the right range"
        )
    return Ranges(services, pods, mismatch, pods or config.uplink_cidrs)


def _within(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    routed: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
) -> bool:
    return routed is not None and net.version == routed.version and net.subnet_of(routed)  # type: ignore[arg-type]


def _version(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def claim_policy(
    config: PodConfig,
    is_member: Callable[[str], bool | None],
    pod_cidrs: tuple[str, ...],
    service_cidrs: tuple[str, ...] = (),
    vip_sessions: bool = True,
    paired: Callable[[str, str], bool] | None = None,
) -> ClaimPolicy:
    """Rules 1 and 3: what a peer may claim to be, in both families (core/identity.py); a
    dual-stack peer's other address only when the membership pairs it (``paired``)."""
    extra = {"paired": paired} if paired is not None else {}
    return ClaimPolicy(
        pod_cidrs=tuple(pod_cidrs),
        service_cidr=tuple(service_cidrs) or config.service_cidrs,
        self_ip=config.pod_ip,
        reserved=config.own_addresses - {config.pod_ip},
        bind_to_source=True,
        is_member=is_member,
        vip_sessions=vip_sessions,
        **extra,
    )
