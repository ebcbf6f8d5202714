"""What the proxy does with a packet read from tenc0: one verdict from the evidence at hand.

Rules (DESIGN §1a "Fail closed"):
1. INTERNAL (any trusted source says so, core.classify rule 4) → SEAL, always in strict mode.
   With ``--no-strict`` an internal peer whose handshakes went unanswered (``fallback``) is
   reached in the CLEAR for a while: the documented, logged, counted opt-out.
2. EXTERNAL and internal by no source → CLEAR (out of the uplink, untouched).
3. Unknown outside the guarded ranges (the Service CIDR and the pod network) → CLEAR: such an
   address is not the project's (nothing routes it into tenc0 but a stale /32).
4. Unknown inside the guarded ranges → HOLD while a reverse (PTR) lookup decides; still
   unknown after it (no record, SERVFAIL, time-out) → REFUSE in strict mode (dropped, counted,
   ICMP "administratively prohibited" to the local sender so it fails fast), CLEAR only with
   ``--no-strict``.
Nothing else leaves in the clear. The verdicts are one table (``TABLE``), tested exhaustively.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from tencrypt.core.classify import AddrClass


class Verdict(enum.Enum):
    SEAL = "seal"  # sealed to the peer's proxy
    CLEAR = "clear"  # re-sent in the clear out of the uplink
    HOLD = "hold"  # kept while a reverse lookup classifies the destination
    REFUSE = "refuse"  # dropped, counted, ICMP admin-prohibited to the sender


# (class, guarded, looked up, strict) -> verdict; the fallback of rule 1 is applied on top
TABLE: dict[tuple[AddrClass | None, bool, bool, bool], Verdict] = {}
for _guarded in (False, True):
    for _looked in (False, True):
        for _strict in (False, True):
            TABLE[AddrClass.INTERNAL, _guarded, _looked, _strict] = Verdict.SEAL
            TABLE[AddrClass.EXTERNAL, _guarded, _looked, _strict] = Verdict.CLEAR
            TABLE[None, _guarded, _looked, _strict] = (
                Verdict.CLEAR
                if not _guarded
                else Verdict.HOLD
                if not _looked
                else Verdict.REFUSE
                if _strict
                else Verdict.CLEAR
            )


def decide(
    cls: AddrClass | None, *, guarded: bool, looked_up: bool, strict: bool, fallback: bool = False
) -> Verdict:
    """The verdict for a destination of class ``cls`` (rules 1-4)."""
    verdict = TABLE[cls, guarded, looked_up, strict]
    if verdict is Verdict.SEAL and fallback and not strict:
        return Verdict.CLEAR
    return verdict


# Inbound plaintext opening a connection from the pod network, in standalone mode (no
# membership; linux.inbound): refused when its source is the project's, accepted when it is
# positively another project's or a reverse lookup could not tell (real cluster DNS names few
# pod IPs: refusing those would cut every cross-project client; docs/DESIGN.md §1a residual).
INBOUND: dict[tuple[AddrClass | None, bool], Verdict] = {
    (AddrClass.INTERNAL, False): Verdict.REFUSE,
    (AddrClass.INTERNAL, True): Verdict.REFUSE,
    (AddrClass.EXTERNAL, False): Verdict.CLEAR,
    (AddrClass.EXTERNAL, True): Verdict.CLEAR,
    (None, False): Verdict.HOLD,
    (None, True): Verdict.CLEAR,
}


def decide_inbound(cls: AddrClass | None, *, looked_up: bool, locked: bool = False) -> Verdict:
    """The verdict for a queued plaintext connection from a source of class ``cls``. With
    ``locked`` (a membership file there but never loadable), a source still unknown after its
    lookup is refused: the weaker standalone evidence does not open the door."""
    if locked and cls is None and looked_up:
        return Verdict.REFUSE
    return INBOUND[cls, looked_up]


@dataclass(frozen=True, slots=True)
class Guard:
    """The ranges where an unknown address may be the project's: the Service CIDRs and the pod
    network (IPv4 and IPv6 networks allowed). Either may be empty (not known)."""

    services: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    pods: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, service_cidrs: str | Sequence[str], pod_cidrs: Sequence[str]) -> Guard:
        services = (service_cidrs,) if isinstance(service_cidrs, str) else tuple(service_cidrs)
        return cls(
            tuple(ipaddress.ip_network(c, strict=False) for c in services if c),
            tuple(ipaddress.ip_network(c, strict=False) for c in pod_cidrs if c),
        )

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return self.services + self.pods

    def __contains__(self, ip: str) -> bool:
        return _within(ip, self.networks)

    def in_services(self, ip: str) -> bool:
        return _within(ip, self.services)


def _within(ip: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)
