"""The cluster's shape, discovered: its Service CIDRs, its pod network and this node's zone —
what every proxy's membership file carries (core/membership.py format 2) and ``tencrypt
setup`` routes (the Service CIDR into tenc0).

Rules:
1. Sources, most trusted first; per kind, the first that names anything wins:
   - the agent's flags ``--service-cidr`` / ``--pod-cidr`` (an operator's override: the
     DaemonSet passes them from its ConfigMap);
   - ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33+; v1beta1 since 1.31):
     ``spec.cidrs`` of every one that is not being deleted;
   - OpenShift's cluster network configuration (config.openshift.io/v1 Network ``cluster``):
     ``status.serviceNetwork`` (else ``spec``) and ``status.clusterNetwork[].cidr``;
   - the Nodes' ``spec.podCIDRs`` (the pod network as the per-node ranges node IPAM gives:
     kubeadm, Flannel, Calico with host-local IPAM); a Node names no Service CIDR.
2. Unknown is an empty list, never a guess: proxies then keep setup's Service CIDR and check
   no claim against a pod network (core/clustershape.py rule 1).
3. The zone is this node's label ``topology.kubernetes.io/zone`` (topology hints,
   core/services.py rule 5); absent: none.
4. CIDRs are kept in canonical text, in the order found, each once; a malformed entry is
   skipped and counted in ``skipped`` (one bad object never hides the others).
Pure: objects in, ``ClusterRanges`` out (agent/agent.py polls the API).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class ClusterRanges:
    service_cidrs: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    zone: str | None = None
    sources: tuple[tuple[str, str], ...] = ()  # (kind, where it came from), for the log
    skipped: int = field(default=0, compare=False)

    def describe(self) -> str:
        """One log line: what was found and where."""
        where = dict(self.sources)
        return (
            f"Service CIDRs {', '.join(self.service_cidrs) or 'unknown'}"
            f" ({where.get('services', 'no source')}); pod network "
            f"{', '.join(self.pod_cidrs) or 'unknown'} ({where.get('pods', 'no source')}); "
            f"zone {self.zone or '-'}"
        )


def discover(
    node: str,
    flag_services: Sequence[str] = (),
    flag_pods: Sequence[str] = (),
    service_cidr_objects: Iterable[Any] | None = None,
    openshift_network: Any = None,
    nodes: Iterable[Any] | None = None,
) -> ClusterRanges:
    """Rules 1-4. ``None`` for a source that is not there (the API does not serve it, or
    the agent may not read it)."""
    skipped = [0]

    def cidrs(values: Iterable[Any]) -> tuple[str, ...]:
        out: dict[str, None] = {}
        for value in values:
            try:
                if not isinstance(value, str):
                    raise TypeError(value)
                out[str(ipaddress.ip_network(value, strict=False))] = None
            except (TypeError, ValueError):
                skipped[0] += 1
        return tuple(out)

    candidates: dict[str, list[tuple[str, tuple[str, ...]]]] = {"services": [], "pods": []}
    candidates["services"].append(("--service-cidr", cidrs(flag_services)))
    candidates["pods"].append(("--pod-cidr", cidrs(flag_pods)))
    if service_cidr_objects is not None:
        found = [
            c
            for obj in service_cidr_objects
            if isinstance(obj, dict) and not (obj.get("metadata") or {}).get("deletionTimestamp")
            for c in _list((obj.get("spec") or {}).get("cidrs"))
        ]
        candidates["services"].append(("ServiceCIDR objects", cidrs(found)))
    if isinstance(openshift_network, dict):
        status = openshift_network.get("status") or {}
        spec = openshift_network.get("spec") or {}
        services = _list(status.get("serviceNetwork")) or _list(spec.get("serviceNetwork"))
        networks = _list(status.get("clusterNetwork")) or _list(spec.get("clusterNetwork"))
        candidates["services"].append(("OpenShift Network config", cidrs(services)))
        candidates["pods"].append(
            (
                "OpenShift Network config",
                cidrs(n.get("cidr") if isinstance(n, dict) else None for n in networks),
            )
        )
    zone = None
    if nodes is not None:
        listed = [n for n in nodes if isinstance(n, dict)]
        per_node = [c for n in listed for c in _list((n.get("spec") or {}).get("podCIDRs"))]
        candidates["pods"].append(("Nodes' podCIDRs", cidrs(per_node)))
        for n in listed:
            meta = n.get("metadata") or {}
            if isinstance(meta, dict) and meta.get("name") == node:
                labels = meta.get("labels") or {}
                value = labels.get(ZONE_LABEL) if isinstance(labels, dict) else None
                zone = value if isinstance(value, str) and value else None
    chosen: dict[str, tuple[str, tuple[str, ...]]] = {}
    for kind, options in candidates.items():
        chosen[kind] = next(((src, c) for src, c in options if c), ("", ()))
    return ClusterRanges(
        chosen["services"][1],
        chosen["pods"][1],
        zone,
        tuple((kind, src) for kind, (src, c) in chosen.items() if c),
        skipped[0],
    )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
