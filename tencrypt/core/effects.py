"""Side effects as data: which /32 routes and firewall set elements the pod should have, and
what the next round must do to get there (DESIGN §1a "Side effects never run inside a packet
or DNS callback").

Rules:
1. Classification changes (core.classify ``Change``) update what is *wanted*: an INTERNAL
   address is wanted in the firewall sets and gets the route ``route_action`` gives it (a /32
   into tenc0 for a peer pod outside the Service CIDR); an EXTERNAL Service VIP gets a /32 out
   of the uplink; no class, no route, no element.
2. Addresses whose routes setup owns (the pod's own IP, its gateway, the cluster DNS server)
   never get a route of ours nor a firewall element, whatever their class (the pod's
   boundary, DESIGN §1a; core/classify.py rule 9 already gives them no class).
3. ``plan()`` is the difference between wanted and applied, in one batch: routes to add or
   replace, routes to remove, elements to add, elements to remove. The shell applies it and
   reports each outcome (``route_done``, ``route_failed``, ``elements_done``); a failure
   leaves the difference in place, so the next round retries it.
4. Only routes this pod's proxy added are ever removed (``applied_routes``); only elements it
   knows are in the set are deleted (nft refuses deleting a missing one, and a refusal would
   fail the whole transaction). ``resync_elements`` replaces what it believes with what the
   kernel says after such a failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tencrypt.core.classify import AddrClass, Change, RouteAction, route_action


@dataclass(frozen=True, slots=True)
class Plan:
    routes: tuple[tuple[str, RouteAction], ...] = ()  # ensure this /32 (VIA_TUN / VIA_UPLINK)
    unroutes: tuple[str, ...] = ()  # remove our /32
    add: tuple[str, ...] = ()  # firewall set elements to add
    delete: tuple[str, ...] = ()  # and to delete

    def __bool__(self) -> bool:
        return bool(self.routes or self.unroutes or self.add or self.delete)


@dataclass(slots=True)
class Desired:
    service_cidr: str | tuple[str, ...]  # the Service CIDR(s) routed into tenc0
    keep: frozenset[str] = frozenset()
    want_routes: dict[str, RouteAction] = field(default_factory=dict)
    want_elements: set[str] = field(default_factory=set)
    applied_routes: dict[str, RouteAction] = field(default_factory=dict)
    applied_elements: set[str] = field(default_factory=set)
    unrouted: set[str] = field(default_factory=set)  # wanted routes not (yet) in place

    def on_changes(self, changes: Sequence[Change]) -> None:
        """Rule 1/2."""
        for ch in changes:
            action = route_action(ch.ip, ch.new, self.service_cidr)
            if action is RouteAction.NONE or ch.ip in self.keep:
                self.want_routes.pop(ch.ip, None)
                self.unrouted.discard(ch.ip)
            else:
                self.want_routes[ch.ip] = action
                if self.applied_routes.get(ch.ip) is not action:
                    self.unrouted.add(ch.ip)
            if ch.new is AddrClass.INTERNAL and ch.ip not in self.keep:
                self.want_elements.add(ch.ip)
            else:
                self.want_elements.discard(ch.ip)

    def plan(self) -> Plan:
        """Rule 3: what the next round does."""
        routes = tuple(
            (ip, a) for ip, a in self.want_routes.items() if self.applied_routes.get(ip) is not a
        )
        unroutes = tuple(ip for ip in self.applied_routes if ip not in self.want_routes)
        return Plan(
            routes,
            unroutes,
            tuple(self.want_elements - self.applied_elements),
            tuple(self.applied_elements - self.want_elements),
        )

    def route_done(self, ip: str, action: RouteAction | None) -> None:
        if action is None:
            self.applied_routes.pop(ip, None)
        else:
            self.applied_routes[ip] = action
        if self.want_routes.get(ip) is action or (action is None and ip not in self.want_routes):
            self.unrouted.discard(ip)

    def elements_done(self, added: Iterable[str], deleted: Iterable[str]) -> None:
        self.applied_elements.update(added)
        self.applied_elements.difference_update(deleted)

    def resync_elements(self, actual: Iterable[str]) -> None:
        """Rule 4: after a refused transaction, believe the kernel."""
        self.applied_elements = set(actual)

    def routed(self, ip: str) -> bool:
        """Whether the route ``ip`` wants is in place (or it wants none)."""
        return ip not in self.unrouted

    def pending(self, ip: str) -> bool:
        """Whether ``ip`` still waits for its route or its firewall element (an answer naming
        it internal is held until neither is missing: DESIGN §1a)."""
        return ip in self.unrouted or (ip in self.want_elements and ip not in self.applied_elements)
