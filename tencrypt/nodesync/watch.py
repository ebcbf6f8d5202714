"""List and watch the Kubernetes API with the official client; keep the node's rules in step.

Stages:

1. ``detect_endpoint_kind``: EndpointSlices (discovery.k8s.io/v1) if the cluster serves
   them, legacy Endpoints otherwise (a 404 on the slice list); asked again with a backoff
   until the API server answers (``await_endpoint_kind``).
2. One ``tencrypt.kube.reflector.Reflector`` thread per kind (Namespaces, Services,
   EndpointSlices/Endpoints): list → ``Listed``, then watch → ``Changed`` per event (the
   plumbing ``tencrypt agent`` uses too).
3. ``Syncer.run`` folds what the reflectors queue into ``ClusterState`` and applies the
   desired rules whenever they change, but never before every kind has been listed once: a
   partial view (Services listed, slices not yet) would empty the chain and cut every
   tunnel on the node for a moment. The first sync is full; after it, each burst of events
   is one partial sync: only the Services the events touched are recomputed (a per-Service
   cache in ``ClusterState``) and the backend programs only what changed. Every
   ``resync`` seconds a full sync from memory (no API calls: every Service recomputed from
   the objects, the whole rule set applied) repairs drift (a table or chain flushed by
   hand); a failed sync makes the next one full. Each sync is timed and logged
   with its duration (never killed for taking long) and counted in ``SyncMetrics``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.rest import ApiException

from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError
from tencrypt.kube.client import CONNECT_TIMEOUT, brief, list_all
from tencrypt.kube.reflector import WATCH_TIMEOUT, Changed, Listed, Reflector
from tencrypt.nodesync.cluster import ClusterState, Kind, ServiceBackends
from tencrypt.nodesync.metrics import SyncMetrics

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


class Applier(Protocol):
    def apply(
        self,
        backends: Sequence[ServiceBackends],
        full: bool = False,
        touched: Collection[str] | None = None,
    ) -> object: ...

    @property
    def size(self) -> int: ...


def list_function(api: client.ApiClient, kind: Kind) -> Callable[..., Any]:
    core = client.CoreV1Api(api)
    functions: dict[Kind, Callable[..., Any]] = {
        Kind.NAMESPACE: core.list_namespace,
        Kind.SERVICE: core.list_service_for_all_namespaces,
        Kind.ENDPOINTS: core.list_endpoints_for_all_namespaces,
        Kind.ENDPOINT_SLICE: client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
    }
    return functions[kind]


def detect_endpoint_kind(api: client.ApiClient) -> Kind:
    try:
        resp = list_function(api, Kind.ENDPOINT_SLICE)(
            limit=1, _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, 60)
        )
        resp.data  # noqa: B018 - read to the end, or the pooled connection stays dirty
        resp.release_conn()
        return Kind.ENDPOINT_SLICE
    except ApiException as exc:
        if exc.status == 404:
            log.info("no EndpointSlice API on this cluster: using Endpoints")
            return Kind.ENDPOINTS
        raise


class Syncer:
    """Owns the state and the applier; the only thread that touches either."""

    def __init__(
        self,
        applier: Applier,
        stats: Stats,
        kinds: Sequence[Kind],
        resync: float = 300.0,
        metrics: SyncMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.applier, self.stats, self.kinds = applier, stats, tuple(kinds)
        self.metrics = metrics or SyncMetrics(getattr(applier, "name", "?"))
        self.clock, self.wall = clock, wall
        self.state = ClusterState(stats)
        self.queue: queue.Queue[object] = queue.Queue()
        self.resync = resync
        self.listed: set[Kind] = set()
        self.synced = False  # a sync succeeded and nothing failed since: partial syncs

    def fold(self, item: object) -> None:
        if isinstance(item, Listed) and isinstance(item.kind, Kind):
            self.state.replace(item.kind, item.items)
            self.listed.add(item.kind)
        elif isinstance(item, Changed) and isinstance(item.kind, Kind):
            self.state.on_event(item.kind, item.event, item.obj)

    def sync(self, force: bool = False) -> bool:
        """Apply the desired rules if they changed (or ``force``); False if not synced yet.

        Full (the first sync, ``force``, after a failure): every Service recomputed from the
        objects, the whole rule set applied. Partial: only the Services the events since
        the last sync touched are recomputed (``ClusterState.refresh``), and the backend is
        told which VIPs they hold (``touched``), so one event costs what it changes, not
        what the cluster holds."""
        if self.listed != set(self.kinds):
            return False
        full = force or not self.synced
        touched: set[str] | None = None
        if not full:
            changes = self.state.refresh()
            if not changes:
                return True
            touched = {b.vip for pair in changes.values() for side in pair for b in side}
        desired = self.state.desired(full=full)
        mode = "full" if full else "partial"
        self.synced = False  # a failed apply is retried on the next pass, in full
        start = self.clock()
        try:
            self.applier.apply(desired, full=full, touched=touched)
        except Exception:
            self.metrics.failed()
            raise
        took = self.clock() - start
        self.synced = True
        self.metrics.observe(mode, took, self.applier.size, self.wall())
        log.info(
            "programmed %d VIPs, %d endpoints (%s sync, %.3f s)",
            len(desired),
            sum(len(b.endpoints) for b in desired),
            mode,
            took,
        )
        return True

    def run(self, stop: threading.Event) -> None:
        next_resync = time.monotonic() + self.resync
        while not stop.is_set():
            timeout = max(0.0, min(next_resync - time.monotonic(), 1.0))
            try:
                self.fold(self.queue.get(timeout=timeout))
                while True:  # one apply per burst of events
                    self.fold(self.queue.get_nowait())
            except queue.Empty:
                pass
            force = time.monotonic() >= next_resync
            try:
                if self.sync(force) and force:
                    next_resync = time.monotonic() + self.resync
            except Exception as exc:  # noqa: BLE001 - SetupError and the like: retry later
                log.error("applying rules failed (retrying in 1s): %s", exc)
                stop.wait(1.0)


def await_endpoint_kind(api: client.ApiClient, stop: threading.Event) -> Kind | None:
    """``detect_endpoint_kind`` once the API server answers (a node boots before it, or it
    restarts): retried with a capped backoff, logged each time; None if stopped first."""
    delay = 1.0
    while not stop.is_set():
        try:
            return detect_endpoint_kind(api)
        except Exception as exc:  # noqa: BLE001 - any API trouble: wait and ask again
            log.warning(
                "API server %s not usable yet (%s); retrying in %.0fs",
                api.configuration.host,
                brief(exc),
                delay,
            )
            stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)
    return None


def watch_and_sync(
    api: client.ApiClient,
    applier: Applier,
    stats: Stats,
    stop: threading.Event,
    resync: float = 300.0,
    watch_timeout: int = WATCH_TIMEOUT,
    metrics: SyncMetrics | None = None,
) -> None:
    endpoint_kind = await_endpoint_kind(api, stop)
    if endpoint_kind is None:
        return
    kinds = (Kind.NAMESPACE, Kind.SERVICE, endpoint_kind)
    syncer = Syncer(applier, stats, kinds, resync, metrics)
    for kind in kinds:
        Reflector(kind, list_function(api, kind), syncer.queue, stop, watch_timeout).start()
    syncer.run(stop)


def list_once(api: client.ApiClient, stats: Stats) -> ClusterState:
    """One consistent-enough snapshot for ``--once``: list each kind once. An API server
    that cannot be reached or refuses is a ``SetupError`` naming it (``--once`` is for a
    human or a script: fail at once, clearly)."""
    state = ClusterState(stats)
    try:
        for kind in (Kind.NAMESPACE, Kind.SERVICE, detect_endpoint_kind(api)):
            items, _ = list_all(list_function(api, kind))
            state.replace(kind, items)
    except Exception as exc:  # noqa: BLE001 - API, connection and TLS errors: no common type
        raise SetupError(f"API server {api.configuration.host}: {brief(exc)}") from exc
    return state
