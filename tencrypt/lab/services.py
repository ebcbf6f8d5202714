"""kube-proxy-style Service NAT in a lab node namespace (iptables nat table; nftables for
the tunnel port).

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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tencrypt.core import TUNNEL_PORT
from tencrypt.lab.topology import Service
from tencrypt.linux import netns
from tencrypt.nodesync.backends import program_objects
from tencrypt.nodesync.kubeobjects import lab_objects


def _chain(kind: str, *parts: object) -> str:
    return (
        f"KUBE-{kind}-"
        + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16].upper()
    )


def build_kube_services(services: Iterable[Service], first: bool = True) -> str:
    head = [":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    body: list[str] = []
    hairpins: set[str] = set()
    for svc in services:
        if svc.vip is None:
            continue
        for port in svc.ports:
            proto = port.protocol.lower()
            ready = [(e, e.target(port)) for e in svc.endpoints if e.ready]
            ready = [(e, t) for e, t in ready if t is not None]
            match = f"-d {svc.vip}/32 -p {proto} -m {proto} --dport {port.port}"
            comment = f'-m comment --comment "{svc.project}/{svc.name}:{port.name}"'
            if not ready:
                continue  # kube-proxy REJECTs in its filter table; here it just gets no DNAT
            svc_chain = _chain("SVC", svc.project, svc.name, port.name, proto)
            head.append(f":{svc_chain} - [0:0]")
            body.append(f"-A KUBE-SERVICES {match} {comment} -j {svc_chain}")
            for i, (ep, target) in enumerate(ready):
                sep = _chain("SEP", svc.project, svc.name, port.name, proto, ep.ip, target)
                head.append(f":{sep} - [0:0]")
                left = len(ready) - i
                pick = (
                    f"-m statistic --mode random --probability {1 / left:.10f} " if left > 1 else ""
                )
                body.append(f"-A {svc_chain} {pick}-j {sep}")
                body.append(f"-A {sep} -p {proto} -j DNAT --to-destination {ep.ip}:{target}")
                hairpins.add(ep.ip)
    for ip in sorted(hairpins):
        body.append(
            f"-A KUBE-POSTROUTING -s {ip}/32 -d {ip}/32 -m conntrack --ctstate DNAT -j MASQUERADE"
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


def program_kube_services(node_ns: str, services: Iterable[Service], first: bool = True) -> None:
    netns.run(
        node_ns, ["iptables-restore", "--noflush"], input=build_kube_services(services, first)
    )


def program_tencrypt_chain(
    node_ns: str, services: Iterable[Service], port: int = TUNNEL_PORT
) -> None:
    """Make ``node_ns`` forward ``VIP:port`` (udp+tcp) of exactly ``services`` to their pods,
    as `tencrypt node-sync` does on a real node (its nft backend: table inet tencrypt; the
    name of this function is older). Idempotent."""
    program_objects(lab_objects(services), netns=node_ns, port=port, backend="nft")
