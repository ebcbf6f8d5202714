"""kube-proxy-style Service NAT in a lab node namespace (iptables nat table, ip6tables for
IPv6 VIPs; nftables for the tunnel port).

Rules:
- Every node carries every Service, as kube-proxy does: ``nat PREROUTING`` (traffic from pods)
  and ``nat OUTPUT`` (traffic from the node itself) jump to ``KUBE-SERVICES``.
- ``KUBE-SERVICES``: per Service port ``VIP:port/proto -> KUBE-SVC-<hash>``; that chain picks
  an endpoint the way kube-proxy's iptables mode does, per new connection (conntrack keeps
  it): rule ``i`` of ``n`` jumps with probability ``1/(n-i)`` (``statistic --mode random``),
  the last unconditionally, so each endpoint gets ``1/n``; ``KUBE-SEP-<hash>`` DNATs to
  ``pod:targetPort`` (a named targetPort resolved per pod). A Service port without a ready
  endpoint gets no rule (kube-proxy REJECTs it in its filter table; unpatched, the lab's
  packet goes unanswered instead). Headless Services get no rule. ClientIP affinity is not
  emulated here (the patched path implements it).
- The tunnel port: ``VIP:1337`` udp and tcp ``-> pod:1337``, in node-sync's nft table ``inet
  tencrypt`` (its default backend, hooked before the nat table). The lab programs it through
  the node-side updater's own code (``tencrypt node-sync``): its Services are written as
  Kubernetes objects, so the lab and a real node share one path.
- Hairpin: a pod reaching its own Service gets its source masqueraded (``KUBE-POSTROUTING``),
  or its reply would carry a source the pod owns and be dropped as a martian.
- Changes go through one ``iptables-restore --noflush`` or ``nft -f`` transaction each, so a
  chain is never half-written; a later programming (``first=False``) flushes and rewrites the
  chains (endpoints changed) without adding the jumps again.
- IPv6 (a dual-stack or IPv6-only lab), as kube-proxy runs one proxier per family: the same
  chains in ``ip6tables``' nat table, built from each Service's IPv6 cluster IP and its
  endpoints' IPv6 addresses (the IPv6 EndpointSlice), with the same per-connection random
  choice and ``port -> targetPort``. The Services are handed to node-sync and to the agent's
  reduction as a dual-stack cluster holds them (``objects``: ``clusterIPs`` of both families,
  ``ipFamilyPolicy: RequireDualStack``, one EndpointSlice per address family).
- node-sync forwards the tunnel port of IPv4 VIPs only today (nodesync/cluster.py skips
  IPv6 ClusterIPs); until it forwards IPv6 ones too, the lab stands in for it: an IPv6 VIP
  with a ready endpoint that node-sync leaves out (``unforwarded_vips``, asked of node-sync's
  own code, so the stand-in steps aside by itself once node-sync covers IPv6) gets udp and
  tcp ``VIP:1337 -> pod:1337`` in the ip6tables chains above (named ``tencrypt-udp`` and
  ``tencrypt-tcp``), picked per connection as node-sync picks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from tencrypt.core import TUNNEL_PORT
from tencrypt.core.stats import Stats
from tencrypt.lab.topology import Service, ServicePort, family_of
from tencrypt.linux import netns
from tencrypt.nodesync.backends import program_objects
from tencrypt.nodesync.cluster import load_list
from tencrypt.nodesync.kubeobjects import build_list, lab_objects, stable_uid

FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}  # Service ipFamilies, EndpointSlice addressType
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
TUNNEL_PORTS = (
    ServicePort("tencrypt-udp", TUNNEL_PORT, TUNNEL_PORT, "UDP"),
    ServicePort("tencrypt-tcp", TUNNEL_PORT, TUNNEL_PORT, "TCP"),
)


def _chain(kind: str, *parts: object) -> str:
    return (
        f"KUBE-{kind}-"
        + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16].upper()
    )


def build_kube_services(
    services: Iterable[Service],
    first: bool = True,
    family: int = 4,
    tunnel: frozenset[str] = frozenset(),
) -> str:
    """The nat table's chains of IP ``family`` (4: iptables, 6: ip6tables); ``tunnel``: VIPs
    whose tunnel port the lab forwards itself (module rules)."""
    head = [":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    body: list[str] = []
    hairpins: set[str] = set()
    host = 32 if family == 4 else 128
    for svc in services:
        vip = svc.vip_of(family)
        if vip is None:
            continue
        for port in (*svc.ports, *(TUNNEL_PORTS if vip in tunnel else ())):
            proto = port.protocol.lower()
            ready = [(e, _address(e.addresses, family), e.target(port)) for e in svc.endpoints]
            chosen = [(ip, t) for e, ip, t in ready if e.ready and ip and t is not None]
            match = f"-d {vip}/{host} -p {proto} -m {proto} --dport {port.port}"
            comment = f'-m comment --comment "{svc.project}/{svc.name}:{port.name}"'
            if not chosen:
                continue  # kube-proxy REJECTs in its filter table; here it just gets no DNAT
            svc_chain = _chain("SVC", svc.project, svc.name, port.name, proto)
            head.append(f":{svc_chain} - [0:0]")
            body.append(f"-A KUBE-SERVICES {match} {comment} -j {svc_chain}")
            for i, (ip, target) in enumerate(chosen):
                sep = _chain("SEP", svc.project, svc.name, port.name, proto, ip, target)
                head.append(f":{sep} - [0:0]")
                left = len(chosen) - i
                pick = (
                    f"-m statistic --mode random --probability {1 / left:.10f} " if left > 1 else ""
                )
                dest = f"{ip}:{target}" if family == 4 else f"[{ip}]:{target}"
                body.append(f"-A {svc_chain} {pick}-j {sep}")
                body.append(f"-A {sep} -p {proto} -j DNAT --to-destination {dest}")
                hairpins.add(ip)
    for ip in sorted(hairpins):
        body.append(
            f"-A KUBE-POSTROUTING -s {ip}/{host} -d {ip}/{host} -m conntrack --ctstate DNAT "
            "-j MASQUERADE"
        )
    jumps = (
        [
            '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            "-A POSTROUTING -j KUBE-POSTROUTING",
        ]
        if first
        else []
    )
    return "\n".join(["*nat", *head, *jumps, *body, "COMMIT", ""])


def program_kube_services(
    node_ns: str,
    services: Iterable[Service],
    first: bool = True,
    family: int = 4,
    tunnel: frozenset[str] = frozenset(),
) -> None:
    netns.run(
        node_ns,
        [RESTORE[family], "--noflush"],
        input=build_kube_services(services, first, family, tunnel),
    )


def program_tencrypt_chain(
    node_ns: str, services: Iterable[Service], port: int = TUNNEL_PORT
) -> None:
    """Make ``node_ns`` forward ``VIP:port`` (udp+tcp) of exactly ``services`` to their pods,
    as `tencrypt node-sync` does on a real node (its nft backend: table inet tencrypt; the
    name of this function is older). Idempotent."""
    program_objects(objects(services), netns=node_ns, port=port, backend="nft")


def unforwarded_vips(services: Sequence[Service]) -> frozenset[str]:
    """The IPv6 VIPs with a ready endpoint whose tunnel port node-sync's own code would not
    forward (today: all of them; module rules): the lab forwards those itself."""
    covered = {b.vip for b in load_list(build_list(objects(services)), Stats()).desired()}
    return frozenset(
        vip
        for s in services
        if any(e.ready for e in s.endpoints)
        for vip in s.cluster_ips
        if family_of(vip) == 6 and vip not in covered
    )


def families_of(services: Iterable[Service]) -> tuple[int, ...]:
    """The IP families of the Services' addresses, in the order they first appear (the lab's
    primary family first: its first Service is a pod's own, with every family's VIP)."""
    seen: dict[int, None] = {}
    for s in services:
        for ip in (*s.cluster_ips, *(ip for e in s.endpoints for ip in e.addresses)):
            seen.setdefault(family_of(ip), None)
    return tuple(seen) or (4,)


def objects(services: Iterable[Service]) -> list[dict[str, Any]]:
    """The lab's Services as a cluster of its families holds them, for node-sync and the
    agent's reduction: ``nodesync.kubeobjects.lab_objects`` of each family's view (a
    Service's cluster IP and its endpoints' addresses of that family), the Services of the
    primary family's with every family's ``clusterIPs``, ``ipFamilies`` and
    ``ipFamilyPolicy`` (RequireDualStack for two), and each family's EndpointSlices with its
    ``addressType`` (the secondary family's named ``<slice>-ipv6``). An IPv4 lab's are
    exactly ``lab_objects(services)``."""
    services = list(services)
    families = families_of(services)
    by_key = {(s.project, s.name): s for s in services}
    out: list[dict[str, Any]] = []
    for n, family in enumerate(families):
        for obj in lab_objects([_family_view(s, family) for s in services]):
            meta = obj["metadata"]
            if obj["kind"] == "EndpointSlice":
                obj["addressType"] = FAMILY_NAMES[family]
                if n:
                    meta["name"] = f"{meta['name']}-{FAMILY_NAMES[family].lower()}"
                    meta["uid"] = stable_uid(meta["namespace"], meta["name"])
                out.append(obj)
            elif n == 0:
                if obj["kind"] == "Service":
                    svc = by_key[(meta["namespace"], meta["name"])]
                    spec = obj["spec"]
                    spec["clusterIPs"] = list(svc.cluster_ips) or ["None"]
                    spec["ipFamilies"] = [FAMILY_NAMES[f] for f in families]
                    spec["ipFamilyPolicy"] = (
                        "RequireDualStack" if len(families) > 1 else "SingleStack"
                    )
                out.append(obj)
    return out


def _family_view(svc: Service, family: int) -> Service:
    endpoints = tuple(
        dataclasses.replace(e, ip=ip, ips=(ip,))
        for e in svc.endpoints
        if (ip := _address(e.addresses, family))
    )
    return dataclasses.replace(svc, vip=svc.vip_of(family), endpoints=endpoints, vips=())


def _address(addresses: Sequence[str], family: int) -> str | None:
    return next((ip for ip in addresses if family_of(ip) == family), None)
