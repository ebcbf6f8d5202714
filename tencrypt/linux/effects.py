"""The one task that makes the kernel match ``core.effects.Desired``: host routes (/32, /128) (netlink) and
strict mode's firewall set elements (nft).

Rules:
1. Packet and DNS callbacks only record what they want (``Desired.on_changes``) and ``wake()``
   this task; they never wait on netlink or a subprocess, and nothing here raises into them.
2. A round takes ``Desired.plan()`` and applies it in a worker thread (netlink and nft block
   for milliseconds; the event loop keeps serving packets meanwhile), then records each
   outcome back on the loop. Rounds run one at a time.
3. A refused route or transaction is counted (``effect_errors``), logged at a bounded rate and
   left in the plan: the task retries it every ``RETRY`` seconds until it succeeds. After a
   refused firewall transaction the task re-reads the sets (the kernel is the truth).
4. The firewall's refusal counters are read (an ``nft`` process) once at start and then only
   when /metrics or /status asks (``want_counters``) and the last read is ``COUNTER_INTERVAL``
   or more old: a scrape serves the last read's values (at most one scrape interval old) and
   wakes this task to read them again. An idle proxy that nobody scrapes runs nothing: no
   timer, no process (issue 26: idle CPU zero).
5. ``close()`` removes the routes this task added (a stopped proxy leaves no /32 behind); the
   firewall table stays until `setup --undo` (DESIGN §1a).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tencrypt.core.classify import RouteAction
from tencrypt.core.effects import Desired, Plan
from tencrypt.core.podconfig import PodConfig, dns_address
from tencrypt.core.stats import Counter, Stats
from tencrypt.errors import SetupError
from tencrypt.linux import rtnl
from tencrypt.logutil import RateLimitedLog

if TYPE_CHECKING:
    from tencrypt.linux.nfqueue import NfQueue

log = logging.getLogger("tencrypt.effects")
RETRY = 1.0  # seconds between rounds while something is left to do
COUNTER_INTERVAL = 5.0  # seconds a read of the firewall's counters serves scrapes (rule 4)


@dataclass(slots=True)
class Outcome:
    routes: list[tuple[str, RouteAction | None]] = field(default_factory=list)
    elements: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (added, deleted)
    resync: set[str] | None = None
    errors: list[str] = field(default_factory=list)


class Kernel:
    """What a round does to the kernel; tests pass their own."""

    def __init__(self, pod: PodConfig, firewall: bool) -> None:
        from tencrypt.linux import firewall as fw

        self.pod, self.fw, self.firewall = pod, fw, firewall

    def install_firewall(self) -> None:
        """Setup installed it; install again (idempotent, keeps elements) in case it was
        removed, and with this proxy's port. A refusal is a SetupError: no proxy without it."""
        self.fw.install(self.pod.dev, self.pod.port, self.pod.fwmark)

    def remove_firewall(self) -> None:
        from tencrypt.linux import nfqueue

        self.fw.remove_table()
        nfqueue.remove_rules(self.pod.dev)

    def open_inbound_queue(self, stats: Stats) -> NfQueue:
        """Standalone strict mode: queue new plaintext connections from the pod network
        (rules first, so they wait for us rather than pass; linux.inbound decides)."""
        from tencrypt.linux import nfqueue

        nfqueue.install_rules(nfqueue.QUEUE_NUM, self.pod.dev, self.pod.guarded_pods, self.pod.port)
        return nfqueue.NfQueue(nfqueue.QUEUE_NUM, stats)

    def open_outbound_queue(self, stats: Stats) -> NfQueue:
        """Standalone strict mode: queue new connections from this pod to the pod network
        that no route of ours carries into tenc0 (linux.inbound.OutboundGate decides); the
        gateway and the DNS server are the pod's boundary, never queued."""
        from tencrypt.linux import nfqueue

        pod = self.pod
        exempt = [ip for ip in (pod.gateway, dns_address(pod.dns)) if ip]
        nfqueue.install_rules_out(
            nfqueue.OUT_QUEUE_NUM, pod.dev, pod.guarded_pods, pod.fwmark, exempt
        )
        return nfqueue.NfQueue(nfqueue.OUT_QUEUE_NUM, stats)

    def route(self, ip: str, action: RouteAction) -> None:
        """Raw rtnetlink (linux.rtnl): the same route linux.netlink would add, no pyroute2."""
        pod = self.pod
        dst, src = rtnl.host_prefix(ip), pod.source_for(ip)
        if action is RouteAction.VIA_TUN:
            rtnl.replace_route(dst, dev=pod.tun, src=src)
        else:
            gateway = pod.gateway_for(ip) or None  # its family's (IPv6-only: the primary)
            rtnl.replace_route(dst, dev=pod.dev, gateway=gateway, src=src)

    def unroute(self, ip: str) -> None:
        rtnl.delete_route(rtnl.host_prefix(ip))

    def change(self, add: tuple[str, ...], delete: tuple[str, ...]) -> None:
        if self.firewall:
            self.fw.change(add, delete)

    def elements(self) -> set[str]:
        return self.fw.elements() if self.firewall else set()

    def counters(self) -> dict[str, int]:
        return self.fw.counters() if self.firewall else {}


async def until_woken(
    wake: asyncio.Event, stop: asyncio.Future[Any], timeout: float | None
) -> None:
    """Until ``wake`` is set, ``stop`` is done or ``timeout`` seconds pass (None: no limit):
    the sleep of a task that a stop must end as a wake does (this one's ``run``, and
    control.py's timers)."""
    woken = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait((woken, stop), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()


class EffectApplier:
    def __init__(
        self,
        desired: Desired,
        stats: Stats,
        kernel: Kernel,
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        self.desired, self.stats, self.kernel = desired, stats, kernel
        self.on_applied = on_applied or (lambda: None)
        self.firewall_counters: dict[str, int] = {}
        self.rlog = RateLimitedLog(log)
        self._wake = asyncio.Event()
        self._last_counters = float("-inf")
        self._counters_wanted = True  # the first round reads them (rule 4)

    def wake(self) -> None:
        self._wake.set()

    def want_counters(self) -> None:
        """Rule 4: a scrape's request; the next round reads them when the last read is stale."""
        if time.monotonic() - self._last_counters >= COUNTER_INTERVAL:
            self._counters_wanted = True
            self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Rounds until ``stopping``: one when woken, every RETRY while something is left;
        idle, none at all (rule 4) — a stop ends the wait as a wake does."""
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                await self.round()
                await until_woken(self._wake, stop, RETRY if self.desired.plan() else None)
        finally:
            stop.cancel()

    async def round(self) -> None:
        """Rule 2: one plan applied off the loop, outcomes recorded on it."""
        self._wake.clear()
        plan = self.desired.plan()
        read_counters, self._counters_wanted = self._counters_wanted, False
        if not plan and not read_counters:
            return
        loop = asyncio.get_running_loop()
        outcome, counters = await loop.run_in_executor(None, self._apply, plan, read_counters)
        if read_counters:
            self._last_counters = time.monotonic()
            self.firewall_counters = counters
        self._record(outcome)
        if plan:
            self.on_applied()

    def close(self) -> None:
        """Rule 5 (synchronous: the loop is stopping)."""
        for ip in list(self.desired.applied_routes):
            with contextlib.suppress(SetupError, OSError):
                self.kernel.unroute(ip)
                self.desired.route_done(ip, None)

    def _apply(self, plan: Plan, read_counters: bool) -> tuple[Outcome, dict[str, int]]:
        out = Outcome()
        for ip, action in plan.routes:
            try:
                self.kernel.route(ip, action)
                out.routes.append((ip, action))
            except (SetupError, OSError) as exc:
                out.errors.append(f"route {rtnl.host_prefix(ip)} ({action.value}): {exc}")
        for ip in plan.unroutes:
            try:
                self.kernel.unroute(ip)
                out.routes.append((ip, None))
            except (SetupError, OSError) as exc:
                out.errors.append(f"removing route {rtnl.host_prefix(ip)}: {exc}")
        if plan.add or plan.delete:
            try:
                self.kernel.change(plan.add, plan.delete)
                out.elements = (plan.add, plan.delete)
            except (SetupError, OSError) as exc:
                out.errors.append(f"firewall set change: {exc}")
                with contextlib.suppress(SetupError, OSError):
                    out.resync = self.kernel.elements()
        counters: dict[str, int] = {}
        if read_counters:
            with contextlib.suppress(SetupError, OSError):
                counters = self.kernel.counters()
        return out, counters

    def _record(self, out: Outcome) -> None:
        for ip, action in out.routes:
            self.desired.route_done(ip, action)
        n_routes = sum(1 for _, a in out.routes if a is not None)
        if n_routes:
            self.stats.inc(Counter.ROUTES_ADDED, n_routes)
        if len(out.routes) > n_routes:
            self.stats.inc(Counter.ROUTES_REMOVED, len(out.routes) - n_routes)
        if out.elements is not None:
            self.desired.elements_done(*out.elements)
            self.stats.inc(Counter.FIREWALL_ELEMENTS_ADDED, len(out.elements[0]))
            self.stats.inc(Counter.FIREWALL_ELEMENTS_DELETED, len(out.elements[1]))
        if out.resync is not None:
            self.desired.resync_elements(out.resync)
        for error in out.errors:
            self.stats.inc(Counter.EFFECT_ERRORS)
            self.rlog.warn("effect-" + error.split(" ")[0], "%s (retrying)", error)
