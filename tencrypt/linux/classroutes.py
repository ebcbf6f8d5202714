"""Classification changes → /32 routes in the pod's main table (DESIGN §1 "Routing").

Rules:
1. What a change needs is decided by the pure ``core.classify.plan_routes``: an INTERNAL peer
   pod outside the Service CIDR gets ``/32 dev tenc0 src <pod IP>``; an EXTERNAL address inside
   the Service CIDR gets ``/32 via <gateway> dev <uplink> src <pod IP>``; when the class changes
   or expires the route is replaced or removed.
2. The pod's own IP, its gateway and the cluster DNS server are never touched: setup owns their
   routes, and a DNS answer about them must not move them.
3. A route the kernel refuses is counted and logged at a bounded rate; the DNS proxy carries on
   (the data path still re-sends unrouted external traffic in the clear, DESIGN §1).
4. Only routes this applier added are ever removed. An address that ``pinned(ip)`` says has
   another owner (the daemon's /32 to a peer with a live authenticated session: the same
   kernel route) is left to that owner, whatever DNS says. ``close()`` removes every route
   this applier added, so a stopped proxy leaves no /32 behind (`setup --undo` sweeps them
   too: they carry Tencrypt's route protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tencrypt.core.classify import Change, RouteAction, plan_routes
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.classroutes")

EnsureRoute = Callable[..., None]
RemoveRoute = Callable[..., None]


class RouteApplier:
    """Keeps the /32 routes in step with the DNS proxy's classification of one pod."""

    def __init__(self, pod: PodConfig, stats: Stats | None = None, *,
                 ensure_route: EnsureRoute | None = None,
                 remove_route: RemoveRoute | None = None,
                 pinned: Callable[[str], bool] | None = None) -> None:
        if ensure_route is None or remove_route is None:
            from tencrypt.linux import netlink  # the only pyroute2 importer; lazily, see tests
            ensure_route = ensure_route or netlink.ensure_route
            remove_route = remove_route or netlink.remove_route
        self.pod = pod
        self.stats = stats if stats is not None else Stats()
        self._ensure, self._remove = ensure_route, remove_route
        self.keep = frozenset(ip for ip in (pod.pod_ip, pod.gateway, pod.dns.split(":")[0]) if ip)
        self.pinned = pinned or (lambda ip: False)
        self.installed: dict[str, RouteAction] = {}
        self.rlog = RateLimitedLog(log)

    def on_change(self, changes: Sequence[Change]) -> None:
        for ip, action in plan_routes(changes, self.pod.service_cidr, self.keep):
            if self.pinned(ip):
                self.installed.pop(ip, None)  # hand it over: its owner removes it
            elif action is RouteAction.NONE:
                self._withdraw(ip)
            else:
                self._install(ip, action)

    def close(self) -> None:
        for ip in list(self.installed):
            if not self.pinned(ip):
                self._withdraw(ip)

    def _install(self, ip: str, action: RouteAction) -> None:
        pod = self.pod
        try:
            if action is RouteAction.VIA_TUN:
                self._ensure(f"{ip}/32", dev=pod.tun, src=pod.pod_ip)
            else:
                self._ensure(f"{ip}/32", dev=pod.dev, gateway=pod.gateway or None,
                             src=pod.pod_ip)
        except (SetupError, OSError) as exc:
            self.stats.inc("dns_route_errors")
            self.rlog.warn("route-add", "route %s/32 (%s) refused: %s", ip, action.value, exc)
            return
        self.installed[ip] = action
        self.stats.inc("dns_routes_added")
        log.debug("route %s/32 %s", ip, action.value)

    def _withdraw(self, ip: str) -> None:
        if ip not in self.installed:
            return  # never ours (or refused when added): someone else's route stays
        try:
            self._remove(f"{ip}/32")
        except (SetupError, OSError) as exc:
            self.stats.inc("dns_route_errors")
            self.rlog.warn("route-del", "removing route %s/32 refused: %s", ip, exc)
            return
        del self.installed[ip]
        self.stats.inc("dns_routes_removed")
        log.debug("route %s/32 removed", ip)
