"""Which pod IP a handshake may claim: identity bound to the network (DESIGN §1a).

Every pod of a project holds the same key, so the key proves "a pod of this project", not
"pod 10.128.2.7". The pod IP a handshake payload claims is what the tunnel routes to the
peer and what inner source addresses it accepts from it, so a claim is believed only when
the network backs it.

Rules (``ClaimPolicy.check``, first match wins; None = the claim is acceptable):
1. CLAIM_RESERVED: unspecified, loopback, link-local (169.254/16, e.g. the metadata address),
   multicast, broadcast or IETF-reserved addresses; this pod's own address; anything in
   ``reserved`` (the gateway, the cluster DNS server, ...).
2. CLAIM_SERVICE_IP: inside a Service CIDR (a VIP is never a pod).
3. CLAIM_OUTSIDE_POD_NETWORK: outside every ``pod_cidrs`` entry (an empty tuple: not checked:
   the pod network must be known — from the agent's membership or ``setup --pod-cidr`` —
   never guessed, since a node's own pod subnet is not the cluster's pod network).
4. CLAIM_NOT_MEMBER: ``is_member(ip)`` is False (the agent's membership knows the address
   and it is not the project's). None (unknown, e.g. no membership file yet) passes.
5. CLAIM_NOT_SOURCE: with ``bind_to_source`` (the default), the claim must equal the outer
   IPv4 source address of the datagram that carried it. Kubernetes does not SNAT pod-to-pod
   traffic, so a pod's tunnel datagrams come from its pod IP; a network that does SNAT it
   must turn the switch off and then relies on rules 1-4 and the rebind rule alone.

Rules that need the tunnel's tables (core/handshaking.py rule 9 applies them):
6. CLAIM_REBIND (``live_elsewhere``): a claim of a pod IP whose peer is confirmed (a
   response to our initiation, or an authenticated data message on its responder session,
   proved the keys) and holds a usable session with another UDP endpoint.
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

Pure: strings and the tunnel's peer objects in, a verdict out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tencrypt.core.peer import Endpoint, Limits, Peer, usable
from tencrypt.core.stats import DropReason

_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _unknown(_ip: str) -> bool | None:
    return None


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    """The facts a claim is checked against. See the module rules."""

    pod_cidrs: tuple[str, ...]  # the pod network; empty = not checked
    service_cidr: str | tuple[str, ...]  # the Service CIDR(s)
    self_ip: str
    reserved: frozenset[str] = frozenset()  # gateway, DNS server, ...
    bind_to_source: bool = True  # False only for networks that SNAT pod-to-pod traffic
    is_member: Callable[[str], bool | None] = _unknown
    vip_sessions: bool = True  # rules 7 and 8 (standalone); False in cluster mode
    _pods: tuple[ipaddress.IPv4Network, ...] = field(init=False, repr=False, compare=False)
    _services: tuple[ipaddress.IPv4Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ValueError on a bad CIDR: a configuration error, raised once at start.
        object.__setattr__(self, "_pods", tuple(ipaddress.IPv4Network(c) for c in self.pod_cidrs))
        cidrs = (self.service_cidr,) if isinstance(self.service_cidr, str) else self.service_cidr
        object.__setattr__(self, "_services", tuple(ipaddress.IPv4Network(c) for c in cidrs))

    def check(self, claimed_ip: str, outer_src: str) -> DropReason | None:
        """Why ``claimed_ip`` may not be claimed by a datagram from ``outer_src``, or None."""
        try:
            ip = ipaddress.IPv4Address(claimed_ip)
        except ValueError:
            return DropReason.CLAIM_RESERVED
        if (
            ip.is_unspecified
            or ip.is_loopback
            or ip.is_multicast
            or ip.is_reserved
            or ip == _BROADCAST
            or ip in _LINK_LOCAL
            or claimed_ip == self.self_ip
            or claimed_ip in self.reserved
        ):
            return DropReason.CLAIM_RESERVED
        if any(ip in net for net in self._services):
            return DropReason.CLAIM_SERVICE_IP
        if self._pods and not any(ip in net for net in self._pods):
            return DropReason.CLAIM_OUTSIDE_POD_NETWORK
        if self.is_member(claimed_ip) is False:
            return DropReason.CLAIM_NOT_MEMBER
        if self.bind_to_source and claimed_ip != outer_src:
            return DropReason.CLAIM_NOT_SOURCE
        return None

    def is_service_ip(self, address: str) -> bool:
        """Is ``address`` inside a Service CIDR?"""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._services)

    def via_vip(self, address: str) -> bool:
        """May a session be named after ``address`` as a VIP (rules 7 and 8)? Only on
        standalone's VIP path."""
        return self.vip_sessions and self.is_service_ip(address)


def claimable(packed: bytes, self_packed: bytes) -> str | None:
    """The baseline for every tunnel, with or without a policy: a claimed address that is not
    this pod, unspecified, loopback, multicast, reserved or broadcast, as a string."""
    ip = ipaddress.IPv4Address(packed)
    if (
        packed == self_packed
        or ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip.is_reserved
        or packed == b"\xff\xff\xff\xff"
    ):
        return None
    return str(ip)


def live_elsewhere(peer: Peer, addr: Endpoint, now: float, limits: Limits) -> bool:
    """Rule 6: is ``peer`` confirmed, with a usable session, at another endpoint than addr?"""
    return peer.confirmed and peer.endpoint != addr and usable(peer.current, now, limits)


def response_name(
    policy: ClaimPolicy,
    by_addr: Mapping[str, Peer],
    peer: Peer,
    claimed: str,
    addr: Endpoint,
    now: float,
    limits: Limits,
) -> str | DropReason:
    """Rule 7: the address a response lets ``peer`` be known by (the claimed pod IP, or the
    VIP it answered through), or why the claim is refused."""
    source = addr[0]
    via_vip = (
        policy.bind_to_source
        and source != claimed
        and source == peer.endpoint[0]
        and policy.via_vip(source)
    )
    reason = policy.check(claimed, claimed if via_vip else source)
    if reason is not None:
        return reason
    name = source if via_vip else claimed
    named = {a for a in peer.addresses if not policy.is_service_ip(a)}
    if named - {name} or (peer.confirmed and peer.pod_ip not in (None, name)):
        return DropReason.CLAIM_REBIND  # we asked pod X; the answer claims to be pod Y
    other = by_addr.get(name)
    if other is not None and other is not peer and live_elsewhere(other, addr, now, limits):
        return DropReason.CLAIM_REBIND
    return name


def initiation_name(
    policy: ClaimPolicy, by_addr: Mapping[str, Peer], claimed: str, addr: Endpoint
) -> str:
    """Rule 8: the VIP an initiation came through, if it came from a VIP peer; else the claim."""
    source = addr[0]
    if policy.bind_to_source and source != claimed and policy.via_vip(source):
        peer = by_addr.get(source)
        if peer is not None and peer.endpoint[0] == source:
            return source
    return claimed
