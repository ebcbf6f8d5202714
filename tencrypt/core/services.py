"""The project's Services as the sending proxy resolves them: cluster IPs, ports, endpoints,
and the choice kube-proxy makes per connection (DESIGN §1 "Services are resolved per
connection, by the sender"). The node agent hands them over in the membership file
(core/membership.py, format 2); core/conntrack.py keeps the choice per flow.

Rules:
1. A Service is reached at any of its cluster IPs (one per family in a dual-stack cluster)
   on one of its ports, by (protocol, port). Another port of a cluster IP, or a protocol the
   Service does not list, has no endpoint: the packet is rejected, as kube-proxy's nftables
   mode rejects it. An ICMP echo (ICMPv6 echo to an IPv6 cluster IP) goes to one of the
   Service's endpoints (what IPVS mode gives, where the node answers; iptables mode drops it),
   so that ping sees the path the Service takes.
2. Families stay apart: a cluster IP's endpoints are those of its own family (kube-proxy
   programs each family from its own EndpointSlices; the file's ``endpoints`` list mixes
   them), so an IPv6 cluster IP leads to IPv6 pod IPs only and an IPv4 one to IPv4 ones; a
   family without endpoints has none (REJECT, as kube-proxy). The endpoints of a Service port
   are those whose EndpointSlice lists a port of the same name and protocol; its number there
   is the target port. A named ``targetPort`` resolves
   per endpoint, as the EndpointSlice controller wrote it (pods of one Service may use
   different numbers for one name).
3. Only project pods are endpoints here: an endpoint address that is not a member pod IP (a
   selector-less Service pointing elsewhere) is never chosen: the tunnel cannot carry it,
   and in the clear its reply would bypass the translation back. It is counted
   (``unusable_endpoints``) when the table is built.
4. A new flow goes to a ready endpoint (condition ``ready`` not false), each with equal
   probability; when none is ready, to a serving terminating one (kube-proxy's rule since
   1.28, so a rollout never blackholes); when there is none either, the Service port has no
   endpoint and the packet is rejected.
5. Topology: when every candidate of rule 4 carries zone hints (EndpointSlice
   ``hints.forZones``: trafficDistribution PreferClose, topology-aware routing) and some of
   them name this node's zone, only those are chosen; otherwise all of them (kube-proxy).
6. Session affinity ClientIP keeps this pod (the only client IP a proxy serves) on the
   endpoint of its first choice for a Service port until ``affinity`` seconds pass without a
   new flow there; core/conntrack.py holds the choice, this table only its timeout.
7. An existing flow may keep its endpoint while that endpoint is still listed for the port
   as ready or serving (a terminating pod that still serves finishes its flows: ``keep``);
   core/conntrack.py decides what happens to the others.
8. Parsing (``parse_service``): a malformed Service is a ``ServiceError`` saying what is
   wrong; protocols are TCP, UDP and SCTP (SCTP is listed but not translated: its checksum is
   a CRC32c, so its packets are rejected rather than sent with a wrong one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tencrypt.core.packet import ADDR_MASK, ICMP, ICMPV6, SCTP, TCP, UDP, V6, ip_key

PROTOCOLS = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
TRANSLATED = frozenset({TCP, UDP})  # SCTP's CRC32c is not rewritten: rule 8
MAX_PORTS = 1024  # per Service or endpoint; Kubernetes has no limit, a file needs one
MAX_ENDPOINTS = 1 << 16  # per Service
DEFAULT_AFFINITY = 10800.0  # Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds


class ServiceError(ValueError):
    """A Service entry of the membership file is malformed (the message says how)."""


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    protocol: int  # IP protocol number: TCP, UDP or SCTP
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    ports: tuple[Port, ...] = ()
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zones: tuple[str, ...] | None = None  # hints.forZones; None: no hints


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    ips: tuple[str, ...]  # cluster IPs, canonical text; empty for a headless Service
    ports: tuple[Port, ...]
    endpoints: tuple[Endpoint, ...] = ()
    affinity: float = 0.0  # ClientIP affinity timeout in seconds; 0: none


@dataclass(frozen=True, slots=True)
class Backends:
    """One Service port as the data path uses it (rules 2-7). Addresses are keys
    (``packet.addr_key``: an IPv4 address's int, ``V6 | address`` for IPv6)."""

    service: str
    choose: tuple[tuple[int, int], ...]  # (endpoint, target port) a new flow may get
    keep: frozenset[tuple[int, int]]  # what an existing flow may go on using
    affinity: float = 0.0


class ServiceTable:
    """Cluster IP (its key) -> (protocol, port) -> ``Backends``; built once per membership.
    An IPv4 cluster IP's echo entry is (ICMP, 0), an IPv6 one's (ICMPV6, 0)."""

    __slots__ = ("by_vip", "packed", "names", "unusable")

    def __init__(
        self,
        by_vip: Mapping[int, Mapping[tuple[int, int], Backends]] | None = None,
        unusable: int = 0,
    ) -> None:
        self.by_vip: dict[int, dict[tuple[int, int], Backends]] = {
            vip: dict(ports) for vip, ports in (by_vip or {}).items()
        }
        self.packed = frozenset(
            (vip & ADDR_MASK).to_bytes(16 if vip >= V6 else 4, "big") for vip in self.by_vip
        )
        self.names = {vip: next(iter(p.values())).service for vip, p in self.by_vip.items() if p}
        self.unusable = unusable  # rule 3: endpoints left out because they are not members

    def __len__(self) -> int:
        return len(self.by_vip)

    def __contains__(self, vip: int) -> bool:
        return vip in self.by_vip

    def lookup(self, vip: int, proto: int, port: int) -> Backends | None:
        """The backends of ``vip``'s (proto, port), or None: no such Service port (rule 1)."""
        ports = self.by_vip.get(vip)
        return None if ports is None else ports.get((proto, port))

    @classmethod
    def build(
        cls, services: Iterable[Service], pods: frozenset[str], zone: str | None = None
    ) -> ServiceTable:
        """The table for ``services`` whose endpoints may only be the ``pods`` (rule 3)."""
        by_vip: dict[int, dict[tuple[int, int], Backends]] = {}
        unusable = 0
        for svc in services:
            usable = [e for e in svc.endpoints if e.ip in pods]
            unusable += len({e.ip for e in svc.endpoints}) - len({e.ip for e in usable})
            for v6, icmp in ((False, ICMP), (True, ICMPV6)):  # rule 2: one family at a time
                vips = [key for key in map(ip_key, svc.ips) if (key >= V6) == v6]
                if not vips:
                    continue
                own = [e for e in usable if (ip_key(e.ip) >= V6) == v6]
                ports = {(p.protocol, p.port): _backends(svc, p, own, zone) for p in svc.ports}
                ports[icmp, 0] = _echo_backends(svc, own, zone)
                for vip in vips:
                    by_vip[vip] = ports
        return cls(by_vip, unusable)


def _backends(svc: Service, port: Port, usable: Sequence[Endpoint], zone: str | None) -> Backends:
    listed: list[tuple[Endpoint, int]] = []
    for e in usable:
        target = next(
            (p.port for p in e.ports if p.name == port.name and p.protocol == port.protocol), None
        )
        if target is not None:
            listed.append((e, target))
    chosen = _candidates([e for e, _ in listed], zone)
    choose = tuple((ip_key(e.ip), t) for e, t in listed if e in chosen)
    keep = frozenset((ip_key(e.ip), t) for e, t in listed if e.ready or e.serving)
    return Backends(svc.name, choose, keep, svc.affinity)


def _echo_backends(svc: Service, usable: Sequence[Endpoint], zone: str | None) -> Backends:
    chosen = _candidates(usable, zone)
    choose = tuple(dict.fromkeys((ip_key(e.ip), 0) for e in chosen))
    keep = frozenset((ip_key(e.ip), 0) for e in usable if e.ready or e.serving)
    return Backends(svc.name, choose, keep, svc.affinity)


def _candidates(endpoints: Sequence[Endpoint], zone: str | None) -> list[Endpoint]:
    """Rules 4-5: the endpoints a new flow may go to."""
    ready = [e for e in endpoints if e.ready]
    if not ready:
        ready = [e for e in endpoints if e.serving and e.terminating]
    if zone is not None and ready and all(e.zones is not None for e in ready):
        near = [e for e in ready if zone in (e.zones or ())]
        if near:
            return near
    return ready


# --- the membership file's form (core/membership.py format 2) --------------------------------


def parse_service(doc: Any) -> Service:
    """Rule 8: one entry of the file's ``services`` list."""
    if not isinstance(doc, dict):
        raise ServiceError("a Service must be a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ServiceError("a Service needs a non-empty 'name'")
    where = f"Service {name!r}"
    ips = tuple(_address(ip, f"{where}: 'ips'") for ip in _list(doc.get("ips", []), where, "ips"))
    ports = tuple(_port(p, where) for p in _list(doc.get("ports", []), where, "ports"))
    if len(ports) > MAX_PORTS:
        raise ServiceError(f"{where}: more than {MAX_PORTS} ports")
    if len({(p.protocol, p.port) for p in ports}) != len(ports):
        raise ServiceError(f"{where}: a (protocol, port) is listed twice")
    endpoints = tuple(
        _endpoint(e, where) for e in _list(doc.get("endpoints", []), where, "endpoints")
    )
    if len(endpoints) > MAX_ENDPOINTS:
        raise ServiceError(f"{where}: more than {MAX_ENDPOINTS} endpoints")
    affinity = doc.get("affinitySeconds", 0)
    if not isinstance(affinity, int) or isinstance(affinity, bool) or not 0 <= affinity <= 86400:
        raise ServiceError(f"{where}: 'affinitySeconds' must be an integer in 0..86400")
    return Service(name, ips, ports, endpoints, float(affinity))


def render_service(svc: Service) -> dict[str, object]:
    """The file's form of ``svc`` (``parse_service`` reads it back equal)."""
    out: dict[str, object] = {
        "name": svc.name,
        "ips": list(svc.ips),
        "ports": [_render_port(p) for p in svc.ports],
        "endpoints": [
            {
                "ip": e.ip,
                "ready": e.ready,
                "serving": e.serving,
                "terminating": e.terminating,
                "ports": [_render_port(p) for p in e.ports],
                **({} if e.zones is None else {"zones": list(e.zones)}),
            }
            for e in svc.endpoints
        ],
    }
    if svc.affinity:
        out["affinitySeconds"] = int(svc.affinity)
    return out


def _render_port(p: Port) -> dict[str, object]:
    return {"name": p.name, "protocol": PROTOCOL_NAMES[p.protocol], "port": p.port}


def _list(value: Any, where: str, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ServiceError(f"{where}: {key!r} must be a list")
    return value


def _address(value: Any, where: str) -> str:
    try:
        if not isinstance(value, str):
            raise TypeError(value)
        return str(ipaddress.ip_address(value))
    except (TypeError, ValueError):
        raise ServiceError(f"{where}: not an IP address: {value!r}") from None


def _port(doc: Any, where: str) -> Port:
    if not isinstance(doc, dict):
        raise ServiceError(f"{where}: a port must be a JSON object")
    name = doc.get("name", "")
    proto = PROTOCOLS.get(doc.get("protocol", "TCP"))
    number = doc.get("port")
    if not isinstance(name, str) or proto is None:
        raise ServiceError(f"{where}: bad port name or protocol in {doc!r} (TCP, UDP or SCTP)")
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
        raise ServiceError(f"{where}: port {number!r} is not in 1..65535")
    return Port(name, proto, number)


def _endpoint(doc: Any, where: str) -> Endpoint:
    if not isinstance(doc, dict):
        raise ServiceError(f"{where}: an endpoint must be a JSON object")
    ip = _address(doc.get("ip"), f"{where}: endpoint")
    flags = {}
    for key, default in (("ready", True), ("serving", True), ("terminating", False)):
        value = doc.get(key, default)
        if not isinstance(value, bool):
            raise ServiceError(f"{where}: endpoint {ip}: {key!r} must be true or false")
        flags[key] = value
    ports = tuple(
        _port(p, f"{where}: endpoint {ip}") for p in _list(doc.get("ports", []), where, "ports")
    )
    if len(ports) > MAX_PORTS:
        raise ServiceError(f"{where}: endpoint {ip}: more than {MAX_PORTS} ports")
    zones = doc.get("zones")
    if zones is not None and not (
        isinstance(zones, list) and all(isinstance(z, str) and z for z in zones)
    ):
        raise ServiceError(f"{where}: endpoint {ip}: 'zones' must be a list of zone names")
    return Endpoint(
        ip,
        ports,
        flags["ready"],
        flags["serving"],
        flags["terminating"],
        None if zones is None else tuple(zones),
    )
