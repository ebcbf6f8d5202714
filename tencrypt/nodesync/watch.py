"""List and watch the Kubernetes API with the official client; keep the node's rules in step.

Stages:

1. ``detect_endpoint_kind``: EndpointSlices (discovery.k8s.io/v1) if the cluster serves
   them, legacy Endpoints otherwise (a 404 on the slice list); asked again with a backoff
   until the API server answers (``await_endpoint_kind``).
2. One ``Reflector`` thread per kind (Namespaces, Services, EndpointSlices/Endpoints), as
   client-go does: list (paged) → ``Listed``, then watch from the list's resourceVersion →
   ``Changed`` per event. A watch that ends (server timeout) resumes from the last version it
   saw; ``410 Gone`` or any error relists, after a capped exponential backoff for errors.
   The reflector knows nothing of node-sync: any list function of the client
   (``functools.partial`` adds selectors) and any enum member as the kind's label will do,
   which is how ``tencrypt agent`` watches Pods and Namespaces with the same machinery.
3. ``Syncer.run`` folds what the reflectors queue into ``ClusterState`` and applies the
   desired rules whenever they change, but never before every kind has been listed once: a
   partial view (Services listed, slices not yet) would empty the chain and cut every
   tunnel on the node for a moment. It also re-applies every ``resync`` seconds from memory
   (no API calls) so that a chain flushed by hand is put back.

The raw JSON of each object is used, not the client's model classes: the watch helper
(``kubernetes.watch.Watch``) builds models that refuse a ``null`` list the API server
legitimately sends, and its ``deserialize=False`` mode fails on ``ERROR`` events. Reading
the stream ourselves keeps the official client for config, auth, TLS and requests.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError
from tencrypt.nodesync.cluster import ClusterState, EventType, Kind, ServiceBackends

log = logging.getLogger(__name__)

PAGE_SIZE = 500
WATCH_TIMEOUT = 300  # seconds the server keeps one watch open before we re-watch
CONNECT_TIMEOUT = 10
MAX_BACKOFF = 30.0
GONE = 410


class Applier(Protocol):
    def apply(self, backends: Sequence[ServiceBackends]) -> object: ...


@dataclass(slots=True)
class Listed:
    kind: enum.Enum  # a nodesync Kind, or the caller's own label for what it lists
    items: list[Any]


@dataclass(slots=True)
class Changed:
    kind: enum.Enum
    event: EventType
    obj: Any


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


def new_api_client(kubeconfig: str | None) -> client.ApiClient:
    """In-cluster service-account config when running in a pod, else a kubeconfig
    (``kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``)."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


def list_function(api: client.ApiClient, kind: Kind) -> Callable[..., Any]:
    core = client.CoreV1Api(api)
    return {Kind.NAMESPACE: core.list_namespace,
            Kind.SERVICE: core.list_service_for_all_namespaces,
            Kind.ENDPOINTS: core.list_endpoints_for_all_namespaces,
            Kind.ENDPOINT_SLICE:
                client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces}[kind]


def detect_endpoint_kind(api: client.ApiClient) -> Kind:
    try:
        resp = list_function(api, Kind.ENDPOINT_SLICE)(
            limit=1, _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, 60))
        resp.data  # noqa: B018 - read to the end, or the pooled connection stays dirty
        resp.release_conn()
        return Kind.ENDPOINT_SLICE
    except ApiException as exc:
        if exc.status == 404:
            log.info("no EndpointSlice API on this cluster: using Endpoints")
            return Kind.ENDPOINTS
        raise


def list_all(list_fn: Callable[..., Any]) -> tuple[list[Any], str]:
    """Every object of a kind (following ``continue`` pages) and the list's resourceVersion."""
    items: list[Any] = []
    token = None
    while True:
        resp = list_fn(limit=PAGE_SIZE, _continue=token, _preload_content=False,
                       _request_timeout=(CONNECT_TIMEOUT, 120))
        doc = json.loads(resp.data)
        items.extend(doc.get("items") or [])
        meta = doc.get("metadata") or {}
        token = meta.get("continue")
        if not token:
            return items, str(meta.get("resourceVersion", ""))


class Reflector(threading.Thread):
    def __init__(self, kind: enum.Enum, list_fn: Callable[..., Any], out: queue.Queue[object],
                 stop: threading.Event, watch_timeout: int = WATCH_TIMEOUT) -> None:
        super().__init__(name=f"reflector-{kind.value}", daemon=True)
        self.kind, self.list_fn, self.out, self.stop = kind, list_fn, out, stop
        self.watch_timeout = watch_timeout

    def run(self) -> None:
        delay = 1.0
        while not self.stop.is_set():
            try:
                items, version = list_all(self.list_fn)
                self.out.put(Listed(self.kind, items))
                delay = 1.0
                self._watch(version)
            except _Gone:
                log.info("%s: watch expired (410): relisting", self.kind.value)
            # A reflector must outlive any API trouble (HTTP errors, resets, bad JSON): it is
            # logged, then the kind is listed afresh, so nothing that happened meanwhile is lost.
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: %s; relisting in %.0fs", self.kind.value, brief(exc), delay)
                self.stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    def _watch(self, version: str) -> None:
        while not self.stop.is_set():
            resp = self.list_fn(watch=True, resource_version=version, allow_watch_bookmarks=True,
                                timeout_seconds=self.watch_timeout, _preload_content=False,
                                _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + 30))
            try:
                for line in iter_resp_lines(resp):
                    if self.stop.is_set():
                        return
                    if line:
                        version = self._on_line(line, version)
            finally:  # a stream left mid-way must not go back to the pool
                resp.close()
                resp.release_conn()

    def _on_line(self, line: str, version: str) -> str:
        event = json.loads(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == GONE:
                raise _Gone
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if kind != "BOOKMARK":
            self.out.put(Changed(self.kind, EventType(kind), obj))
        return version


class Syncer:
    """Owns the state and the applier; the only thread that touches either."""

    def __init__(self, applier: Applier, stats: Stats, kinds: Sequence[Kind],
                 resync: float = 300.0) -> None:
        self.applier, self.stats, self.kinds = applier, stats, tuple(kinds)
        self.state = ClusterState(stats)
        self.queue: queue.Queue[object] = queue.Queue()
        self.resync = resync
        self.listed: set[Kind] = set()
        self.applied: list[ServiceBackends] | None = None

    def fold(self, item: object) -> None:
        if isinstance(item, Listed) and isinstance(item.kind, Kind):
            self.state.replace(item.kind, item.items)
            self.listed.add(item.kind)
        elif isinstance(item, Changed) and isinstance(item.kind, Kind):
            self.state.on_event(item.kind, item.event, item.obj)

    def sync(self, force: bool = False) -> bool:
        """Apply the desired rules if they changed (or ``force``); False if not synced yet."""
        if self.listed != set(self.kinds):
            return False
        desired = self.state.desired()
        if force or desired != self.applied:
            self.applied = None  # a failed apply is retried on the next pass
            self.applier.apply(desired)
            self.applied = desired
            log.info("programmed %d VIPs, %d endpoints", len(desired),
                     sum(len(b.endpoints) for b in desired))
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


def brief(exc: Exception) -> str:
    """One line for a log: the client's ApiException prints headers and body on many lines,
    urllib3 wraps a refused connection in three layers of text. A 401/403 says what to check."""
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message") or ""
        except (ValueError, AttributeError):
            message = ""
        hint = {401: " (check the token / kubeconfig)",
                403: " (check the ClusterRoles of scripts/k8s/rbac.yaml are applied and bound "
                     "to this ServiceAccount)"}.get(exc.status or 0, "")
        return f"HTTP {exc.status} {exc.reason}{': ' + message if message else ''}{hint}"
    return f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"


def await_endpoint_kind(api: client.ApiClient, stop: threading.Event) -> Kind | None:
    """``detect_endpoint_kind`` once the API server answers (a node boots before it, or it
    restarts): retried with a capped backoff, logged each time; None if stopped first."""
    delay = 1.0
    while not stop.is_set():
        try:
            return detect_endpoint_kind(api)
        except Exception as exc:  # noqa: BLE001 - any API trouble: wait and ask again
            log.warning("API server %s not usable yet (%s); retrying in %.0fs",
                        api.configuration.host, brief(exc), delay)
            stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)
    return None


def watch_and_sync(api: client.ApiClient, applier: Applier, stats: Stats, stop: threading.Event,
                   resync: float = 300.0, watch_timeout: int = WATCH_TIMEOUT) -> None:
    endpoint_kind = await_endpoint_kind(api, stop)
    if endpoint_kind is None:
        return
    kinds = (Kind.NAMESPACE, Kind.SERVICE, endpoint_kind)
    syncer = Syncer(applier, stats, kinds, resync)
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
