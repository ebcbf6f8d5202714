"""The proxy's control plane: what changes the data path's tables, never a packet — peer
events, classification changes, the membership (and the Services and cluster ranges it
brings), the key file, and the timers that drive them. ``daemon.Proxy`` (the pump) extends it
and owns the state named below; nothing here runs inside a packet loop except the event
hand-off after a batch (``_on_peer_events``).

Rules:
1. A change of classification becomes wanted routes and firewall elements, applied by the
   effects task, never inside a DNS or packet callback (DESIGN §1a).
2. A PeerUp or PeerDown renews the peer's session evidence (SESSION_EVIDENCE); an
   unreachable peer is refused in strict mode and reached in the clear only with
   ``--no-strict`` (PLAINTEXT_FOR seconds, logged and counted).
3. A membership (core/membership.py) replaces the members, the Service table (format 2:
   cluster mode) and the cluster's ranges (core/clustershape.py) in one step; packets that
   waited for a Service the new table lists are routed again at once. A membership file that
   is there but was never loadable locks the dispatcher (core/dispatch.py rule 5) and the
   inbound gate: not standalone's weaker evidence, until a good file comes.
4. Timers sleep until something is due (issue 26: an idle proxy spends no CPU). One task
   (``timers``) drives the tunnel's deadlines (core/timers.py), the overdue WAITs (refused
   at their deadline), flow and hold expiry, the renewal of the up peers' session evidence
   (every RENEW_EVIDENCE, a quarter of SESSION_EVIDENCE: evidence never runs out while its
   session is up) and the polls of the membership and key files; after each round it sleeps
   until the earliest of their deadlines (core/timers.py ``sleep_plan``), never on a tick.
   Exactness: something due at t is done at t (the loop's latency aside; a deadline its
   round left in the past waits core/timers.py STUCK, 10 ms, instead of spinning). The
   rule that keeps it so when a deadline is created while the task sleeps:
   a. Every deadline is created at least ``lead`` seconds before it is due
      (``_deadline_lead``: the shortest of rekey_timeout, keepalive_timeout, stale_timeout,
      wait_for_members; flow and fragment expiry are later still and only free memory:
      a dead flow is dead to every lookup already, core/flowstate.py rule 2).
   b. A sleep that ends no later than ``lead`` after the round began needs nobody: what
      is created meanwhile is due after it. A longer ("deep") sleep is ended by the first
      ``deadlines_moved()`` call: the shell (daemon.Proxy) makes it at the end of every
      batch of the Python path (``_flush``), one attribute test when not deep; the round it
      wakes then sleeps at most ``lead``.
   c. The express lane (core/express.py ``take``/``accept``) runs no such hook per packet;
      the only deadlines it creates are the keepalive and stale deadlines of a peer with a
      keyed session (it refuses any other), ``keepalive_timeout``/``stale_timeout`` after the
      packet; it only ever clears or sets them, never moves one earlier. So while any session
      still has its keys the task sleeps at most min(keepalive_timeout, stale_timeout); once
      every session has expired (reject_after_time after its handshake, a deadline here
      too) it sleeps until the next real deadline: an idle proxy, the file safety poll.
   d. The membership and key files are watched with inotify on their directories
      (linux/watch.py): an event wakes the task, which polls both at once; a safety poll
      every SAFETY_POLL seconds remains, and where inotify cannot be used the files are
      polled every SWEEP, as before.
   The DNS table's expiry is the DNS proxy's (linux/dns.py ``_arm_sweep``), armed the same
   way from core/classify.py's ``next_expiry``.
5. The membership's NetworkPolicy document (core/netpolicy.py) is loaded into the
   dispatcher's policy flows (core/policyflows.py) when its text changes; none: nothing is
   enforced (standalone mode, an agent that sends none).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tencrypt import observe
from tencrypt.core.classify import Change, ClassTable
from tencrypt.core.clustershape import claim_policy, cluster_ranges
from tencrypt.core.dispatch import Dispatcher
from tencrypt.core.effects import Desired
from tencrypt.core.flowstate import earliest
from tencrypt.core.keyring import KeyRing
from tencrypt.core.membership import Members
from tencrypt.core.nat import FlowTable
from tencrypt.core.netpolicy import Direction, parse_netpol
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.policy import Guard
from tencrypt.core.services import ServiceTable
from tencrypt.core.session import PeerDown, PeerUnreachable, PeerUp, Tunnel
from tencrypt.core.stats import Counter, Stats
from tencrypt.core.timers import sleep_plan
from tencrypt.linux.effects import EffectApplier, until_woken
from tencrypt.linux.keyfile import KeyFile, describe, write_loaded
from tencrypt.linux.members import MembersFile
from tencrypt.linux.watch import SAFETY_POLL, DirWatch
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.run")
PLAINTEXT_FOR = 60.0  # --no-strict: seconds an internal peer without a proxy is reached in clear
SESSION_EVIDENCE = 86400.0  # seconds a peer's pod IP stays internal after its session was up
SWEEP = 1.0  # seconds between polls of the membership and key files without inotify
RENEW_EVIDENCE = SESSION_EVIDENCE / 4  # rule 4: up peers' evidence renewed this often


class ControlPlane(abc.ABC):
    # the state the pump (daemon.Proxy) builds and this class changes
    config: PodConfig
    strict: bool
    stats: Stats
    tunnel: Tunnel
    flows: FlowTable
    table: ClassTable
    dispatch: Dispatcher
    desired: Desired
    effects: EffectApplier
    members: MembersFile | None
    keyfile: KeyFile | None
    loaded_dir: Path | None
    clock: Callable[[], float]
    wall: Callable[[], float]
    ratelog: RateLimitedLog
    up_peers: set[str]
    cidr_mismatch: str | None
    stopping: asyncio.Event
    # rule 4: set while the timer task sleeps deep; its wake-up (None: no task sleeping)
    _timers_deep: bool = False
    _timers_wake: asyncio.Event | None = None
    _timers_batch: bool = False  # rule 4b: woken by a batch (its next sleep is not deep)
    timers_at: float | None = None  # when the timer task's sleep ends (None: until woken)
    _files_due: bool = False
    watch: DirWatch | None = None

    # what the pump does with packets (daemon.Proxy)
    @abc.abstractmethod
    def _flush(self) -> None:
        """Send what the tunnel produced."""

    @abc.abstractmethod
    def _reroute(self, packets: list[bytearray], now: float, looked_up: bool = False) -> None:
        """Route held packets again."""

    @abc.abstractmethod
    def _refuse(
        self, packets: Sequence[bytes | bytearray | memoryview], now: float, counted: bool = False
    ) -> None:
        """Drop packets, counted, with ICMP administratively prohibited to their sender."""

    def _is_member(self, ip: str) -> bool | None:
        """A claimed pod IP against the membership: None where no membership is known."""
        loaded = self.members.loaded if self.members else None
        return None if loaded is None else ip in loaded.pods

    def _on_peer_events(self, now: float) -> None:
        for event in self.tunnel.pop_events():
            if isinstance(event, PeerUp):
                log.info("peer %s up (endpoint %s:%d)", event.pod_ip, *event.endpoint)
                self.up_peers.add(event.pod_ip)
                self._on_changes(self.table.note_session(event.pod_ip, now, SESSION_EVIDENCE))
            elif isinstance(event, PeerDown):  # its evidence stays: protection is kept
                log.info("peer %s down", event.pod_ip)
                self.up_peers.discard(event.pod_ip)
                loaded = self.members.loaded if self.members else None
                if loaded is not None and event.pod_ip not in loaded.addresses:
                    # the API removed it: its evidence ends with its session (an IPAM may
                    # give the address to another project's pod at once)
                    self._on_changes(self.table.end_session(event.pod_ip, now))
                else:
                    self._on_changes(self.table.note_session(event.pod_ip, now, SESSION_EVIDENCE))
            elif isinstance(event, PeerUnreachable):
                self._on_unreachable(event.addresses, now)

    def _on_unreachable(self, addresses: Sequence[str], now: float) -> None:
        if self.strict:
            self.stats.inc(Counter.PEERS_UNREACHABLE)
            self.ratelog.warn(
                "unreachable",
                "no tencrypt proxy answers at %s: its packets are "
                "dropped (strict mode never sends them in the clear)",
                ", ".join(addresses),
            )
            return
        for address in addresses:
            self.stats.inc(Counter.PLAINTEXT_FALLBACK)
            log.warning(
                "no tencrypt proxy answers at %s within %.0f s: --no-strict, so its "
                "traffic goes in the CLEAR for %.0f s",
                address,
                self.tunnel.limits.handshake_give_up,
                PLAINTEXT_FOR,
            )
            self.dispatch.give_up(address, now + PLAINTEXT_FOR)

    def _on_changes(self, changes: list[Change]) -> None:
        """Every change of a class: wanted routes and firewall elements, applied by the
        effects task (never here: this runs inside DNS and packet callbacks)."""
        for conflict in self.table.pop_conflicts():
            self.stats.inc(Counter.CLASSIFICATION_CONFLICTS)
            self.ratelog.warn(
                "classification-conflict",  # a reason, never an address: logutil rule 1
                "%s is %s by trusted evidence, but an "
                "answer calls it %s: kept %s (a tenant's alias, a forged answer or "
                "a misconfiguration)",
                conflict.ip,
                conflict.held.value,
                conflict.claimed.value,
                conflict.held.value,
            )
        if changes:
            self.desired.on_changes(changes)
            self.effects.wake()

    def _poll_members(self, now: float) -> None:
        members = self.members.poll() if self.members else None
        if members is not None:
            self._apply_members(members, now)
        self.dispatch.locked = bool(self.members and self.members.broken)  # rule 3

    def _apply_members(self, members: Members, now: float) -> None:
        self.stats.inc(Counter.MEMBERSHIP_LOADS)
        table = members.service_table
        log.info(
            "membership of project %s, generation %d: %d pod IPs, %d Service IPs%s",
            members.project,
            members.generation,
            len(members.pods),
            len(members.services),
            ", Services resolved here (cluster mode)"
            if table is not None
            else " (format 1: Services through the node's DNAT)",
        )
        before = self.table.members
        self._on_changes(self.table.set_members(members.addresses, now))
        for ip in before - members.addresses - self.up_peers:  # gone from the API, no session
            self._on_changes(self.table.end_session(ip, now))
        services = None if table is None else ServiceTable.build(table, members.pods, members.zone)
        if services is not None and services.unusable:
            self.ratelog.warn(
                "unusable-endpoints",
                "%d Service endpoints are not pods of the project: never chosen",
                services.unusable,
            )
        self.dispatch.set_services(services, now)
        self._apply_ranges(members)
        self._apply_netpol(members, now)
        for _, packets in self.dispatch.listed():  # WAITs for Services now listed
            self._reroute(packets, now)

    def _apply_ranges(self, members: Members) -> None:
        """The cluster's Service CIDRs and pod network as the agent discovered them: they
        widen the guard and name the pod network for claims; one the setup did not route
        into tenc0 is reported loudly (its Services still reach tenc0 as members, by /32)."""
        c = self.config
        ranges = cluster_ranges(c, members)
        self.dispatch.guard = Guard.of(ranges.services, ranges.guarded)
        self.tunnel.set_identity(
            claim_policy(
                c,
                self._is_member,
                ranges.pods,
                ranges.services,
                vip_sessions=members.service_table is None,
                paired=members.paired,
            )
        )
        if ranges.mismatch != self.cidr_mismatch:
            self.cidr_mismatch = ranges.mismatch
            if ranges.mismatch:
                log.error("%s", ranges.mismatch)

    def _apply_netpol(self, members: Members, now: float) -> None:
        """Rule 5: the pod's NetworkPolicy (none in the file: none enforced); known flows it
        now denies are blocked (core/policyflows.py). The agent's report that the policies
        drop this pod's tunnel is logged loudly: nothing else would explain the silence."""
        netpol = self.dispatch.netpol
        if members.network_policy != netpol.document:
            text = netpol.document = members.network_policy
            policy = None if text is None else parse_netpol(text)  # checked by parse_members
            blocked = netpol.set_policy(policy, now)
            log.info(
                "NetworkPolicy: %s%s",
                "none (the membership carries no policy: nothing enforced)"
                if policy is None
                else f"ingress {_isolation(policy.inbound)}, egress {_isolation(policy.outbound)}",
                f"; {blocked} open flows it denies are blocked" if blocked else "",
            )
            if policy is not None and policy.malformed:
                log.error(
                    "NetworkPolicies the agent could not read (they isolate, allow nothing): %s",
                    ", ".join(policy.malformed),
                )
        if members.tunnel_blocked != netpol.tunnel_blocked:
            netpol.tunnel_blocked = members.tunnel_blocked
            for direction, name in members.tunnel_blocked:
                log.error(
                    "NetworkPolicy %s (%s) drops the tunnel (UDP %d) between this pod and its "
                    "project's pods: they cannot reach each other encrypted; admit the "
                    "tunnel port (scripts/k8s/networkpolicy-tunnel.yaml)",
                    name,
                    direction,
                    self.config.port,
                )

    def reload_keys(self, force: bool = True) -> None:
        """The key file changed (or SIGHUP): apply its ring; sessions keep their keys until
        their re-key (core.keyring). A refused file keeps the ring (linux.keyfile)."""
        keys = self.keyfile.poll(force) if self.keyfile else None
        if keys is None:
            return
        self.tunnel.set_ring(
            KeyRing.from_keys(keys, X25519PrivateKey.generate, reuse=self.tunnel.ring)
        )
        if self.loaded_dir is not None:
            write_loaded(self.loaded_dir, keys)
        log.info(
            "project keys reloaded from %s: %s",
            self.keyfile.path if self.keyfile else "-",
            describe(keys),
        )

    def deadlines_moved(self) -> None:
        """Rule 4b: a batch of the Python path may have created a deadline; cheap unless the
        timer task sleeps deep, then it wakes to look."""
        if self._timers_deep:
            self._timers_deep = False
            self._timers_batch = True
            self._wake_timers()

    def _wake_timers(self) -> None:
        if self._timers_wake is not None:
            self._timers_wake.set()

    def _on_file_event(self) -> None:
        """Rule 4d: something changed in a watched directory: poll the files now."""
        self._files_due = True
        self._wake_timers()

    def _deadline_lead(self) -> float:
        """Rule 4a: the shortest time between a deadline's creation and its due time."""
        limits = self.tunnel.limits
        return min(
            limits.rekey_timeout,
            limits.keepalive_timeout,
            limits.stale_timeout,
            self.dispatch.wait_for_members,
        )

    def _keyed_sessions(self) -> bool:
        """Rule 4c: is there a session the express lane could still seal or open with (one
        whose keys its expiry has not dropped; that expiry is itself a deadline here)?"""
        return any(s.recv_aead is not None for s in self.tunnel.table.by_index.values())

    def _start_watch(self) -> DirWatch | None:
        files = [f.path for f in (self.members, self.keyfile) if f is not None]
        if not files:
            return None
        watch = DirWatch(files, self._on_file_event)
        watch.start()
        return watch

    async def timers(self) -> None:
        """Rule 4: rounds of whatever is due, and sleeps until the next thing is."""
        self._timers_wake = wake = asyncio.Event()
        self.watch = self._start_watch()
        stop = asyncio.ensure_future(self.stopping.wait())
        lead = self._deadline_lead()
        limits = self.tunnel.limits
        lane_cap = min(limits.keepalive_timeout, limits.stale_timeout)  # rule 4c
        now = self.clock()
        renew_at, poll_at = now + RENEW_EVIDENCE, now
        try:
            while not self.stopping.is_set():
                nudged, self._timers_batch = self._timers_batch, False
                wake.clear()
                self._timers_deep = False
                now, wall = self.clock(), self.wall()
                self.tunnel.on_timer(now, wall)
                self._flush()
                self.flows.expire(now)
                self.dispatch.expire(now)
                for _, packets in self.dispatch.overdue(now):  # no Service came: refused
                    self._refuse(packets, now)
                if now >= renew_at:
                    renew_at = now + RENEW_EVIDENCE
                    for ip in self.up_peers:
                        self._on_changes(self.table.note_session(ip, now, SESSION_EVIDENCE))
                if self._files_due or now >= poll_at:
                    self._files_due = False
                    watched = self.watch is not None and self.watch.active
                    poll_at = now + (SAFETY_POLL if watched else SWEEP)
                    self._poll_members(now)
                    self.reload_keys(force=False)
                due = earliest(
                    self.tunnel.next_timer(),
                    self.flows.next_expiry(),
                    self.dispatch.next_expiry(),
                    renew_at,
                    poll_at,
                )
                cap = lane_cap if self._keyed_sessions() else None
                if nudged:  # rule 4b: a batch may come again; the next sleep is not deep
                    cap = lead if cap is None else min(cap, lead)
                delay, self._timers_deep = sleep_plan(now, due, lead, cap)
                self.timers_at = None if delay is None else now + delay
                if wake.is_set():
                    continue
                await until_woken(wake, stop, delay)
        finally:
            stop.cancel()
            self._timers_deep = False
            self._timers_wake = None
            if self.watch is not None:
                self.watch.close()

    def status(self) -> dict[str, object]:
        return observe.status(self)

    def render_metrics(self) -> str:
        return observe.render_metrics(self)


def _isolation(direction: Direction) -> str:
    if not direction.isolated:
        return "not isolated"
    return f"isolated by {', '.join(direction.policies)} ({len(direction.rules)} rules)"
