"""Which pod addresses a handshake may claim: identity bound to the network (DESIGN §1a).

Every pod of a project holds the same key, so the key proves "a pod of this project", not
"pod 10.128.2.7". The pod addresses a handshake payload claims (one per family, wire
version 3) are what the tunnel routes to the peer and what inner source addresses it accepts
from it, so a claim is believed only when the network backs it.

The **bound** claim is the one of the outer datagram's family (an IPv4 datagram: the IPv4
claim); the **other** claim (a dual-stack pod's second address) cannot be checked against the
network. Each claimed address is checked on its own (``check`` the bound one, ``check_paired``
the other one), against the same facts for both families.

Rules (``ClaimPolicy.check``, first match wins; None = the claim is acceptable):
1. CLAIM_RESERVED: an address no pod has. IPv4: unspecified, loopback, link-local
   (169.254/16, e.g. the metadata address), multicast, IETF-reserved (240/4) or broadcast.
   IPv6: unspecified ``::``, loopback ``::1``, IPv4-compatible ``::/96`` and IPv4-mapped
   ``::ffff:0:0/96``, link-local ``fe80::/10``, site-local ``fec0::/10``, multicast
   ``ff00::/8``, documentation ``2001:db8::/32``, discard ``100::/64`` and the other blocks the
   IETF keeps unassigned (``ipaddress``' ``is_reserved``: all but ``2000::/3``, ``fc00::/7``
   and the above). Unique local addresses (``fc00::/7``, the usual dual-stack pod network)
   are not reserved: rule 3 decides. Either family: this pod's own addresses and anything in
   ``reserved`` (the gateway, the cluster DNS server, ...).
2. CLAIM_SERVICE_IP: inside a Service CIDR (a VIP is never a pod).
3. CLAIM_OUTSIDE_POD_NETWORK: outside every ``pod_cidrs`` entry. The pod network must be
   known — from the agent's membership or ``setup --pod-cidr`` — never guessed, since a
   node's own pod subnet is not the cluster's pod network. An empty tuple: not checked (for
   either family); a pod network of one family only refuses every claim of the other.
4. CLAIM_NOT_MEMBER: ``is_member(ip)`` is False (the agent's membership knows the address
   and it is not the project's). None (unknown, e.g. no membership file yet) passes.
5. CLAIM_NOT_SOURCE: with ``bind_to_source`` (the default), the bound claim must equal the
   outer source address of the datagram that carried it (an initiation that claims no
   address of its datagram's family is refused so). Kubernetes does not SNAT pod-to-pod
   traffic, so a pod's tunnel datagrams come from its pod IP; a network that does SNAT it
   must turn the switch off and then relies on rules 1-4 and the rebind rule alone (the
   claim of the datagram's family, else the only one, is then the bound one).
   The other claim (``check_paired``) passes rules 1-4 and is believed only when
   ``paired(bound, other)``: the membership lists both as one pod's addresses (its
   ``status.podIPs``). Otherwise it is CLAIM_NOT_SOURCE too: nothing vouches for it. A
   refused other claim does not refuse the handshake: the session serves the bound family
   only, and the refusal is counted (``claims_unpaired``, core/handshaking.py rule 9).

Rules that need the tunnel's tables (core/handshaking.py rule 9 applies them):
6. CLAIM_REBIND (``live_elsewhere``): a claim of a pod address (either claim) whose peer is
   confirmed (a response to our initiation, or an authenticated data message on its
   responder session, proved the keys) and holds a usable session with another UDP
   endpoint. An endpoint at one of the pod addresses this handshake proved (the bound one and
   an accepted other one: the same pod, over its other family) is not another endpoint.
   A restarted pod comes back from the same pod IP and port, so it is let in; under SNAT
   (``bind_to_source`` off) a restarted pod whose endpoint changed waits until the old
   session is no longer usable (``reject_after_time``).
Rules 7 and 8 name a session after the Service VIP it was reached through: standalone mode's
VIP path only (``vip_sessions``). In cluster mode the sender translates VIPs to pod IPs itself
(core/conntrack.py), every session is between two pod IPs, and a claim must always equal the
outer source (rule 5).
7. Responses (``response_name``): the claim must come from the peer we initiated to. If the
   response came back from the Service VIP we sent the initiation to (conntrack undoes the
   DNAT, so the source is the VIP, not the pod), the claim cannot be checked against the
   source: it still passes rules 1-4, and the session is named after the VIP only.
   A peer we reached through a pod IP answers for that pod IP only (CLAIM_REBIND
   otherwise), and a confirmed peer is never renamed.
8. Initiations (``initiation_name``): while conntrack holds the VIP's DNAT entry, the pod
   behind a VIP we talk to reaches us from the VIP (its re-handshakes too). An initiation
   from a Service VIP that names a peer we reach at that VIP is attached to that peer, named
   after the VIP only, like rule 7; from any other address the claim must equal the source.
   Consequence: the pod behind the VIP cannot use its own pod IP as inner source on such a
   session (BAD_SOURCE): traffic it starts towards our pod IP needs a session bound by the
   network, not one whose claim nobody could check.

Rules 7 and 8 are about the bound claim; a session named after a VIP speaks for the VIP only
and never takes the other claim.

Addresses are compared as addresses, not as text: a claim is turned into its canonical text
(``str(ipaddress.ip_address(...))``, what the membership holds), the outer source into
``wire.outer_ip``'s.

Pure: strings and the tunnel's peer objects in, a verdict out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from tencrypt.core import wire
from tencrypt.core.peer import Endpoint, Limits, Peer, usable
from tencrypt.core.stats import DropReason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
# Rule 1's IPv6 list (besides is_reserved, which covers the IETF's unassigned blocks)
_V6_RESERVED = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # IPv4-compatible (deprecated, RFC 4291 §2.5.5.1), with :: and ::1
        "::ffff:0:0/96",  # IPv4-mapped (RFC 4291 §2.5.5.2): an IPv4 address in disguise
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, RFC 3879)
        "ff00::/8",  # multicast
        "2001:db8::/32",  # documentation (RFC 3849)
        "100::/64",  # discard-only (RFC 6666)
    )
)


def _unknown(_ip: str) -> bool | None:
    return None


def _unpaired(_bound: str, _other: str) -> bool:
    return False


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _addresses(texts: Collection[str]) -> frozenset[IPAddress]:
    return frozenset(ip for ip in map(_address, texts) if ip is not None)


def special(ip: IPAddress) -> bool:
    """Rule 1 without this pod's own and ``reserved`` addresses: an address no pod has."""
    if ip.version == 4:
        return bool(
            ip.is_unspecified
            or ip.is_loopback
            or ip.is_multicast
            or ip.is_reserved
            or ip == _BROADCAST
            or ip in _LINK_LOCAL
        )
    return ip.is_reserved or any(ip in net for net in _V6_RESERVED)


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    """The facts a claim is checked against. See the module rules."""

    pod_cidrs: tuple[str, ...]  # the pod network (both families); empty = not checked
    service_cidr: str | tuple[str, ...]  # the Service CIDR(s), both families
    self_ip: str
    reserved: frozenset[str] = frozenset()  # gateway, DNS server, this pod's other address...
    bind_to_source: bool = True  # False only for networks that SNAT pod-to-pod traffic
    is_member: Callable[[str], bool | None] = _unknown
    vip_sessions: bool = True  # rules 7 and 8 (standalone); False in cluster mode
    paired: Callable[[str, str], bool] = _unpaired  # rule 5: one pod's two addresses?
    _pods: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _services: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _own: frozenset[IPAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ValueError on a bad CIDR: a configuration error, raised once at start.
        pods = tuple(ipaddress.ip_network(c) for c in self.pod_cidrs)
        object.__setattr__(self, "_pods", pods)
        cidrs = (self.service_cidr,) if isinstance(self.service_cidr, str) else self.service_cidr
        object.__setattr__(self, "_services", tuple(ipaddress.ip_network(c) for c in cidrs))
        object.__setattr__(self, "_own", _addresses({self.self_ip, *self.reserved}))

    def check(self, claimed_ip: str, outer_src: str) -> DropReason | None:
        """Why ``claimed_ip`` may not be claimed by a datagram from ``outer_src`` (rules 1-5
        for the bound claim), or None."""
        ip = _address(claimed_ip)
        if ip is None:
            return DropReason.CLAIM_RESERVED
        reason = self._static(ip)
        if reason is None and self.bind_to_source and ip != _address(wire.outer_ip(outer_src)):
            return DropReason.CLAIM_NOT_SOURCE
        return reason

    def check_paired(self, claimed_ip: str, bound: str) -> DropReason | None:
        """Why the other family's claim ``claimed_ip`` may not join the accepted claim
        ``bound`` (rules 1-4, then rule 5's pairing: CLAIM_NOT_SOURCE), or None."""
        ip = _address(claimed_ip)
        if ip is None:
            return DropReason.CLAIM_RESERVED
        reason = self._static(ip)
        if reason is None and not self.paired(bound, str(ip)):
            return DropReason.CLAIM_NOT_SOURCE
        return reason

    def _static(self, ip: IPAddress) -> DropReason | None:
        """Rules 1-4."""
        if special(ip) or ip in self._own:
            return DropReason.CLAIM_RESERVED
        if any(ip in net for net in self._services):
            return DropReason.CLAIM_SERVICE_IP
        if self._pods and not any(ip in net for net in self._pods):
            return DropReason.CLAIM_OUTSIDE_POD_NETWORK
        if self.is_member(str(ip)) is False:
            return DropReason.CLAIM_NOT_MEMBER
        return None

    def is_service_ip(self, address: str) -> bool:
        """Is ``address`` inside a Service CIDR?"""
        ip = _address(address)
        return ip is not None and any(ip in net for net in self._services)

    def via_vip(self, address: str) -> bool:
        """May a session be named after ``address`` as a VIP (rules 7 and 8)? Only on
        standalone's VIP path."""
        return self.vip_sessions and self.is_service_ip(address)


def claimable(packed: bytes, own: bytes | Collection[bytes]) -> str | None:
    """The baseline for every tunnel, with or without a policy: a claimed address (4 or 16
    packed bytes) that is not one of this pod's (``own``), unspecified, loopback, multicast
    or reserved (IPv4: 240/4 and the broadcast; IPv6: the unassigned blocks, IPv4-mapped
    and -compatible included), as canonical text."""
    mine = (own,) if isinstance(own, bytes) else own
    if packed in mine:
        return None
    ip = ipaddress.ip_address(packed)
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        return None
    if ip == _BROADCAST:
        return None
    return str(ip)


def _same_endpoint(a: Endpoint, b: Endpoint) -> bool:
    return a[1] == b[1] and (a[0] == b[0] or wire.outer_ip(a[0]) == wire.outer_ip(b[0]))


def proved(policy: ClaimPolicy, source: str, *others: str | None) -> tuple[str, ...]:
    """The pod addresses a handshake from ``source`` proved, for rule 6's exception: the
    source and the other claims accepted beside it (``others``); nothing without
    ``bind_to_source``, where no claim is proved by the network."""
    if not policy.bind_to_source:
        return ()
    return (wire.outer_ip(source), *(a for a in others if a is not None))


def live_elsewhere(
    peer: Peer, addr: Endpoint, now: float, limits: Limits, here: Collection[str] = ()
) -> bool:
    """Rule 6: is ``peer`` confirmed, with a usable session, at another endpoint than addr
    (or, on addr's port, than the pod addresses ``here`` that the handshake proved:
    ``proved``)?"""
    if not peer.confirmed or not usable(peer.current, now, limits):
        return False
    endpoint = peer.endpoint
    if _same_endpoint(endpoint, addr):
        return False
    return not (endpoint[1] == addr[1] and wire.outer_ip(endpoint[0]) in here)


def other_claim(
    policy: ClaimPolicy,
    by_addr: Mapping[str, Peer],
    peer: Peer | None,
    claimed: str,
    bound: str,
    addr: Endpoint,
    now: float,
    limits: Limits,
) -> DropReason | None:
    """Rules 1-5 (``check_paired``) and 6 for the other family's claim of a handshake whose
    bound claim ``bound`` was accepted for ``peer`` (None: a new peer)."""
    reason = policy.check_paired(claimed, bound)
    if reason is not None:
        return reason
    other = by_addr.get(claimed)
    here = proved(policy, addr[0], claimed)
    if other is not None and other is not peer and live_elsewhere(other, addr, now, limits, here):
        return DropReason.CLAIM_REBIND
    return None


def response_name(
    policy: ClaimPolicy,
    by_addr: Mapping[str, Peer],
    peer: Peer,
    claimed: str,
    addr: Endpoint,
    now: float,
    limits: Limits,
    here: Collection[str] = (),
) -> str | DropReason:
    """Rule 7: the address a response lets ``peer`` be known by (the claimed pod IP, or the
    VIP it answered through), or why the claim is refused. ``here``: the response's other
    accepted claim, if any (the same pod: rule 6's exception)."""
    source = wire.outer_ip(addr[0])
    via_vip = (
        policy.bind_to_source
        and source != claimed
        and source == wire.outer_ip(peer.endpoint[0])
        and policy.via_vip(source)
    )
    reason = policy.check(claimed, claimed if via_vip else source)
    if reason is not None:
        return reason
    name = source if via_vip else claimed
    named = {a for a in peer.addresses if not policy.is_service_ip(a) and a != peer.paired}
    if named - {name, *here} or (peer.confirmed and peer.pod_ip not in (None, name, *here)):
        return DropReason.CLAIM_REBIND  # we asked pod X; the answer claims to be pod Y
    other = by_addr.get(name)
    if (
        other is not None
        and other is not peer
        and live_elsewhere(other, addr, now, limits, proved(policy, source, *here))
    ):
        return DropReason.CLAIM_REBIND
    return name


def initiation_name(
    policy: ClaimPolicy, by_addr: Mapping[str, Peer], claimed: str, addr: Endpoint
) -> str:
    """Rule 8: the VIP an initiation came through, if it came from a VIP peer; else the claim."""
    source = wire.outer_ip(addr[0])
    if policy.bind_to_source and source != claimed and policy.via_vip(source):
        peer = by_addr.get(source)
        if peer is not None and wire.outer_ip(peer.endpoint[0]) == source:
            return source
    return claimed
