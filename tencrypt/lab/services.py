"""kube-proxy-style Service NAT in a lab node namespace (iptables nat table; nftables for
the tunnel port).

Rules:
- Every node carries every Service, as kube-proxy does: ``nat PREROUTING`` (traffic from pods)
  and ``nat OUTPUT`` (traffic from the node itself) jump to two chains.
- ``KUBE-SERVICES``: the Service port, ``VIP:port/tcp -> pod:port``. Written once by ``up``.
- The tunnel port: ``VIP:1337`` udp and tcp ``-> pod:1337``, in node-sync's nft table ``inet
  tencrypt`` (its default backend, hooked before the nat table). The lab programs it through
  the node-side updater's own code (``tencrypt node-sync``): its Services are written as
  Kubernetes objects, so the lab and a real node share one path.
- Hairpin: a pod reaching its own Service gets its source masqueraded (``KUBE-POSTROUTING``),
  or its reply would carry a source the pod owns and be dropped as a martian.
- Changes go through one ``iptables-restore --noflush`` or ``nft -f`` transaction each, so a
  chain is never half-written.
"""

from __future__ import annotations

from collections.abc import Iterable

from tencrypt.core import TUNNEL_PORT
from tencrypt.lab.topology import Service
from tencrypt.linux import netns
from tencrypt.nodesync.backends import program_objects
from tencrypt.nodesync.kubeobjects import lab_objects


def build_kube_services(services: Iterable[Service]) -> str:
    lines = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A POSTROUTING -j KUBE-POSTROUTING",
    ]
    for svc in services:
        lines.append(
            f"-A KUBE-SERVICES -d {svc.vip}/32 -p tcp -m tcp --dport {svc.port} "
            f'-m comment --comment "{svc.project}/{svc.name}:http" '
            f"-j DNAT --to-destination {svc.endpoint}:{svc.port}"
        )
        lines.append(
            f"-A KUBE-POSTROUTING -s {svc.endpoint}/32 -d {svc.endpoint}/32 "
            "-m conntrack --ctstate DNAT -j MASQUERADE"
        )
    return "\n".join([*lines, "COMMIT", ""])


def program_kube_services(node_ns: str, services: Iterable[Service]) -> None:
    netns.run(node_ns, ["iptables-restore", "--noflush"], input=build_kube_services(services))


def program_tencrypt_chain(
    node_ns: str, services: Iterable[Service], port: int = TUNNEL_PORT
) -> None:
    """Make ``node_ns`` forward ``VIP:port`` (udp+tcp) of exactly ``services`` to their pods,
    as `tencrypt node-sync` does on a real node (its nft backend: table inet tencrypt; the
    name of this function is older). Idempotent."""
    program_objects(lab_objects(services), netns=node_ns, port=port, backend="nft")
