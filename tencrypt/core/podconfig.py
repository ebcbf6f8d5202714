"""A pod's network configuration as `tencrypt setup` finds and records it, and resolv.conf text.

Rules:
- Everything `tencrypt run` and `tencrypt dns` need to know about the pod is one frozen
  ``PodConfig``, written by `setup` and read back by the others (JSON via ``to_dict``/``from_dict``).
- The tunnel costs ``OVERHEAD`` bytes per packet on IPv4 (outer IPv4 20 + UDP 8 + header 16 +
  Poly1305 tag 16), so tenc0's MTU is the uplink's minus 60: 1440 on 1500, 1390 on VXLAN's 1450.
- Dual stack: a pod with an IPv6 address on the uplink (``pod_ip6``) and a known IPv6 Service
  CIDR (``service_cidr6``) gets that CIDR routed into tenc0 as well; its IPv6 packets ride the
  same IPv4 tunnel (the outer family is the pod's primary, IPv4). tenc0's MTU is the IPv4
  figure, above IPv6's 1280 minimum on any uplink MIN_MTU allows plus the overhead.
- IPv6-only: a pod whose uplink has no IPv4 address has its IPv6 address as its primary
  (``pod_ip``, ``gateway``, ``dns`` and ``service_cidr`` all IPv6; ``version`` is 6) and no
  secondary family (``pod_ip6``, ``gateway6``, ``service_cidr6`` stay ""). The tunnel then
  runs over UDP/IPv6 and costs ``OVERHEAD6`` (outer IPv6 40 + UDP 8 + 32): tenc0's MTU is
  the uplink's minus 80, at least IPv6's minimum link MTU ``MIN_MTU6`` (RFC 8200 §5). Its
  Service CIDR is never assumed: setup refuses without a known IPv6 one.
- resolv.conf is rewritten to ask the embedded DNS proxy (127.0.0.1) while every other line —
  search list, options, comments — is kept as it was; the original text is kept for `--undo`.
- `setup` changes nothing before ``validated`` has accepted every input: one typo in the
  agent's ``--setup-args`` reaches every pod, and must cost none of them its network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tencrypt.core import TUNNEL_PORT
from tencrypt.core.wire import DATA_OVERHEAD
from tencrypt.errors import UsageError

OVERHEAD = 20 + 8 + DATA_OVERHEAD  # outer IPv4 + UDP + wire.py's data header and tag
OVERHEAD6 = 40 + 8 + DATA_OVERHEAD  # ... over outer IPv6 (an IPv6-only cluster): 80
MIN_MTU = 576  # the datagram every IPv4 host must accept (RFC 791, RFC 1122 3.3.2)
MIN_MTU6 = 1280  # IPv6's minimum link MTU (RFC 8200 §5)
# Ranges every host routes itself: a Service CIDR over one of them would send the host's own
# traffic (the unspecified "this network", loopback, link-local such as a cloud's metadata
# service at 169.254.169.254, multicast, the reserved block and the limited broadcast) into
# tenc0. Any prefix short enough to be a default route (/0, /1) overlaps one of them.
HOST_RANGES = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
DNS_MARK_BIT = 0x10000  # above the 16-bit tunnel mark: the DNS upstream's mark (dns_mark)
PROXY_NAMESERVER = "127.0.0.1"
MARKER = "# tencrypt: nameserver points at the embedded DNS proxy; original:"


@dataclass(frozen=True, slots=True)
class PodConfig:
    pod_ip: str
    dev: str
    gateway: str
    dns: str
    domain: str
    search: tuple[str, ...]
    cluster_domain: str
    service_cidr: str = "172.30.0.0/16"
    pod_cidrs: tuple[str, ...] = ()  # the pod network (cluster-wide): given, never guessed
    uplink_cidrs: tuple[str, ...] = ()  # eth0's subnet: guarded, never the claims' pod network
    mtu: int = 1440
    tun: str = "tenc0"
    fwmark: int = 0x1337
    table: int = 1337
    port: int = TUNNEL_PORT
    # dual-stack (rule "Dual stack"): the pod's IPv6 address, the next hop of the uplink's IPv6
    # default route (often link-local) and the cluster's IPv6 Service CIDR; "" when not known
    pod_ip6: str = ""
    gateway6: str = ""
    service_cidr6: str = ""

    @property
    def version(self) -> int:
        """The tunnel's (outer) IP version: the primary address's; 6 on an IPv6-only pod."""
        return 6 if ":" in self.pod_ip else 4

    @property
    def overhead(self) -> int:
        """What the tunnel costs per packet over this pod's outer family."""
        return OVERHEAD6 if self.version == 6 else OVERHEAD

    @property
    def service_cidrs(self) -> tuple[str, ...]:
        """The Service CIDRs routed into tenc0: the IPv4 one, and the IPv6 one if known."""
        return (
            (self.service_cidr, self.service_cidr6) if self.service_cidr6 else (self.service_cidr,)
        )

    @property
    def pod_ips(self) -> tuple[str, ...]:
        """The pod's own addresses: IPv4, then IPv6 on a dual-stack pod."""
        return (self.pod_ip, self.pod_ip6) if self.pod_ip6 else (self.pod_ip,)

    def source_for(self, ip: str) -> str:
        """The pod's own address of ``ip``'s family (the source of what it sends there)."""
        return self.pod_ip6 if ":" in ip and self.pod_ip6 else self.pod_ip

    def gateway_for(self, ip: str) -> str:
        """The uplink's next hop towards ``ip``'s family; "" when the pod has no route of that
        family (an IPv4 address on an IPv6-only pod)."""
        if (":" in ip) == (self.version == 6):
            return self.gateway
        return self.gateway6 if ":" in ip else ""

    @property
    def dns_mark(self) -> int:
        """The mark of the DNS proxy's upstream sockets alone: routed like ``fwmark`` (out of
        the uplink), and exempt from the firewall's project rules by this mark alone, so that
        no classification can cut the pod's DNS (DESIGN §1a)."""
        return self.fwmark | DNS_MARK_BIT

    @property
    def guarded_pods(self) -> tuple[str, ...]:
        """Where an unknown source or destination may be a pod of the project: the pod network
        when known, else at least this node's subnet (guarding more never opens the clear)."""
        return self.pod_cidrs or self.uplink_cidrs

    def is_boundary(self, ip: str) -> bool:
        """The pod's own boundary (DESIGN §1a "DNS never moves the pod's own boundary"): its
        own addresses, gateway and cluster DNS server, and every loopback, link-local,
        multicast, unspecified, broadcast or reserved address. None of these is ever a
        project element or a route of ours, whatever any evidence says."""
        if ip in self.own_addresses:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return True
        return (
            addr.is_loopback
            or addr.is_link_local
            or addr.is_multicast
            or addr.is_unspecified
            or addr.is_reserved
            or (addr.version == 4 and int(addr) == 0xFFFFFFFF)
        )

    @property
    def own_addresses(self) -> frozenset[str]:
        """The pod's own IPs, its gateways and the cluster DNS server: setup owns their routes."""
        own = (self.pod_ip, self.gateway, dns_address(self.dns), self.pod_ip6, self.gateway6)
        return frozenset(ip for ip in own if ip)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["search"] = list(self.search)
        d["pod_cidrs"] = list(self.pod_cidrs)
        d["uplink_cidrs"] = list(self.uplink_cidrs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["search"] = tuple(values.get("search", ()))
        values["pod_cidrs"] = tuple(values.get("pod_cidrs", ()))
        values["uplink_cidrs"] = tuple(values.get("uplink_cidrs", ()))
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[str, ...]
    search: tuple[str, ...]
    options: tuple[str, ...]


def parse_resolv_conf(text: str) -> ResolvConf:
    """resolv(5): the last `search`/`domain` line wins; comments start with # or ;."""
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        key, rest = words[0], words[1:]
        if key == "nameserver" and rest:
            nameservers.append(rest[0])
        elif key in ("search", "domain"):
            search = rest
        elif key == "options":
            options += rest
    return ResolvConf(tuple(nameservers), tuple(search), tuple(options))


def render_resolv_conf(original: str) -> str:
    """The original text with its nameserver lines replaced by the proxy's (one line)."""
    out = [
        f"{MARKER} {' '.join(parse_resolv_conf(original).nameservers) or 'none'}",
        f"nameserver {PROXY_NAMESERVER}",
    ]
    for line in original.splitlines():
        words = line.split()
        if (words and words[0] == "nameserver") or line.startswith(MARKER):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def is_rewritten(text: str) -> bool:
    return any(line.startswith(MARKER) for line in text.splitlines())


def recover_resolv_conf(text: str) -> str:
    """The text ``render_resolv_conf`` was given, as far as its output ``text`` keeps it: the
    nameservers the marker line names, then every other line as it was. For a rewritten file
    whose recorded original is lost or not this pod's (a dead namespace's state: netnsid.py);
    the nameservers' place among the other lines is not kept, their order is (resolv(5)
    reads them in order wherever they stand)."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(MARKER):
            out += [f"nameserver {ns}" for ns in line[len(MARKER) :].split() if ns != "none"]
        elif line.split() != ["nameserver", PROXY_NAMESERVER]:
            out.append(line)
    return "\n".join(out) + "\n"


def cluster_domain_of(domain: str) -> str:
    """`myproject.svc.cluster.local` -> `cluster.local` (Kubernetes' <ns>.svc.<cluster-domain>)."""
    labels = domain.strip(".").split(".")
    if "svc" in labels[1:]:
        return ".".join(labels[labels.index("svc", 1) + 1 :]) or "cluster.local"
    return "cluster.local"


def tun_mtu(uplink_mtu: int, version: int = 4) -> int:
    """tenc0's MTU on an uplink of ``uplink_mtu`` with the tunnel over IP ``version``."""
    overhead, least = (OVERHEAD6, MIN_MTU6) if version == 6 else (OVERHEAD, MIN_MTU)
    mtu = uplink_mtu - overhead
    if mtu < least:
        raise ValueError(f"uplink MTU {uplink_mtu} leaves {mtu} for tenc0, below {least}")
    return mtu


def validated(config: PodConfig, uplink_mtu: int, *, mtu_given: bool = True) -> PodConfig:
    """``config`` as setup may apply it (the pod network normalised), or a ``UsageError``
    naming the flag and the conflicting values. Pure, and run before setup touches anything.

    Refused, because setup's routes would break the pod:
    - a malformed address or range (--pod-ip, --gateway, --dns, --service-cidr, --pod-cidr);
    - a pod IP or gateway that is no unicast address, or a gateway equal to the pod IP;
    - a DNS server that is loopback (127.0.0.1:53 is the embedded proxy itself: it would ask
      itself), unspecified, multicast or broadcast;
    - a Service CIDR (routed ``dev tenc0``) that is a host range (``HOST_RANGES``: also any
      default-like /0 or /1), overlaps the uplink's on-link subnet (its route would replace or
      shadow the connected route: the pod cut off its own subnet, and every later setup
      failing with "Network is unreachable"), contains the pod IP or the gateway (the default
      route's next hop would be looked up through tenc0), or overlaps the pod network
      (--pod-cidr: pod IPs are peers reached by /32 routes and sealed, never Service VIPs);
    - a tenc0 MTU below ``MIN_MTU`` or above the uplink's MTU less ``OVERHEAD`` (a sealed
      full-size packet would not fit the uplink).

    Accepted: a DNS server inside the Service CIDR. That is the normal Kubernetes case (the
    cluster DNS is a Service: CoreDNS at 172.30.0.10 or 10.96.0.10), and setup routes the DNS
    server's /32 via the uplink, more specific than the Service CIDR's route into tenc0, so
    the DNS proxy's upstream never enters the tunnel. A DNS server equal to the gateway, on
    the on-link subnet or in the pod network is accepted too: its /32 goes via the uplink.

    An IPv6-only pod (``config.version`` 6: --pod-ip is IPv6) is held to the same rules in
    IPv6 (``_validated6``): --pod-ip a global unicast address, --gateway any unicast one
    (link-local is IPv6's usual next hop), --dns and --service-cidr IPv6, the Service CIDR
    clear of ``HOST_RANGES6``, and tenc0's MTU from ``MIN_MTU6`` to the uplink's less
    ``OVERHEAD6``; a second family (``pod_ip6`` and its kin) is refused there.
    """
    if config.version == 6:
        return _validated6(config, uplink_mtu, mtu_given)
    pod_ip = _address("--pod-ip", config.pod_ip)
    gateway = _address("--gateway", config.gateway)
    dns = _address("--dns", config.dns)
    for flag, addr in (("--pod-ip", pod_ip), ("--gateway", gateway)):
        if not _unicast(addr):
            raise UsageError(f"{flag} {addr}: not a unicast address")
    if gateway == pod_ip:
        raise UsageError(f"--gateway {gateway} is the pod's own address (--pod-ip)")
    if _special(dns):
        raise UsageError(
            f"--dns {dns}: a loopback, unspecified, multicast or broadcast address cannot be "
            "the cluster DNS server (the embedded DNS proxy on 127.0.0.1 forwards to it)"
        )
    service = _network("--service-cidr", config.service_cidr, strict=True)
    if service.version != 4:
        raise UsageError(f"--service-cidr {service}: not an IPv4 range")
    pods = tuple(_network("--pod-cidr", c, strict=False) for c in config.pod_cidrs)
    _check_service(
        config,
        service,
        pods,
        (("the pod's own address (--pod-ip)", pod_ip), ("the gateway (--gateway)", gateway)),
        f" (pod {pod_ip})",
    )
    _check_mtu(config.mtu, uplink_mtu, config.dev, mtu_given)
    _validate_ipv6(config, pods)
    return replace(config, pod_cidrs=tuple(str(n) for n in pods))


def _validated6(config: PodConfig, uplink_mtu: int, mtu_given: bool) -> PodConfig:
    """``validated`` for an IPv6-only pod: its primary family is IPv6, and it has no other."""
    second = [v for v in (config.pod_ip6, config.gateway6, config.service_cidr6) if v]
    if second:
        raise UsageError(
            f"--pod-ip {config.pod_ip} is IPv6: an IPv6-only pod has no second family "
            f"({', '.join(second)}); pass IPv4 as --pod-ip on a dual-stack pod"
        )
    pod_ip = _address6("--pod-ip", config.pod_ip)
    if pod_ip.is_link_local or _special(pod_ip) or pod_ip.is_reserved:
        raise UsageError(f"--pod-ip {pod_ip}: not a global unicast address")
    gateway = _address6("--gateway", config.gateway)
    if _special(gateway):
        raise UsageError(f"--gateway {gateway}: not a unicast address")
    if gateway == pod_ip:
        raise UsageError(f"--gateway {gateway} is the pod's own address (--pod-ip)")
    dns = _address6("--dns", config.dns)
    if _special(dns):
        raise UsageError(
            f"--dns {dns}: a loopback, unspecified or multicast address cannot be the cluster "
            "DNS server (the embedded DNS proxy on 127.0.0.1 forwards to it)"
        )
    service = _network("--service-cidr", config.service_cidr, strict=True)
    if service.version != 6:
        raise UsageError(
            f"--service-cidr {service}: not an IPv6 range (the pod's address {pod_ip} is "
            "IPv6: an IPv6-only pod routes its cluster's IPv6 Service CIDR)"
        )
    pods = tuple(_network("--pod-cidr", c, strict=False) for c in config.pod_cidrs)
    _check_service(
        config,
        service,
        pods,
        (("the pod's own address (--pod-ip)", pod_ip), ("the gateway (--gateway)", gateway)),
    )
    _check_mtu(config.mtu, uplink_mtu, config.dev, mtu_given, version=6)
    return replace(config, pod_cidrs=tuple(str(n) for n in pods))


# IPv6 ranges a Service CIDR must never cover: unspecified/loopback/IPv4-mapped (::/8 holds
# them), link-local, site-local (deprecated) and multicast
HOST_RANGES6 = ("::/8", "fe80::/10", "fec0::/10", "ff00::/8")


def _validate_ipv6(
    config: PodConfig, pods: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> None:
    """The dual-stack half of ``validated``: the IPv6 pod address a global unicast one, the
    gateway any unicast one (link-local is IPv6's usual next hop), the IPv6 Service CIDR an
    IPv6 range clear of the host ranges, the uplink's IPv6 subnet, the pod's own addresses
    and the pod network, as for IPv4."""
    if not (config.pod_ip6 or config.gateway6 or config.service_cidr6):
        return
    pod6 = _address6("the pod's IPv6 address", config.pod_ip6) if config.pod_ip6 else None
    if pod6 is not None and (pod6.is_link_local or _special(pod6) or pod6.is_reserved):
        raise UsageError(f"the pod's IPv6 address {pod6}: not a global unicast address")
    gateway6 = _address6("the IPv6 gateway", config.gateway6) if config.gateway6 else None
    if gateway6 is not None and (_special(gateway6) or gateway6 == pod6):
        raise UsageError(f"the IPv6 gateway {gateway6}: not a unicast address of another host")
    if not config.service_cidr6:
        return
    service = _network("--service-cidr", config.service_cidr6, strict=True)
    if service.version != 6:
        raise UsageError(f"--service-cidr {service}: the second range must be the IPv6 one")
    _check_service(
        config, service, pods, (("the pod's IPv6 address", pod6), ("the IPv6 gateway", gateway6))
    )


def _check_service(
    config: PodConfig,
    service: ipaddress.IPv4Network | ipaddress.IPv6Network,
    pods: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    own: tuple[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None], ...],
    whose: str = "",
) -> None:
    """A Service CIDR (routed ``dev tenc0``) clear of the host ranges of its family, the
    uplink's subnet of its family, the pod's own addresses (``own``: what, address) and the
    pod network. ``whose`` follows the uplink subnet in its message."""
    flag = f"--service-cidr {service}"
    hosts = HOST_RANGES6 if service.version == 6 else HOST_RANGES
    for host in (ipaddress.ip_network(h) for h in hosts):
        if service.overlaps(host):
            raise UsageError(
                f"{flag} overlaps {host}, a range every host routes itself: "
                "its route into tenc0 would take the pod's own traffic"
            )
    for cidr in config.uplink_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == service.version and service.overlaps(net):
            raise UsageError(
                f"{flag} overlaps {config.dev}'s subnet {cidr}{whose}: its route into tenc0 "
                "would cut the pod off its own network"
            )
    for what, addr in own:
        if addr is not None and addr in service:
            raise UsageError(f"{flag} contains {what} {addr}")
    for pod_net in pods:
        if pod_net.version == service.version and service.overlaps(pod_net):
            raise UsageError(f"{flag} overlaps the pod network {pod_net} (--pod-cidr)")


def _address6(what: str, text: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise UsageError(f"{what} {text!r}: not an IPv6 address ({exc})") from exc


def _check_mtu(mtu: int, uplink_mtu: int, dev: str, given: bool, version: int = 4) -> None:
    overhead, least, why = (
        (OVERHEAD6, MIN_MTU6, "IPv6's minimum link MTU")
        if version == 6
        else (OVERHEAD, MIN_MTU, "the datagram every IPv4 host accepts")
    )
    ceiling = uplink_mtu - overhead
    if given and not least <= mtu <= ceiling:
        raise UsageError(
            f"--mtu {mtu}: tenc0's MTU must be from {least} ({why}) to {ceiling} "
            f"({dev}'s MTU {uplink_mtu} less the tunnel's {overhead} bytes)"
        )
    if not given and mtu < least:
        raise UsageError(
            f"--mtu: {dev}'s MTU {uplink_mtu} leaves {mtu} for tenc0 after the tunnel's "
            f"{overhead} bytes, below {least} ({why})"
        )


def _address(flag: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise UsageError(f"{flag} {text!r}: not an IPv4 address ({exc})") from exc


def _network(
    flag: str, text: str, *, strict: bool
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=strict)
    except ValueError as exc:
        raise UsageError(f"{flag} {text!r}: not a network ({exc})") from exc


def _unicast(addr: ipaddress.IPv4Address) -> bool:
    return not (_special(addr) or addr.is_reserved)


def _special(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, unspecified, multicast or the limited broadcast: never a host to route to."""
    return (
        addr.is_loopback
        or addr.is_unspecified
        or addr.is_multicast
        or addr == ipaddress.IPv4Address("255.255.255.255")
    )


def in_cidr(ip: str, cidr: str) -> bool:
    """``ip`` lies in ``cidr`` (either family; never across families)."""
    addr, net = ipaddress.ip_address(ip), ipaddress.ip_network(cidr, strict=False)
    return addr.version == net.version and addr in net


def split_hostport(text: str) -> tuple[str, str | None]:
    """``ADDR``, ``ADDR:PORT``, ``V6`` or ``[V6]:PORT`` as (address text, port text or None);
    nothing is validated (linux/dns.py ``parse_hostport`` does, for the flags)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def dns_address(text: str) -> str:
    """The address of a DNS server given as ``ADDR``, ``ADDR:PORT`` or ``[V6]:PORT``."""
    return split_hostport(text)[0]
