"""Each project's members as the cluster API knows them: the agent's pure half of the
membership feed (``tencrypt-members/1``, ``core/membership.py``; DESIGN §1a).

Rules:
- Input is Kubernetes JSON: every Pod of the cluster (a watch without a node selector: a
  project's pods run on every node) and every Service. Nothing here does I/O.
- A project's members are the pod IPs of its pods, both families (``status.podIPs``, else
  ``status.podIP``), and the cluster IPs of its Services, both families
  (``spec.clusterIPs``, else ``spec.clusterIP``).
- A pod counts while it has an IP and its phase is neither ``Succeeded`` nor ``Failed``
  (its sandbox is gone or going). A pod being deleted still counts until its object is
  gone: its containers are still shutting down and talking to their peers.
- A host-network pod never counts: its IP is the node's, shared by the node itself
  (kubelet probes) and every host-network pod of any project. Calling it internal would
  refuse the node's own plaintext in strict mode.
- A headless Service (``None``) and an ExternalName Service have no cluster IP.
- Addresses are kept in canonical text (one spelling per address, as ``parse_members``
  writes them). A malformed object is counted (``agent_bad_object``) and ignored; a pod or
  Service whose update is malformed keeps what was known of it: membership errs towards
  internal, never away from it.
- ``version(project)`` grows whenever the addresses of one of the project's pods or
  Services change, by an event or a relist, so it never misses a change of the members; a
  writer compares it with the version it last wrote and recomputes ``of(project)`` only
  then (and writes only if the members differ: two objects may share an address). An update
  that changes no address (a pod's readiness, a relist that finds what was known) does not
  move it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tencrypt.core.stats import Counter, Stats
from tencrypt.kube.objects import EventType

FINISHED_PHASES = ("Succeeded", "Failed")
NO_ADDRESS: frozenset[str] = frozenset()

Named = tuple[str, str, frozenset[str]]  # (namespace, name, addresses)


@dataclass(slots=True, frozen=True)
class ProjectMembers:
    """What one ``members.json`` says, but its generation (the writer's)."""

    project: str
    version: int
    pods: frozenset[str]
    services: frozenset[str]


def parse_pod_ips(obj: Any) -> Named | None:
    """(namespace, name, the pod's IPs that count); None if the object is malformed."""
    meta, spec, status = _parts(obj)
    key = _named(meta)
    if key is None or spec is None or status is None:
        return None
    if spec.get("hostNetwork") is True or status.get("phase") in FINISHED_PHASES:
        return (*key, NO_ADDRESS)
    listed = status.get("podIPs")
    if listed is not None and not isinstance(listed, list):
        return None
    texts = [e.get("ip") if isinstance(e, dict) else None for e in listed or []]
    if status.get("podIP"):
        texts.append(status.get("podIP"))
    ips = _canonical(texts)
    return None if ips is None else (*key, ips)


def parse_service_ips(obj: Any) -> Named | None:
    """(namespace, name, the Service's cluster IPs); None if the object is malformed."""
    meta, spec, _ = _parts(obj)
    key = _named(meta)
    if key is None or spec is None:
        return None
    if spec.get("type") == "ExternalName":
        return (*key, NO_ADDRESS)
    ips = spec.get("clusterIPs")
    if ips is None:
        ips = [spec["clusterIP"]] if spec.get("clusterIP") else []
    if not isinstance(ips, list):
        return None
    found = _canonical([ip for ip in ips if ip != "None"])
    return None if found is None else (*key, found)


@dataclass(slots=True)
class MemberView:
    """Pods and Services by namespace, reduced to their addresses. One owner: the loop."""

    stats: Stats = field(default_factory=Stats)
    pods: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # ns -> name ->
    services: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # ns -> version

    def replace_pods(self, objs: Iterable[Any]) -> None:
        """A fresh list of every Pod: whatever it lacks is gone."""
        self._replace(self.pods, objs, parse_pod_ips)

    def replace_services(self, objs: Iterable[Any]) -> None:
        self._replace(self.services, objs, parse_service_ips)

    def on_pod(self, event: EventType, obj: Any) -> None:
        self._on_event(self.pods, event, parse_pod_ips(obj))

    def on_service(self, event: EventType, obj: Any) -> None:
        self._on_event(self.services, event, parse_service_ips(obj))

    def version(self, project: str) -> int:
        return self.versions.get(project, 0)

    def of(self, project: str) -> ProjectMembers:
        """The project's members now (empty sets for a project nothing is known of)."""
        pods = frozenset().union(*self.pods.get(project, {}).values())
        services = frozenset().union(*self.services.get(project, {}).values())
        return ProjectMembers(project, self.version(project), pods, services)

    def _on_event(
        self, table: dict[str, dict[str, frozenset[str]]], event: EventType, parsed: Named | None
    ) -> None:
        if parsed is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
            return
        ns, name, ips = parsed
        names = table.setdefault(ns, {})
        before = names.get(name)
        if event is EventType.DELETED:
            names.pop(name, None)
        elif ips:
            names[name] = ips
        else:
            names.pop(name, None)  # no address (yet, or any more): nothing to hold
        if not names:
            del table[ns]
        if before != names.get(name):
            self._bump(ns)

    def _replace(
        self, table: dict[str, dict[str, frozenset[str]]], objs: Iterable[Any], parse: Any
    ) -> None:
        old = {ns: dict(names) for ns, names in table.items()}
        table.clear()
        for obj in objs:
            parsed = parse(obj)
            if parsed is None:
                self.stats.inc(Counter.AGENT_BAD_OBJECT)
            elif parsed[2]:
                table.setdefault(parsed[0], {})[parsed[1]] = parsed[2]
        for ns in set(old) | set(table):
            if old.get(ns) != table.get(ns):
                self._bump(ns)

    def _bump(self, ns: str) -> None:
        self.versions[ns] = self.versions.get(ns, 0) + 1


def _parts(obj: Any) -> tuple[dict[str, Any] | None, ...]:
    if not isinstance(obj, dict):
        return None, None, None
    out = []
    for key in ("metadata", "spec", "status"):
        value = obj.get(key) or {}
        out.append(value if isinstance(value, dict) else None)
    return tuple(out)


def _named(meta: dict[str, Any] | None) -> tuple[str, str] | None:
    ns = meta.get("namespace") if meta else None
    name = meta.get("name") if meta else None
    if isinstance(ns, str) and ns and isinstance(name, str) and name:
        return ns, name
    return None


def _canonical(texts: Iterable[Any]) -> frozenset[str] | None:
    """Every text as its canonical address; None if one is not an address at all."""
    out = set()
    for text in texts:
        if not isinstance(text, str):
            return None
        try:
            out.add(str(ipaddress.ip_address(text)))
        except ValueError:
            return None
    return frozenset(out)
