"""The agent's loop: the composition root of ``tencrypt agent``.

Six reflectors (``kube.reflector.Reflector``, the list+watch machinery node-sync uses too)
queue every Pod of the cluster, every Namespace, every Service, every EndpointSlice, every
NetworkPolicy and the Secrets named ``tencrypt`` (``fieldSelector=metadata.name=tencrypt``:
the RBAC grants list/watch on that name only); a discovery thread queues the cluster's ranges
every DISCOVER_EVERY seconds (agent/cidrs.py, agent/discovery.py); one thread, this loop, owns
everything else. Pods are watched cluster-wide because a project's members run on every
node: this node's pods decide which proxies run, all of them (with the Services and their
endpoints) make each project's membership. Stages of a pass (``tick``), run every ``TICK``
seconds and after every burst of events, once all six kinds have been listed and the
ranges discovered once (a partial view would stop proxies or hand them half a membership):

 1. fold the events into ``NodeView``, ``MemberView`` and ``PolicyView``; take the wanted
    pods;
 2. keys: the key ring of each project that has wanted pods here, from its Secret as last
    watched (PROJECT_PSK and, during a rotation, PROJECT_PSK_NEXT / _PREVIOUS); a new ring is
    written to its key file before anything uses it, and running proxies re-read that file
    within a second: a rotation never restarts a proxy (issue 14). A missing or bad Secret is
    logged once per change, without the key, and a running proxy keeps its last good ring;
 3. sandboxes: ``Resolver.resolve`` (cached; costly look-ups at most once a second);
 4. observe: a proxy process gone → ``on_exited`` (its log's last lines are logged); its
    "tencrypt: ready" line → ``on_ready``;
 5. reconcile: ``Reconciler.plan`` → START, KILL, STOP, executed at once (a STOP for a new key
    or sandbox is followed by its START in the same pass); a START writes the pod's
    membership file (in the agent's directory for the pod's UID) before the proxy starts;
 6. membership: every running proxy whose project's members (pods, Services, endpoints),
    NetworkPolicies (with the pods' labels and ports, the namespace's labels) or the
    cluster's ranges changed gets its file rewritten (``members.json``, format 2, with the
    pod's own policy document, ``feed.MembersFeed``); the others are not touched. A pod whose
    project's policies would drop its tunnel (UDP 1337) is reported: a log line, a Warning
    Event on the pod, and the file's ``tunnelBlocked`` (the proxy's metrics and status);
 7. key files of projects without a proxy on this node any more are removed;
 8. report: the rings the proxies recorded as loaded, per project, in the ConfigMap
    ``tencrypt-keys-<node>`` (``report.KeyReporter``; what `tencrypt key rotate` waits on).

Start-up adopts what a previous agent recorded (``Supervisor.prepare``), before the first
plan. Shutdown follows ``on_exit``: ``keep`` leaves the proxies running for the next agent to
adopt; ``unpatch`` stops all of them at once, then undoes their pods in parallel.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from kubernetes import client

from tencrypt.agent.cidrs import ClusterRanges
from tencrypt.agent.discovery import RangeSources
from tencrypt.agent.events import PodEvents
from tencrypt.agent.feed import PodPolicy
from tencrypt.agent.health import Health, readiness
from tencrypt.agent.health import render as render_health
from tencrypt.agent.members import MemberView, ProjectMembers
from tencrypt.agent.netpolview import PolicyView
from tencrypt.agent.podstate import (
    SECRET_NAME,
    AgentKind,
    BadKey,
    NodeView,
    PodInfo,
    key_id,
)
from tencrypt.agent.reconcile import Action, Phase, Policy, Reconciler, Sandbox, Verb, Want
from tencrypt.agent.report import KeyReporter
from tencrypt.agent.resolver import Resolver
from tencrypt.agent.scrape import scrape
from tencrypt.agent.supervisor import Supervisor
from tencrypt.core.stats import Counter, Stats
from tencrypt.kube.client import optional
from tencrypt.kube.reflector import Changed, Listed, Reflector
from tencrypt.linux.keyfile import describe

log = logging.getLogger("tencrypt.agent")
TICK = 0.5  # seconds between passes without events: how soon a dead proxy is noticed
UNDO_PARALLEL = 4  # undos at once on shutdown: each is a short-lived interpreter
DISCOVER_EVERY = 60.0  # seconds between discoveries of the cluster's ranges (agent/cidrs.py)


@dataclass(slots=True)
class KeyState:
    key_id: str | None = None
    problem: str | None = None


class Agent:
    def __init__(
        self,
        node: str,
        supervisor: Supervisor,
        resolver: Resolver,
        policy: Policy | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
        reporter: KeyReporter | None = None,
        events: PodEvents | None = None,
    ) -> None:
        self.stats = stats or Stats()
        self.view = NodeView(node, self.stats)
        self.members = MemberView(self.stats)
        self.policies = PolicyView(self.stats)
        self.events = events
        self.blocked: dict[str, tuple[tuple[str, str], ...]] = {}  # pod UID -> reported
        self.computed: dict[str, ProjectMembers] = {}  # project -> its members at a version
        self.reconciler = Reconciler(policy or Policy(), self.stats)
        self.supervisor, self.resolver, self.clock = supervisor, resolver, clock
        self.queue: queue.Queue[object] = queue.Queue()
        self.listed: set[AgentKind] = set()
        self.keys: dict[str, KeyState] = {}
        self.reporter = reporter
        self.ranges_known = False  # the first discovery of the cluster ranges came in
        self.slices_unserved = False  # the API has no EndpointSlices: format 1 files
        self.health = Health(clock=clock)

    # -- life cycle -------------------------------------------------------------------------

    def run(self, stop: threading.Event, unpatch_on_exit: bool = False) -> None:
        self.adopt()
        while not stop.is_set():
            self.health.beat()
            try:
                self.fold(self.queue.get(timeout=TICK))
                while True:
                    self.fold(self.queue.get_nowait())
            except queue.Empty:
                pass
            if self.listed == set(AgentKind) and self.ranges_known:
                try:
                    self.tick(self.clock())
                    self.health.passed()
                # the loop must outlive any one failure (a full disk, a vanished binary): it is
                # logged and the next pass starts again from what it observes
                except Exception:  # noqa: BLE001
                    log.exception("agent pass failed; retrying")
                    stop.wait(1.0)
        self.shutdown(unpatch_on_exit)

    def ready(self) -> tuple[bool, str]:
        """/readyz (health.py rule 2)."""
        return readiness(self.listed == set(AgentKind), self.ranges_known, self.health.passes)

    def render_metrics(self) -> str:
        """/metrics: the agent's node-level figures (health.py; read from another thread)."""
        entries = list(self.reconciler.entries.values())
        own = render_health(
            (e.phase.value for e in entries),
            self.stats,
            self.ready()[0],
            self.health,
            len(self.keys),
        )
        ready = [
            (e.namespace, e.name, self.supervisor.setup_dir(e.sandbox.netns))
            for e in entries
            if e.phase is Phase.READY
        ]
        return scrape(ready, own)  # with every ready proxy's figures, by namespace and pod

    def adopt(self) -> None:
        now = self.clock()
        for rec in self.supervisor.prepare():
            phase = (
                Phase.DEAD
                if not self.supervisor.alive(rec.uid)
                else Phase.READY
                if self.supervisor.ready(rec.uid)
                else Phase.STARTING
            )
            self.reconciler.on_adopted(rec.want(), phase, now)
            self.resolver.seed(rec.uid, rec.sandbox)
            log.info(
                "%s/%s: adopted the proxy a previous agent started (pid %d, %s)",
                rec.namespace,
                rec.name,
                rec.proxy_pid,
                phase.value,
            )

    def fold(self, item: object) -> None:
        if isinstance(item, Listed) and isinstance(item.kind, AgentKind):
            if item.kind is AgentKind.SERVICE:
                self.members.replace_services(item.items)
            elif item.kind is AgentKind.ENDPOINT_SLICE:
                self.members.replace_slices(item.items)
            elif item.kind is AgentKind.NETWORK_POLICY:
                self.policies.replace_policies(item.items)
            else:
                self.view.replace(item.kind, item.items)
            if item.kind is AgentKind.POD:
                self.members.replace_pods(item.items)
                self.policies.replace_pods(item.items)
            elif item.kind is AgentKind.NAMESPACE:
                self.policies.replace_namespaces(item.items)
            self.listed.add(item.kind)
        elif isinstance(item, Changed) and isinstance(item.kind, AgentKind):
            if item.kind is AgentKind.SERVICE:
                self.members.on_service(item.event, item.obj)
            elif item.kind is AgentKind.ENDPOINT_SLICE:
                self.members.on_slice(item.event, item.obj)
            elif item.kind is AgentKind.NETWORK_POLICY:
                self.policies.on_policy(item.event, item.obj)
            else:
                self.view.on_event(item.kind, item.event, item.obj)
            if item.kind is AgentKind.POD:
                self.members.on_pod(item.event, item.obj)
                self.policies.on_pod(item.event, item.obj)
            elif item.kind is AgentKind.NAMESPACE:
                self.policies.on_namespace(item.event, item.obj)
        elif isinstance(item, Discovered):
            if item.ranges != self.supervisor.feed.ranges or self.ranges_known is False:
                log.info("cluster ranges: %s", item.ranges.describe())
                if item.ranges.skipped:
                    log.warning(
                        "%d malformed CIDRs in the cluster's objects skipped", item.ranges.skipped
                    )
            self.supervisor.feed.ranges = item.ranges
            self.ranges_known = True
        elif isinstance(item, Unserved) and not self.slices_unserved:
            self.slices_unserved = True
            log.error(
                "the API serves no EndpointSlices (discovery.k8s.io/v1): membership files "
                "carry no Services, so proxies reach Services through the node's DNAT "
                "(format 1: no per-connection load balancing, no targetPort)"
            )

    def shutdown(self, unpatch: bool) -> None:
        entries = list(self.reconciler.entries.values())
        if not unpatch:
            log.info(
                "stopping; %d proxies left running for the next agent (--on-exit keep)",
                len(entries),
            )
            return
        log.info("stopping; unpatching %d pods (--on-exit unpatch)", len(entries))
        for e in entries:  # all at once: each proxy then takes its own grace period in parallel
            self.supervisor.signal(e.uid, signal.SIGTERM)
        for e in entries:
            self.supervisor.terminate(e.uid)
        with ThreadPoolExecutor(UNDO_PARALLEL) as pool:
            list(
                pool.map(
                    lambda e: self.supervisor.undo(
                        e.uid, e.sandbox, self.resolver.valid(e.sandbox)
                    ),
                    entries,
                )
            )
        for e in entries:
            self.supervisor.forget(e.uid)
            self.reconciler.on_stopped(e.uid)
        for project in self.supervisor.key_projects():
            self.supervisor.remove_key(project)

    # -- one pass ---------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        wanted = self.view.wanted()
        self.refresh_keys({p.namespace for p in wanted})
        sandboxes = self.resolver.resolve(wanted)
        self.reconciler.on_desired(self._want(p, sandboxes.get(p.uid)) for p in wanted)
        self.observe(now)
        for _ in range(3):  # STOP for a new key/sandbox, then its START; never a busy loop
            actions = self.reconciler.plan(now)
            if not actions:
                break
            for action in actions:
                self.execute(action, now)
        self.push_members()
        self.drop_unused_keys(wanted)
        if self.reporter is not None:
            self.reporter.publish(
                (e.namespace, e.sandbox.netns) for e in self.reconciler.entries.values()
            )

    def _want(self, pod: PodInfo, sandbox: Sandbox | None) -> Want:
        state = self.keys.get(pod.namespace)
        return Want(pod.uid, pod.namespace, pod.name, sandbox, state.key_id if state else None)

    def refresh_keys(self, projects: Iterable[str]) -> None:
        for project in sorted(projects):
            state = self.keys.setdefault(project, KeyState())
            key = self.view.key(project)
            if isinstance(key, BadKey):
                if key.reason != state.problem:
                    log.error(
                        "project %s: %s; %s",
                        project,
                        key.reason,
                        "keeping its last key" if state.key_id else "its pods wait",
                    )
                    self.stats.inc(Counter.AGENT_KEY_PROBLEMS)
                state.problem = key.reason
                continue
            kid = key_id(key)
            if kid != state.key_id or not self.supervisor.key_file(project).exists():
                self.supervisor.write_key(project, key)
                log.info(
                    "project %s: keys %s (%s)",
                    project,
                    "loaded"
                    if state.key_id is None or kid == state.key_id
                    else "changed: its proxies re-read them, no restart",
                    describe(key),
                )
            state.key_id, state.problem = kid, None

    def observe(self, now: float) -> None:
        for uid, entry in list(self.reconciler.entries.items()):
            if entry.phase is Phase.DEAD:
                continue
            if not self.supervisor.alive(uid):
                log.warning(
                    "%s/%s: the proxy exited; last lines of its log:\n%s",
                    entry.namespace,
                    entry.name,
                    self.supervisor.tail(uid),
                )
                self.reconciler.on_exited(uid, now)
            elif entry.phase is Phase.STARTING and self.supervisor.ready(uid):
                self.reconciler.on_ready(uid, now)
                log.info("%s/%s: proxy ready", entry.namespace, entry.name)
                self.supervisor.settle(uid)  # --proxy-cgroup sandbox: out of our cgroup
            elif entry.phase is Phase.READY:
                self.supervisor.settle(uid)  # an adopted one (once: a no-op afterwards)

    def execute(self, action: Action, now: float) -> None:
        want, uid = action.want, action.want.uid
        if action.verb is Verb.START:
            log.info(
                "%s: starting the proxy in sandbox pid %d (%s)",
                want.ref,
                want.sandbox.pid if want.sandbox else 0,
                action.reason,
            )
            self.reconciler.on_started(want, now)
            members = self.members_of(want.namespace)
            policy = self.policy_of(want.namespace, want.name, uid)
            if self.supervisor.launch(want, action.undo_first, members, policy) is None:
                self.reconciler.on_exited(uid, now)
        elif action.verb is Verb.KILL:
            log.warning("%s: killing the proxy: %s", want.ref, action.reason)
            self.supervisor.terminate(uid)
            self.reconciler.on_exited(uid, now)
        else:
            log.info("%s: stopping the proxy and undoing the pod: %s", want.ref, action.reason)
            self.supervisor.terminate(uid)
            assert want.sandbox is not None
            self.supervisor.undo(uid, want.sandbox, self.resolver.valid(want.sandbox))
            self.supervisor.forget(uid)
            self.reconciler.on_stopped(uid)

    def push_members(self) -> None:
        """Rewrite the membership file of every live proxy whose project's members changed
        since its file was written (a file that cannot be written now is retried next pass;
        the proxy keeps the members it has)."""
        for entry in self.reconciler.entries.values():
            if entry.phase is Phase.DEAD:  # its next START writes the file first
                continue
            version = self.version(entry.namespace)
            if self.supervisor.feed.is_current(entry.uid, (entry.namespace, version)):
                continue
            if not self.supervisor.write_members(
                f"{entry.namespace}/{entry.name}",
                entry.uid,
                self.members_of(entry.namespace),
                self.policy_of(entry.namespace, entry.name, entry.uid),
            ):
                self.stats.inc(Counter.AGENT_MEMBERS_WRITE_FAILED)

    def version(self, project: str) -> int:
        """Grows with every change of what a pod's file says of its project (both views)."""
        return self.members.version(project) + self.policies.version(project)

    def members_of(self, project: str) -> ProjectMembers:
        """``MemberView.of``, computed once per version of the project."""
        known = self.computed.get(project)
        if known is None or known.version != self.members.version(project):
            known = self.computed[project] = self.members.of(project)
        return replace(
            known,
            version=self.version(project),
            table=None if self.slices_unserved else known.table,
        )

    def policy_of(self, project: str, name: str, uid: str) -> PodPolicy:
        """The pod's NetworkPolicy document and the policies that would drop its tunnel,
        reported (log, Event) when that finding changes."""
        world = self.policies.world(project)
        doc = world.document_for(name)
        blocked = tuple(sorted({(b.direction, b.policy) for b in world.blocked_for(name, doc=doc)}))
        if blocked and blocked != self.blocked.get(uid):
            text = ", ".join(f"{p} ({d})" for d, p in blocked)
            message = (
                f"NetworkPolicies {text} drop the tencrypt tunnel (UDP 1337) between this pod "
                "and its project's pods: encrypted traffic cannot pass. Admit the tunnel port "
                "(scripts/k8s/networkpolicy-tunnel.yaml)"
            )
            log.warning("%s/%s: %s", project, name, message)
            if self.events is not None:
                self.events.warn(project, name, uid, "TencryptTunnelBlocked", message)
        elif not blocked and self.blocked.get(uid):
            log.info("%s/%s: its NetworkPolicies admit the tunnel again", project, name)
        self.blocked[uid] = blocked
        return PodPolicy(json.dumps(doc, sort_keys=True, separators=(",", ":")), blocked)

    def drop_unused_keys(self, wanted: list[PodInfo]) -> None:
        used = {p.namespace for p in wanted} | {
            e.namespace for e in self.reconciler.entries.values()
        }
        for project in self.supervisor.key_projects() - used:
            self.supervisor.remove_key(project)
        for project in set(self.keys) - used:
            del self.keys[project]
        for project in set(self.computed) - used:
            del self.computed[project]
        self.policies.forget(used)
        live = {e.uid for e in self.reconciler.entries.values()}
        for uid in set(self.blocked) - live:
            del self.blocked[uid]


def start_reflectors(
    api: Any, out: queue.Queue[object], stop: threading.Event, watch_timeout: int
) -> None:
    """List+watch every Pod, Namespace, Service, EndpointSlice and NetworkPolicy and the
    Secrets named ``tencrypt`` into ``out``. A cluster whose API serves no EndpointSlices
    lists none (and ``Unserved`` says so once) instead of holding the agent back; one that
    serves no NetworkPolicies lists none (nothing to enforce)."""
    core = client.CoreV1Api(api)
    secrets = functools.partial(
        core.list_secret_for_all_namespaces, field_selector=f"metadata.name={SECRET_NAME}"
    )
    slices = optional(
        client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
        stop,
        lambda: out.put(Unserved(AgentKind.ENDPOINT_SLICE)),
    )
    policies = optional(
        client.NetworkingV1Api(api).list_network_policy_for_all_namespaces,
        stop,
        lambda: log.warning("the API serves no NetworkPolicies (networking.k8s.io/v1)"),
    )
    for kind, list_fn in (
        (AgentKind.POD, core.list_pod_for_all_namespaces),
        (AgentKind.NETWORK_POLICY, policies),
        (AgentKind.NAMESPACE, core.list_namespace),
        (AgentKind.SERVICE, core.list_service_for_all_namespaces),
        (AgentKind.ENDPOINT_SLICE, slices),
        (AgentKind.SECRET, secrets),
    ):
        Reflector(kind, list_fn, out, stop, watch_timeout).start()


@dataclass(slots=True, frozen=True)
class Discovered:
    """A discovery of the cluster's ranges (agent/cidrs.py), queued by ``start_discovery``."""

    ranges: ClusterRanges


@dataclass(slots=True, frozen=True)
class Unserved:
    """The API does not serve this kind (404)."""

    kind: AgentKind


def start_discovery(
    api: Any,
    out: queue.Queue[object],
    stop: threading.Event,
    node: str,
    flags: tuple[Sequence[str], Sequence[str]] = ((), ()),
    every: float = DISCOVER_EVERY,
) -> threading.Thread:
    """Discover the cluster's ranges now and every ``every`` seconds (agent/cidrs.py rule 1),
    each result queued as ``Discovered``; sources the API does not serve or the agent may not
    read are skipped (said once at INFO)."""
    sources = RangeSources(api)

    def loop() -> None:
        while not stop.is_set():
            out.put(Discovered(sources.discover(node, *flags)))
            stop.wait(every)

    thread = threading.Thread(target=loop, name="discovery", daemon=True)
    thread.start()
    return thread
