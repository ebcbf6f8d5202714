"""The lab's cluster DNS: what dnsmasq serves and how pods are pointed at it.

Rules:
- One dnsmasq per node namespace, bound to the cluster DNS address only (``--bind-interfaces
  --listen-address``), reading nothing from the host (``--conf-file=/dev/null --no-hosts
  --no-resolv``): the records are exactly the lab's hosts file.
- Records, as a Kubernetes cluster DNS publishes them: ``<svc>.<project>.svc.cluster.local`` A
  -> VIP (and PTR back), and for each pod IP an endpoint-style name
  ``<pod>.<svc>.<project>.svc.cluster.local`` A -> pod IP (and PTR back), so that a reverse
  lookup of any lab address tells its project. IPv6 addresses (a dual-stack or IPv6-only lab)
  get the same names as AAAA records and PTR records under ``ip6.arpa``: in a dual-stack lab
  a name has both an A and an AAAA record, as CoreDNS answers for a dual-stack Service, and
  dnsmasq listens on both of the DNS Service's addresses. The PTR of every lab address is fixed
  (``--ptr-record``) to its owner, as CoreDNS answers it: a name a tenant publishes later
  for the same address (``Lab.add_dns_records``) is a forward record only.
- Unknown names under ``cluster.local`` and unknown addresses in the lab's reverse zones
  (``in-addr.arpa`` and ``ip6.arpa``, widened to whole octets or nibbles) are NXDOMAIN
  (``--local``, ``--bogus-priv``), never a timeout: there is no upstream.
- Answers carry a real TTL (``--local-ttl``; dnsmasq's default is 0), because the pod-side DNS
  proxy expires its classification with the TTL.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from tencrypt.lab.topology import CLUSTER_DOMAIN, Pod, Service

DNS_TTL = 30  # seconds; CoreDNS's kubernetes plugin serves 5-30


def build_hosts(pods: Iterable[Pod], services: Iterable[Service] = ()) -> str:
    """Each pod's own Service and endpoint name first (dnsmasq's PTR answers a hosts line's
    first name, so a pod IP's reverse name is its endpoint name), then the other Services:
    a VIP, or for a headless Service one A record per ready endpoint (CoreDNS's answer)."""
    lines = ["# tencrypt lab cluster DNS: Services (VIP) and endpoints (pod IP)"]
    pods = list(pods)
    own = {p.name for p in pods}
    for pod in pods:
        lines += [f"{vip} {pod.fqdn}" for vip in pod.vips or [pod.vip]]
        lines += [f"{ip} {pod.endpoint_fqdn}" for ip in pod.ips or [pod.ip]]
    for svc in services:
        if svc.name in own:
            continue
        if svc.vip is not None:
            lines += [f"{vip} {svc.fqdn}" for vip in svc.cluster_ips]
        else:
            lines += [f"{ip} {svc.fqdn}" for e in svc.endpoints if e.ready for ip in e.addresses]
    return "\n".join(lines) + "\n"


def build_resolv_conf(dns_ip: str, project: str) -> str:
    """A pod's resolv.conf, as the kubelet writes it for a pod of ``project``."""
    svc = f"svc.{CLUSTER_DOMAIN}"
    return f"nameserver {dns_ip}\nsearch {project}.{svc} {svc} {CLUSTER_DOMAIN}\noptions ndots:5\n"


def reverse_zones(cidr: str) -> list[str]:
    """The reverse zones covering ``cidr``: in-addr.arpa widened to whole octets (RFC 1035
    §3.5), ip6.arpa to whole nibbles (RFC 3596 §2.5)."""
    net = ipaddress.ip_network(cidr)
    step = 8 if net.version == 4 else 4
    bits = max(step, -(-net.prefixlen // step) * step)
    subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    subnets = [net] if net.prefixlen == bits else list(net.subnets(new_prefix=bits))
    zones = []
    for sub in subnets[:256]:  # a /8 split into /16s is the widest a lab needs
        if net.version == 4:
            octets = str(sub.network_address).split(".")[: bits // 8]
            zones.append(".".join(reversed(octets)) + ".in-addr.arpa")
        else:
            nibbles = sub.network_address.exploded.replace(":", "")[: bits // 4]
            zones.append(".".join(reversed(nibbles)) + ".ip6.arpa")
    return zones


def build_dnsmasq_argv(
    dns_ip: str | list[str],
    hosts: Path | list[Path],
    log: Path,
    pid_file: Path,
    cidrs: Iterable[str],
    owners: Iterable[tuple[str, str]] = (),
) -> list[str]:
    """``owners``: (address, name) pairs whose PTR answer is fixed to that name, as CoreDNS
    answers a reverse lookup with the Service (or endpoint) that owns the address: a record
    published later for the same address (a tenant's alias) adds a forward name, never the
    reverse one. ``dns_ip``: the address (or addresses, a dual-stack DNS Service) to
    listen on."""
    listen = [dns_ip] if isinstance(dns_ip, str) else dns_ip
    local = [f"--local=/{CLUSTER_DOMAIN}/"]
    for cidr in cidrs:
        local += [f"--local=/{zone}/" for zone in reverse_zones(cidr)]
    return [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--no-resolv",
        "--bind-interfaces",
        *(f"--listen-address={ip}" for ip in listen),
        "--port=53",
        *(f"--addn-hosts={h}" for h in (hosts if isinstance(hosts, list) else [hosts])),
        f"--local-ttl={DNS_TTL}",
        *(f"--ptr-record={ipaddress.ip_address(ip).reverse_pointer},{name}" for ip, name in owners),
        "--bogus-priv",
        *local,
        f"--log-facility={log}",
        "--log-queries",
        "--log-async",
        f"--pid-file={pid_file}",
        "--user=root",
        "--group=root",
    ]
