"""A project's NetworkPolicies reduced to what one of its proxies enforces: the agent's pure
half of issue #23 ("NetworkPolicy keeps its meaning inside an encrypted project"). The
document is ``tencrypt-netpol/1``, specified and read by ``core/netpolicy.py``.

Rules:
1. Input is Kubernetes JSON as the API server writes it: the project's ``networking.k8s.io/v1``
   NetworkPolicies, the Pods (of the cluster or of the project: others are skipped) and the
   Namespaces (the project's is the one used). Nothing here does I/O. ``World.of`` folds them;
   ``World.reduce(pod)`` is one pod's document; ``World.tunnel_blocked()`` names the policies
   that would drop the tunnel itself where the CNI enforces them on the outer packets.
2. A policy selects the pods of its namespace that ``spec.podSelector`` matches (empty: all)
   and isolates the directions in its ``policyTypes``, defaulted as the API server does; label
   selectors are ``metav1.LabelSelector`` (both: ``agent/netpolobjects.py``).
3. The reduction follows the Kubernetes rules of ``core/netpolicy.py`` (isolation per
   direction, the union of the isolating policies' rules, peers AND ports, empty = all) and
   keeps "nothing" apart from "any": a selector that selects no pod gives an empty address
   list, a named port the pod lacks an empty port list, never ``"any"``.
4. Peers become addresses only for the project's own pods: only they come through the
   tunnel. A pod of another namespace reaches the project in the clear, through the CNI,
   which enforces the same policy on it. So a ``namespaceSelector`` contributes the project's
   pods when it matches the project's Namespace labels, and nothing else. A pod's addresses
   are those its membership counts (``members.parse_pod_ips``: not finished, not on the host
   network, both families). The project's labels include ``kubernetes.io/metadata.name``
   (added when absent, as the API server has since 1.22); with no valid Namespace object, no
   ``namespaceSelector`` matches.
5. Ports: ``(protocol, port, endPort)``, the range inclusive, the protocol TCP when absent,
   every port of the protocol when ``port`` is absent. A named port in ingress is resolved
   here against this pod's container ports (``spec.containers[].ports[]``, same name and
   protocol; a name the pod lacks matches nothing). In egress it depends on the destination:
   the rule keeps the name and the document carries ``named_ports``, the numbers of those
   names for every project pod address.
6. ipBlocks are kept as CIDRs with their ``except`` CIDRs, host bits cleared (``10.0.0.1/24``
   is ``10.0.0.0/24``, as Go's ``net.ParseCIDR`` reads it). They apply to the inner pod
   addresses.
7. Fail closed: a policy that does not parse never widens access. A policy of the project
   that these rules cannot read in full (an unknown key: a newer API's field may narrow what
   it allows; a bad selector, peer, CIDR or port; ``endPort`` without a numeric ``port`` or
   below it; a protocol other than TCP/UDP/SCTP; a ``policyTypes`` entry other than
   Ingress/Egress; no name) is *malformed*: it allows nothing, yet still isolates the pods it
   selects, and where its own parts are unreadable it errs towards isolation: an unreadable
   ``podSelector`` selects every pod of the namespace; unreadable ``policyTypes``, or a
   default that hangs on an unreadable ``egress``, isolate both directions. The whole policy,
   not just its bad part: dropping one bad port could leave an empty port list, which means
   every port. Malformed policies are counted (``agent_bad_object``) and listed in the
   document's ``malformed``.
8. A malformed Pod or Namespace is counted and ignored: it is then no peer, which only
   narrows. The pod being reduced must parse (``NetpolInputError``): the writer keeps the last
   good document. A policy that names another namespace is not the project's and is skipped.

Cost: ``reduce`` is O(policies + rules x project pods); ``tunnel_blocked`` reduces every pod
and asks its table about every peer, O(pods x (reduce + pods x rules)).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tencrypt.agent.netpolobjects import (
    EGRESS,
    INGRESS,
    Labels,
    Peer,
    PodInfo,
    Policy,
    Port,
    namespace_of,
    parse_namespace_labels,
    parse_pod,
    parse_policy,
)
from tencrypt.core import TUNNEL_PORT
from tencrypt.core.netpolicy import FORMAT, PROTOCOLS, from_doc
from tencrypt.core.stats import Counter, Stats


class NetpolInputError(ValueError):
    """The pod to reduce is unknown or its object does not parse."""


class Blocked(NamedTuple):
    """A policy under which the CNI would drop the tunnel for ``pod`` in ``direction``."""

    pod: str
    policy: str
    direction: str  # "ingress" or "egress"
    peers: int  # how many project peer addresses the pod cannot reach or hear that way


@dataclass(slots=True)
class World:
    """One project's pods, policies and namespace labels, parsed once."""

    project: str
    labels: Labels | None  # the project's Namespace labels; None: unknown (rule 4)
    pods: dict[str, PodInfo]
    policies: list[Policy]  # sorted by name
    stats: Stats = field(default_factory=Stats)

    @classmethod
    def of(
        cls,
        project: str,
        policies: Iterable[Any],
        pods: Iterable[Any],
        namespaces: Iterable[Any],
        stats: Stats | None = None,
    ) -> World:
        stats = stats if stats is not None else Stats()
        world = cls(project, None, {}, [], stats)
        for obj in namespaces:
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            if isinstance(meta, dict) and meta.get("name") == project:
                world.labels = parse_namespace_labels(obj)
                if world.labels is None:
                    stats.inc(Counter.AGENT_BAD_OBJECT)
        for obj in pods:
            if namespace_of(obj) == project:
                info = parse_pod(obj)
                if info is None:
                    stats.inc(Counter.AGENT_BAD_OBJECT)
                else:
                    world.pods[info.name] = info
        for index, obj in enumerate(policies):
            if namespace_of(obj) not in (project, None):
                continue
            policy = parse_policy(obj, index)
            if policy.malformed:
                stats.inc(Counter.AGENT_BAD_OBJECT)
            world.policies.append(policy)
        world.policies.sort(key=lambda p: p.name)
        return world

    def reduce(self, pod: str, generation: int = 0) -> dict[str, Any]:
        """The ``tencrypt-netpol/1`` document for the project's pod named ``pod``."""
        target = self.pods.get(pod)
        if target is None:
            raise NetpolInputError(f"no valid pod {pod!r} in {self.project!r}")
        selecting = [p for p in self.policies if p.selector.matches(target.labels)]
        egress = self._direction(selecting, EGRESS, target)
        return {
            "format": FORMAT,
            "project": self.project,
            "pod": pod,
            "generation": generation,
            "ips": sorted_ips(target.ips),
            "ingress": self._direction(selecting, INGRESS, target),
            "egress": egress,
            "named_ports": self._named_ports(egress["rules"]),
            "malformed": [p.name for p in selecting if p.malformed],
        }

    def document_for(self, pod: str) -> dict[str, Any]:
        """``reduce(pod)``, failing closed for a pod these objects cannot describe (unknown
        or malformed): with no policy in the project it is not isolated; with policies, every
        one of them isolates it both ways and allows nothing (a pod whose labels are unknown
        could be selected by any of them)."""
        if pod in self.pods:
            return self.reduce(pod)
        names = [p.name for p in self.policies]
        return {
            "format": FORMAT,
            "project": self.project,
            "pod": pod,
            "generation": 0,
            "ips": [],
            "ingress": {"isolated": bool(names), "policies": list(names), "rules": []},
            "egress": {"isolated": bool(names), "policies": list(names), "rules": []},
            "named_ports": {},
            "malformed": [],
        }

    def tunnel_blocked(self, port: int = TUNNEL_PORT, protocol: str = "UDP") -> list[Blocked]:
        """Where the project's policies, enforced by the CNI on the outer packets, would drop
        the tunnel (``protocol``/``port`` between two of the project's pods): ``blocked_for``
        every pod."""
        return [b for name in sorted(self.pods) for b in self.blocked_for(name, port, protocol)]

    def blocked_for(
        self, name: str, port: int = TUNNEL_PORT, protocol: str = "UDP", doc: Any = None
    ) -> list[Blocked]:
        """``tunnel_blocked`` for the pod ``name`` (its document ``doc`` if already reduced):
        per direction with a denied peer, every policy isolating that direction (none
        allows). O(project pods) once the document is reduced."""
        pod = self.pods.get(name)
        if pod is None or not pod.ips:
            return []
        doc = doc if doc is not None else self.reduce(name)
        if not doc["ingress"]["isolated"] and not doc["egress"]["isolated"]:
            return []
        table, proto = from_doc(doc), PROTOCOLS[protocol]
        others = [ip for other in self.pods.values() if other is not pod for ip in other.ips]
        out: list[Blocked] = []
        for direction, decide in (("ingress", table.ingress), ("egress", table.egress)):
            denied = [d for ip in others if not (d := decide(ip, proto, port)).allowed]
            if denied:
                out.extend(Blocked(name, p, direction, len(denied)) for p in denied[0].isolating)
        return out

    def _direction(self, selecting: list[Policy], kind: str, target: PodInfo) -> dict[str, Any]:
        isolating = [p for p in selecting if kind in p.types]
        rules = []
        for policy in isolating:
            for index, rule in enumerate(policy.ingress if kind == INGRESS else policy.egress):
                rules.append(
                    {
                        "policy": policy.name,
                        "rule": index,
                        "peers": self._peers(rule.peers),
                        "ports": _ports(rule.ports, target if kind == INGRESS else None),
                    }
                )
        return {
            "isolated": bool(isolating),
            "policies": [p.name for p in isolating],
            "rules": rules,
        }

    def _peers(self, peers: tuple[Peer, ...] | None) -> Any:
        if peers is None:
            return "any"
        ips: set[str] = set()
        blocks = []
        for peer in peers:
            if peer.cidr is not None:
                blocks.append({"cidr": peer.cidr, "except": list(peer.excepts)})
            elif peer.namespaces is None or (
                self.labels is not None and peer.namespaces.matches(self.labels)
            ):
                for pod in self.pods.values():
                    if peer.pods.matches(pod.labels):
                        ips |= pod.ips
        return {"ips": sorted_ips(ips), "blocks": blocks}

    def _named_ports(self, rules: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
        """Rule 5: for the names egress rules use, every project pod address's numbers."""
        names = {
            (port["protocol"], port["name"])
            for rule in rules
            if rule["ports"] != "any"
            for port in rule["ports"]
            if "name" in port
        }
        out: dict[str, dict[str, list[int]]] = {}
        for pod in self.pods.values():
            found = {f"{p}/{n}": sorted(pod.ports[p, n]) for p, n in names if (p, n) in pod.ports}
            for ip in pod.ips if found else ():
                out[ip] = found
        return out


def reduce_pod(
    project: str,
    pod: str,
    policies: Iterable[Any],
    pods: Iterable[Any],
    namespaces: Iterable[Any],
    generation: int = 0,
) -> dict[str, Any]:
    """One pod's document straight from the objects (``World.of(...).reduce(pod)``)."""
    return World.of(project, policies, pods, namespaces).reduce(pod, generation)


def _ports(ports: tuple[Port, ...] | None, target: PodInfo | None) -> Any:
    """Rule 5; ``target``: the pod that names resolve against (ingress), None for egress."""
    if ports is None:
        return "any"
    out: list[dict[str, Any]] = []
    for p in ports:
        if p.port is None:
            out.append({"protocol": p.protocol, "port": 1, "end": 0xFFFF})
        elif isinstance(p.port, int):
            out.append({"protocol": p.protocol, "port": p.port, "end": p.end or p.port})
        elif target is None:
            out.append({"protocol": p.protocol, "name": p.port})
        else:
            for n in sorted(target.ports.get((p.protocol, p.port), ())):
                out.append({"protocol": p.protocol, "port": n, "end": n})
    return out


def sorted_ips(ips: Iterable[str]) -> list[str]:
    return sorted(ips, key=lambda ip: (ipaddress.ip_address(ip).version, ipaddress.ip_address(ip)))
