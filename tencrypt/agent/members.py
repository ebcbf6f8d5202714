"""Each project's members as the cluster API knows them: the agent's pure half of the
membership feed (``tencrypt-members/2``, ``core/membership.py``; DESIGN §1, §1a).

Rules:
- Input is Kubernetes JSON: every Pod of the cluster (a watch without a node selector: a
  project's pods run on every node), every Service and every EndpointSlice. Nothing here
  does I/O.
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
- Services (core/services.py, what the sending proxy resolves per connection): a Service's
  cluster IPs, its ports (name, protocol, port; the ``targetPort`` is not needed: the
  EndpointSlice controller resolved it per endpoint), and ClientIP affinity with its
  timeout (default 10800 s); its endpoints come from the EndpointSlices labelled
  ``kubernetes.io/service-name`` with it, each endpoint with its slice's ports, its
  conditions (``ready`` unset means ready, ``serving`` unset means ``ready``,
  ``terminating`` unset means false) and its zone hints. An address two slices list (a pod
  moving between them) counts once; FQDN slices are skipped. A malformed slice keeps what
  was known of it (counted), like a malformed Service.
- ``version(project)`` grows whenever the addresses of one of the project's pods or
  Services, or a Service's ports or endpoints, change, by an event or a relist, so it never
  misses a change of the members; a writer compares it with the version it last wrote and
  recomputes ``of(project)`` only then (and writes only if the members differ). An update
  that changes nothing kept here (a pod's labels, a relist that finds what was known) does
  not move it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tencrypt.core.services import DEFAULT_AFFINITY, PROTOCOLS, Endpoint, Port, Service
from tencrypt.core.stats import Counter, Stats
from tencrypt.kube.objects import EventType

FINISHED_PHASES = ("Succeeded", "Failed")
NO_ADDRESS: frozenset[str] = frozenset()
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Named = tuple[str, str, frozenset[str]]  # (namespace, name, addresses)


@dataclass(slots=True, frozen=True)
class ServiceSpec:
    """A Service reduced to what a proxy needs of it (its endpoints come from slices)."""

    ips: tuple[str, ...]
    ports: tuple[Port, ...]
    affinity: float = 0.0

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(self.ips)


@dataclass(slots=True, frozen=True)
class Slice:
    """An EndpointSlice reduced to its Service's name, its endpoints and their ports."""

    service: str
    endpoints: tuple[Endpoint, ...]


@dataclass(slots=True, frozen=True)
class ProjectMembers:
    """What one ``members.json`` says, but its generation (the writer's)."""

    project: str
    version: int
    pods: frozenset[str]
    services: frozenset[str]
    table: tuple[Service, ...] | None = None  # format 2's Services (None: format 1)
    pod_ips: tuple[tuple[str, str], ...] = ()  # dual-stack pods' (IPv4, IPv6): podIPs


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
    parsed = parse_service(obj)
    return None if parsed is None else (parsed[0], parsed[1], parsed[2].addresses)


def parse_service(obj: Any) -> tuple[str, str, ServiceSpec] | None:
    """(namespace, name, its ``ServiceSpec``); None if the object is malformed."""
    meta, spec, _ = _parts(obj)
    key = _named(meta)
    if key is None or spec is None:
        return None
    if spec.get("type") == "ExternalName":
        return (*key, ServiceSpec((), ()))
    ips = spec.get("clusterIPs")
    if ips is None:
        ips = [spec["clusterIP"]] if spec.get("clusterIP") else []
    if not isinstance(ips, list):
        return None
    found = _canonical([ip for ip in ips if ip != "None"])
    ports = _ports(spec.get("ports") or [])
    if found is None or ports is None:
        return None
    affinity = 0.0
    if spec.get("sessionAffinity") == "ClientIP":
        config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        timeout = (
            config.get("timeoutSeconds", DEFAULT_AFFINITY) if isinstance(config, dict) else None
        )
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 < timeout <= 86400:
            return None
        affinity = float(timeout)
    return (*key, ServiceSpec(tuple(sorted(found)), ports, affinity))


def parse_endpoint_slice(obj: Any) -> tuple[str, str, Slice] | None:
    """(namespace, slice name, its ``Slice``); None if the object is malformed."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    key = _named(meta if isinstance(meta, dict) else None)
    labels = (meta or {}).get("labels") if isinstance(meta, dict) else None
    service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    if key is None or not isinstance(service, str) or not service:
        return None
    if obj.get("addressType") not in ("IPv4", "IPv6"):
        return (*key, Slice(service, ()))  # FQDN: nothing a proxy can seal to
    ports = _ports(obj.get("ports") or [], resolved=True)
    listed = obj.get("endpoints") or []
    if ports is None or not isinstance(listed, list):
        return None
    endpoints: list[Endpoint] = []
    for ep in listed:
        got = _endpoints(ep, ports)
        if got is None:
            return None
        endpoints += got
    return (*key, Slice(service, tuple(endpoints)))


def _endpoints(ep: Any, ports: tuple[Port, ...]) -> list[Endpoint] | None:
    if not isinstance(ep, dict):
        return None
    cond = ep.get("conditions") or {}
    addrs = ep.get("addresses")
    hints = ep.get("hints")
    if not isinstance(cond, dict) or not isinstance(addrs, list):
        return None
    ready = cond.get("ready") is not False  # unset means ready (discovery/v1)
    serving = cond.get("serving", ready) is not False
    terminating = cond.get("terminating") is True
    zones: tuple[str, ...] | None = None
    if isinstance(hints, dict):
        listed = hints.get("forZones") or []
        names = (
            [z.get("name") for z in listed if isinstance(z, dict)]
            if isinstance(listed, list)
            else None
        )
        if names is None or not all(isinstance(z, str) and z for z in names):
            return None
        zones = tuple(str(z) for z in names)
    ips = _canonical(addrs)
    if ips is None:
        return None
    return [Endpoint(ip, ports, ready, serving, terminating, zones) for ip in sorted(ips)]


def _ports(listed: Any, resolved: bool = False) -> tuple[Port, ...] | None:
    """A Service's ``spec.ports`` (or with ``resolved`` a slice's ``ports``) as ``Port``s."""
    if not isinstance(listed, list):
        return None
    out = []
    for p in listed:
        if not isinstance(p, dict):
            return None
        name, number = p.get("name") or "", p.get("port")
        proto = PROTOCOLS.get(p.get("protocol") or "TCP")
        if not isinstance(name, str) or proto is None:
            return None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
            if resolved and number is None:
                continue  # a slice port the controller could not resolve: no endpoint has it
            return None
        out.append(Port(name, proto, number))
    return tuple(out)


@dataclass(slots=True)
class MemberView:
    """Pods, Services and EndpointSlices by namespace, reduced to what a membership file
    says. One owner: the loop."""

    stats: Stats = field(default_factory=Stats)
    pods: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # ns -> name ->
    services: dict[str, dict[str, ServiceSpec]] = field(default_factory=dict)
    slices: dict[str, dict[str, Slice]] = field(default_factory=dict)  # ns -> slice name ->
    versions: dict[str, int] = field(default_factory=dict)  # ns -> version

    def replace_pods(self, objs: Iterable[Any]) -> None:
        """A fresh list of every Pod: whatever it lacks is gone."""
        self._replace(self.pods, objs, parse_pod_ips)

    def replace_services(self, objs: Iterable[Any]) -> None:
        self._replace(self.services, objs, parse_service)

    def replace_slices(self, objs: Iterable[Any]) -> None:
        self._replace(self.slices, objs, parse_endpoint_slice)

    def on_pod(self, event: EventType, obj: Any) -> None:
        self._on_event(self.pods, event, parse_pod_ips(obj))

    def on_service(self, event: EventType, obj: Any) -> None:
        self._on_event(self.services, event, parse_service(obj))

    def on_slice(self, event: EventType, obj: Any) -> None:
        self._on_event(self.slices, event, parse_endpoint_slice(obj))

    def version(self, project: str) -> int:
        return self.versions.get(project, 0)

    def of(self, project: str) -> ProjectMembers:
        """The project's members now (empty sets for a project nothing is known of)."""
        pods = frozenset().union(*self.pods.get(project, {}).values())
        specs = self.services.get(project, {})
        services = frozenset().union(*(spec.addresses for spec in specs.values()))
        slices = list(self.slices.get(project, {}).values())
        table = tuple(
            Service(name, spec.ips, spec.ports, _endpoints_of(name, slices), spec.affinity)
            for name, spec in sorted(specs.items())
            if spec.ips
        )
        pairs = tuple(sorted(p for a in self.pods.get(project, {}).values() if (p := _pair(a))))
        return ProjectMembers(project, self.version(project), pods, services, table, pairs)

    def _on_event(
        self,
        table: dict[str, dict[str, Any]],
        event: EventType,
        parsed: tuple[str, str, Any] | None,
    ) -> None:
        if parsed is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
            return
        ns, name, value = parsed
        names = table.setdefault(ns, {})
        before = names.get(name)
        if event is EventType.DELETED or not _holds(value):
            names.pop(name, None)  # no address (yet, or any more): nothing to hold
        else:
            names[name] = value
        if not names:
            del table[ns]
        if before != names.get(name):
            self._bump(ns)

    def _replace(self, table: dict[str, dict[str, Any]], objs: Iterable[Any], parse: Any) -> None:
        old = {ns: dict(names) for ns, names in table.items()}
        table.clear()
        for obj in objs:
            parsed = parse(obj)
            if parsed is None:
                self.stats.inc(Counter.AGENT_BAD_OBJECT)
            elif _holds(parsed[2]):
                table.setdefault(parsed[0], {})[parsed[1]] = parsed[2]
        for ns in set(old) | set(table):
            if old.get(ns) != table.get(ns):
                self._bump(ns)

    def _bump(self, ns: str) -> None:
        self.versions[ns] = self.versions.get(ns, 0) + 1


def _pair(addresses: frozenset[str]) -> tuple[str, str] | None:
    """A dual-stack pod's (IPv4, IPv6) — what lets a proxy believe the address of the family
    a handshake did not come from (core/identity.py); None for any other set."""
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    return (v4[0], v6[0]) if len(v4) == 1 and len(v6) == 1 else None


def _holds(value: frozenset[str] | ServiceSpec | Slice) -> bool:
    """Whether an object is worth keeping: a pod or Service with an address, a slice with an
    endpoint."""
    if isinstance(value, ServiceSpec):
        return bool(value.ips)
    if isinstance(value, Slice):
        return bool(value.endpoints)
    return bool(value)


def _endpoints_of(service: str, slices: Iterable[Slice]) -> tuple[Endpoint, ...]:
    """The endpoints of ``service`` over its slices, an address once (a ready copy first)."""
    chosen: dict[str, Endpoint] = {}
    for sl in slices:
        if sl.service != service:
            continue
        for ep in sl.endpoints:
            held = chosen.get(ep.ip)
            if held is None or (ep.ready and not held.ready):
                chosen[ep.ip] = ep
    return tuple(chosen[ip] for ip in sorted(chosen, key=_sort_key))


def _sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


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
