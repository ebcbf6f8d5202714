"""What a running proxy tells: the ``/status`` document (``tencrypt status`` prints it) and the
``/metrics`` text (Prometheus exposition), both read from the proxy's owners at request time
(core/stats.py rule: gauges are read from their owners, never mirrored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tencrypt.core import exposition
from tencrypt.core.classify import AddrClass, ClassTable
from tencrypt.core.dispatch import Dispatcher
from tencrypt.core.keyring import render_key_metrics
from tencrypt.core.nat import FlowTable
from tencrypt.core.packet import int_to_ip
from tencrypt.core.peer import UNANSWERED_AFTER
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.policyflows import PolicyFlows
from tencrypt.core.session import Tunnel
from tencrypt.core.stats import PROXY_COUNTERS, Stats, snapshot
from tencrypt.linux import firewall, procstat
from tencrypt.linux.members import MembersFile


class FirewallCounters(Protocol):
    @property
    def firewall_counters(self) -> dict[str, int]: ...

    def want_counters(self) -> None: ...


def firewall_counters(effects: FirewallCounters) -> dict[str, int]:
    """The last read of the firewall's counters, and a new read asked for when it is stale
    (linux/effects.py rule 4: read on demand, never on a timer)."""
    effects.want_counters()
    return dict(effects.firewall_counters)


class Proxy(Protocol):
    """What is read of a running proxy (daemon.Proxy has it all)."""

    clock: Callable[[], float]
    stats: Stats
    strict: bool
    tunnel: Tunnel
    table: ClassTable
    dispatch: Dispatcher
    flows: FlowTable
    members: MembersFile | None
    cidr_mismatch: str | None
    config: PodConfig

    @property
    def effects(self) -> FirewallCounters: ...


STANDALONE_LIMITS = (  # logged at start, said in the docs: what standalone cannot do
    "standalone mode (no membership from the node agent): Services are reached through the "
    "node's DNAT of VIP:1337, so one tunnel session per Service endpoint pair: no "
    "per-connection load balancing, a Service port must equal its targetPort, and a pod "
    "reached through a Service cannot also be reached by its pod IP; NetworkPolicies between "
    "patched pods are not enforced (the CNI sees only the tunnel's UDP, and no policy "
    "comes without the agent)"
)


def mode(proxy: Proxy) -> str:
    """``cluster`` (Services resolved here), ``membership-v1`` (members known, Services by
    the node's DNAT) or ``standalone`` (no membership)."""
    if proxy.dispatch.cluster:
        return "cluster"
    if proxy.dispatch.locked:
        return "membership-broken"
    loaded = proxy.members.loaded if proxy.members else None
    return "standalone" if loaded is None else "membership-v1"


def status(proxy: Proxy) -> dict[str, object]:
    """`tencrypt status`: peers and sessions, classification, membership, Services, drops."""
    now = proxy.clock()
    classes = [cls.value for _, cls in proxy.table.items(now)]
    loaded = proxy.members.loaded if proxy.members else None
    dispatch = proxy.dispatch
    return {
        **proxy.tunnel.status(now),
        **snapshot(proxy.stats),
        "strict": proxy.strict,
        "mode": mode(proxy),
        "domain": proxy.config.domain,
        "classification": {c: classes.count(c) for c in ("internal", "external")},
        "membership": None
        if loaded is None
        else {
            "project": loaded.project,
            "generation": loaded.generation,
            "pods": len(loaded.pods),
            "services": len(loaded.services),
        },
        "services": {
            "cluster_ips": len(dispatch.flows.table),
            "flows": len(dispatch.flows),
            "unusable_endpoints": dispatch.flows.table.unusable,
        },
        "guard": [str(net) for net in dispatch.guard.networks],
        "held_destinations": len(dispatch.holds),
        "firewall_refused": firewall_counters(proxy.effects),
        "network_policy": netpol_status(dispatch.netpol),
    }


def netpol_status(netpol: PolicyFlows) -> dict[str, object] | None:
    """The pod's NetworkPolicy as enforced here (None: no policy, nothing enforced)."""
    policy = netpol.policy
    if policy is None:
        return None
    return {
        "pod": policy.pod,
        "ingress": {"isolated": policy.inbound.isolated, "policies": list(policy.inbound.policies)},
        "egress": {
            "isolated": policy.outbound.isolated,
            "policies": list(policy.outbound.policies),
        },
        "malformed": list(policy.malformed),
        "flows": len(netpol),
        "blocked_flows": netpol.blocked,
        "denied_by_peer": {int_to_ip(ip): n for ip, n in netpol.denied_by_peer.items()},
        "tunnel_blocked": [{"direction": d, "policy": p} for d, p in netpol.tunnel_blocked],
    }


def render_netpol_metrics(netpol: PolicyFlows) -> str:
    """Allowed new flows by (direction, policy, rule), denied packets by (direction, the
    isolating policies), and the policies the agent says drop the tunnel."""
    return exposition.text(
        exposition.family("tencrypt_netpol_flows_allowed_total", sorted(netpol.allowed.items()))
        + exposition.family("tencrypt_netpol_packets_denied_total", sorted(netpol.denied.items()))
        + exposition.family(
            "tencrypt_netpol_tunnel_blocked", [(key, 1) for key in netpol.tunnel_blocked]
        )
    )


def render_firewall(counters: dict[str, int]) -> str:
    """Each counting rule of the pod's firewall (linux/firewall.py), 0 until the first read
    (and without a firewall: nothing was refused)."""
    return exposition.text(
        exposition.family(
            "tencrypt_firewall_packets_total",
            [(labels, counters.get(c, 0)) for c, labels in firewall.BY_COMMENT.items()],
        )
    )


def render_metrics(proxy: Proxy) -> str:
    now = proxy.clock()
    classes = [cls for _, cls in proxy.table.items(now)]
    loaded = proxy.members.loaded if proxy.members else None
    dispatch = proxy.dispatch
    gauges: dict[str, float] = {
        "sessions": proxy.tunnel.session_count(),
        "peers": proxy.tunnel.peer_count(),
        "peers_unanswered": sum(
            1
            for p in proxy.tunnel.table.peers
            if p.pending is not None and now - p.pending.first_sent >= UNANSWERED_AFTER
        ),
        "flow_table_entries": len(proxy.flows),
        "service_flow_entries": len(dispatch.flows),
        "service_cluster_ips": len(dispatch.flows.table),
        "cluster_mode": 1.0 if dispatch.cluster else 0.0,
        "dns_table_entries": len(proxy.table),
        "addresses_internal": classes.count(AddrClass.INTERNAL),
        "addresses_external": classes.count(AddrClass.EXTERNAL),
        "members": len(loaded.addresses) if loaded else 0,
        "held_destinations": len(dispatch.holds),
        "key_mismatch_sources": len(proxy.tunnel.key_mismatch),
        "service_cidr_mismatch": 1.0 if proxy.cidr_mismatch else 0.0,
        "membership_broken": 1.0 if proxy.dispatch.locked else 0.0,
        "netpol_enforced": 0.0 if dispatch.netpol.policy is None else 1.0,
        "netpol_flow_entries": len(dispatch.netpol),
    }
    loops = proxy.tunnel.fastpath
    return (
        exposition.render_prometheus(proxy.stats, gauges, PROXY_COUNTERS)
        + render_firewall(firewall_counters(proxy.effects))
        + render_key_metrics(proxy.tunnel.key_status())
        + render_netpol_metrics(dispatch.netpol)
        + procstat.render_runtime(loops.NAME if loops is not None else "python")
    )
