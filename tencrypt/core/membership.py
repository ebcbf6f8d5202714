"""The project's membership as the cluster API knows it: the file the node agent (or the lab,
playing the agent's part) hands each proxy.

Rules (DESIGN §1a "Evidence that an address is internal"):
1. Membership is the strongest evidence: every address in it is INTERNAL for strict mode,
   whatever DNS says. It lists the pod IPs of the project's pods (cluster-wide, IPv4 and
   IPv6) and the project's Service cluster IPs (both families).
2. The file is its writer's: kept where the writer's name for the pod never repeats (the
   agent's directory for the pod's UID, the lab's state per pod: never setup's directory,
   keyed by a namespace inode number the kernel reuses, core/netnsid.py), handed to setup
   and the proxy as ``--members-file``, replaced atomically (write a temporary file, rename);
   the proxy reads it at start and whenever it changes. ``generation`` only grows: a file with a lower generation than the one loaded
   is ignored (an out-of-order writer), so membership never goes back in time.
3. A file that does not parse is refused with a clear message and the last good membership
   is kept; a proxy never runs on half a file.
4. Format 2 (JSON, UTF-8), what the node agent writes::

       {"format": "tencrypt-members/2", "project": "shop", "generation": 42,
        "pods": ["10.128.2.7", "fd00:10:128::7", "10.129.0.5"],
        "podIPs": [["10.128.2.7", "fd00:10:128::7"], ["10.129.0.5"]],
        "services": [
          {"name": "web", "ips": ["172.30.5.9"],
           "ports": [{"name": "http", "protocol": "TCP", "port": 80}],
           "endpoints": [{"ip": "10.128.2.7", "ready": true, "serving": true,
                          "terminating": false, "zones": ["zone-a"],
                          "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]}],
           "affinitySeconds": 10800}],
        "serviceCIDRs": ["172.30.0.0/16"], "podCIDRs": ["10.128.0.0/14"], "zone": "zone-a",
        "networkPolicy": {"format": "tencrypt-netpol/1", "project": "shop", ...},
        "tunnelBlocked": [{"policy": "default-deny", "direction": "ingress"}]}

   ``podIPs`` lists each pod's addresses, one list per pod, as its ``status.podIPs`` (at most
   one per family, each also in ``pods``): the only evidence that a dual-stack pod's two
   addresses are one pod (``Members.paired``; core/identity.py rule 5 believes a
   handshake's claim of the other family only then). Absent: no pairing is known. An address
   listed for two pods pairs with nothing (fail closed: the writer's view is ambiguous).
   ``services`` carries each Service of the project (core/services.py rules 8 and the
   EndpointSlice fields it keeps: ``ready``/``serving``/``terminating`` default to true, true,
   false; ``zones`` are the hints, absent when the slice has none; ``affinitySeconds`` only
   for sessionAffinity ClientIP). ``serviceCIDRs`` and ``podCIDRs`` are the cluster's ranges
   as the agent discovered them (empty lists: not known); ``zone`` is the node's
   ``topology.kubernetes.io/zone`` (absent: none). With format 2 the sending proxy resolves
   Services itself (core/conntrack.py). ``networkPolicy`` is this pod's NetworkPolicy
   document (``tencrypt-netpol/1``, core/netpolicy.py: the file is per pod), of the file's
   project; absent: the writer sends none and the proxy enforces no NetworkPolicy
   (core/policyflows.py rule 6). ``tunnelBlocked`` is the writer's report of the policies
   under which a CNI would drop this pod's tunnel (UDP 1337), by direction; absent: none.
5. Format 1 is still read: ``services`` is a list of cluster IP strings, nothing else is
   known, and the proxy reaches those Services the older way (standalone's VIP path)::

       {"format": "tencrypt-members/1", "project": "shop", "generation": 42,
        "pods": ["10.128.2.7", "fd00:10:128::7"], "services": ["172.30.5.9"]}

6. In both formats ``project`` is the namespace name, addresses may come in any order and
   twice, unknown keys are ignored (forward compatible), and a Service entry or CIDR that
   does not parse refuses the whole file (rule 3) with a message naming it.

Pure: text in, ``Members`` out, and the reverse.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from tencrypt.core.netpolicy import NetpolError, from_doc
from tencrypt.core.services import Service, ServiceError, parse_service, render_service

FORMAT_V1 = "tencrypt-members/1"
FORMAT = "tencrypt-members/2"
FILE_NAME = "members.json"
MAX_ADDRESSES = 1 << 20  # a bound on what one file may hold (a project of a million pods)
MAX_SERVICES = 1 << 16
MAX_CIDRS = 1024  # per list: Nodes' podCIDRs of a 1,000-node cluster with no summary


class MembershipError(ValueError):
    """The membership text is not a valid ``tencrypt-members`` document."""


@dataclass(frozen=True, slots=True)
class Members:
    project: str
    generation: int
    pods: frozenset[str]
    services: frozenset[str]  # every cluster IP of the project's Services
    service_table: tuple[Service, ...] | None = None  # format 2; None: format 1 (IPs only)
    service_cidrs: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    zone: str | None = None
    network_policy: str | None = None  # the tencrypt-netpol/1 document, canonical JSON text
    tunnel_blocked: tuple[tuple[str, str], ...] = ()  # (direction, policy) (rule 4)
    pod_ips: tuple[tuple[str, ...], ...] = ()  # each pod's addresses, as podIPs (rule 4)
    _pod_of: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        pod_of: dict[str, tuple[str, ...]] = {}
        ambiguous: set[str] = set()
        for pod in self.pod_ips:
            for ip in pod:
                if ip in pod_of:
                    ambiguous.add(ip)
                pod_of[ip] = pod
        for ip in ambiguous:
            del pod_of[ip]
        object.__setattr__(self, "_pod_of", pod_of)

    @property
    def addresses(self) -> frozenset[str]:
        return self.pods | self.services

    def partner(self, ip: str) -> str | None:
        """The other address of ``ip``'s pod (``podIPs``), None when it has none or ``ip`` is
        listed for two pods."""
        pod = self._pod_of.get(ip)
        other = [a for a in pod if a != ip] if pod is not None else []
        return other[0] if other and self._pod_of.get(other[0]) is pod else None

    def paired(self, a: str, b: str) -> bool:
        """Are ``a`` and ``b`` two addresses of one pod (``podIPs``, rule 4)? Canonical text
        (what ``parse_members`` keeps); an address listed for two pods pairs with nothing."""
        pod = self._pod_of.get(a)
        return a != b and pod is not None and b in pod and self._pod_of.get(b) is pod


def _addresses(value: object, key: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise MembershipError(f"{key!r} must be a list of IP addresses")
    if len(value) > MAX_ADDRESSES:
        raise MembershipError(f"{key!r} holds {len(value)} addresses, more than {MAX_ADDRESSES}")
    out = set()
    for item in value:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            out.add(str(ipaddress.ip_address(item)))  # canonical text: one spelling per address
        except (ValueError, TypeError):
            raise MembershipError(f"{key!r}: not an IP address: {item!r}") from None
    return frozenset(out)


def _cidrs(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_CIDRS:
        raise MembershipError(f"{key!r} must be a list of at most {MAX_CIDRS} CIDRs")
    out: list[str] = []
    for item in value:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except (ValueError, TypeError):
            raise MembershipError(f"{key!r}: not a CIDR: {item!r}") from None
    return tuple(dict.fromkeys(out))


def _services(value: object) -> tuple[Service, ...]:
    if not isinstance(value, list):
        raise MembershipError("'services' must be a list")
    if len(value) > MAX_SERVICES:
        raise MembershipError(f"'services' holds {len(value)} Services, more than {MAX_SERVICES}")
    try:
        table = tuple(parse_service(item) for item in value)
    except ServiceError as exc:
        raise MembershipError(str(exc)) from None
    if len({s.name for s in table}) != len(table):
        raise MembershipError("'services': a Service name is listed twice")
    return table


def parse_members(text: str | bytes) -> Members:
    """Rules 3-6: a ``Members`` or ``MembershipError`` saying what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MembershipError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MembershipError("not a JSON object")
    fmt = doc.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        raise MembershipError(f"format is {fmt!r}, expected {FORMAT!r} or {FORMAT_V1!r}")
    project, generation = doc.get("project"), doc.get("generation")
    if not isinstance(project, str) or not project:
        raise MembershipError("'project' must be a non-empty string")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise MembershipError("'generation' must be a non-negative integer")
    pods = _addresses(doc.get("pods", []), "pods")
    if fmt == FORMAT_V1:
        return Members(project, generation, pods, _addresses(doc.get("services", []), "services"))
    table = _services(doc.get("services", []))
    zone = doc.get("zone")
    if zone is not None and (not isinstance(zone, str) or not zone):
        raise MembershipError("'zone' must be a non-empty string when present")
    return Members(
        project,
        generation,
        pods,
        frozenset(ip for svc in table for ip in svc.ips),
        table,
        _cidrs(doc.get("serviceCIDRs", []), "serviceCIDRs"),
        _cidrs(doc.get("podCIDRs", []), "podCIDRs"),
        zone,
        _network_policy(doc.get("networkPolicy"), project),
        _tunnel_blocked(doc.get("tunnelBlocked", [])),
        _pod_ips(doc.get("podIPs", []), pods),
    )


def _pod_ips(value: object, pods: frozenset[str]) -> tuple[tuple[str, ...], ...]:
    """Rule 4's ``podIPs``: lists of one or two addresses, at most one per family, each in
    ``pods``; canonical and sorted (IPv4 first), like the file the serializer writes."""
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise MembershipError(f"'podIPs' must be a list of at most {MAX_ADDRESSES} lists")
    out = set()
    for item in value:
        if not isinstance(item, list) or not 1 <= len(item) <= 2:
            raise MembershipError(f"'podIPs': not a list of one or two addresses: {item!r}")
        ips = sorted(_addresses(item, "podIPs"), key=_sort_key)
        if len(ips) != len(item) or len({_sort_key(ip)[0] for ip in ips}) != len(ips):
            raise MembershipError(f"'podIPs': two addresses of one family: {item!r}")
        missing = [ip for ip in ips if ip not in pods]
        if missing:
            raise MembershipError(f"'podIPs': {missing[0]} is not in 'pods'")
        out.add(tuple(ips))
    return tuple(sorted(out, key=lambda pod: [_sort_key(ip) for ip in pod]))


def _network_policy(value: object, project: str) -> str | None:
    """Rule 4's ``networkPolicy``: checked in full (a file whose policy does not parse is
    refused whole, rule 3), kept as canonical text."""
    if value is None:
        return None
    try:
        policy = from_doc(value)
    except NetpolError as exc:
        raise MembershipError(f"'networkPolicy': {exc}") from None
    if policy.project != project:
        raise MembershipError(
            f"'networkPolicy' is project {policy.project!r}'s, the file is {project!r}'s"
        )
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _tunnel_blocked(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) > MAX_SERVICES:
        raise MembershipError("'tunnelBlocked' must be a list")
    out = []
    for item in value:
        direction = item.get("direction") if isinstance(item, dict) else None
        policy = item.get("policy") if isinstance(item, dict) else None
        if direction not in ("ingress", "egress") or not isinstance(policy, str) or not policy:
            raise MembershipError(f"'tunnelBlocked': not a direction and policy: {item!r}")
        out.append((direction, policy))
    return tuple(sorted(set(out)))


def render_members(members: Members) -> str:
    """The file's text for ``members`` (sorted, so equal memberships give equal files):
    format 2 when it carries a Service table, else format 1."""
    doc: dict[str, object] = {
        "format": FORMAT_V1 if members.service_table is None else FORMAT,
        "project": members.project,
        "generation": members.generation,
        "pods": sorted(members.pods, key=_sort_key),
    }
    if members.service_table is None:
        doc["services"] = sorted(members.services, key=_sort_key)
    else:
        doc["services"] = [
            render_service(s) for s in sorted(members.service_table, key=lambda s: s.name)
        ]
        doc["serviceCIDRs"] = list(members.service_cidrs)
        doc["podCIDRs"] = list(members.pod_cidrs)
        if members.zone is not None:
            doc["zone"] = members.zone
        if members.network_policy is not None:
            doc["networkPolicy"] = json.loads(members.network_policy)
        if members.tunnel_blocked:
            doc["tunnelBlocked"] = [
                {"direction": d, "policy": p} for d, p in members.tunnel_blocked
            ]
        if members.pod_ips:
            doc["podIPs"] = [list(pod) for pod in members.pod_ips]
    return json.dumps(doc) + "\n"


def _sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)
