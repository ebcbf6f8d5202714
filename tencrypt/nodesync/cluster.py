"""What the cluster holds, folded from Kubernetes objects, and what the node should forward.

Rules:
- Input is Kubernetes JSON as the API server and ``kubectl -o json`` write it (camelCase
  keys). Nothing here does I/O: objects in, ``ServiceBackends`` out.
- A namespace takes part only while it carries the label ``tencrypt.io/enabled=true``;
  removing the label (or the namespace) removes its Services from the desired set.
- A Service is forwarded for each of its IPv4 ClusterIPs; headless (``None``), ExternalName
  and IPv6 addresses are skipped, silently, as kube-proxy does.
- Endpoints come from the EndpointSlices that name the Service (label
  ``kubernetes.io/service-name``, ``addressType: IPv4``); a Service with no slice at all falls
  back to its legacy Endpoints object. Ready endpoints are used; when none is ready, the
  serving-but-terminating ones (kube-proxy's rule since 1.28), so a rollout never blackholes.
- An address listed by two slices (a pod moving between slices) counts once. Endpoints are
  ordered numerically, Services by namespace then name: the same input gives the same rules.
- A malformed object is counted (``Stats.inc(Counter.NODESYNC_BAD_OBJECT)``) and ignored, never
  raised: one bad object must not stop a node from programming every other Service.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from tencrypt.core.stats import Counter, Stats
from tencrypt.kube.objects import ENABLED_LABEL, EventType

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Key = tuple[str, str]  # (namespace, name)


class Kind(enum.Enum):
    NAMESPACE = "Namespace"
    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    ENDPOINTS = "Endpoints"


@dataclass(slots=True, frozen=True, order=True)
class ServiceBackends:
    """One VIP of one Service and the pod IPs its tunnel port forwards to, in order."""

    namespace: str
    name: str
    vip: str
    endpoints: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class _Addresses:
    service: str
    ready: tuple[str, ...]
    terminating: tuple[str, ...]  # serving and terminating: used only when nothing is ready


@dataclass(slots=True)
class ClusterState:
    """The objects node-sync has seen, reduced to what the rules need. One owner: the syncer.

    Incremental recompute: each Service's desired entries (one ``ServiceBackends`` per VIP)
    are kept in ``entries``; an event marks dirty only the Services it can change (a
    Service event its own; a slice or legacy Endpoints event the Service it names, before
    and after; a Namespace event the Services in it) and ``refresh`` recomputes only those.
    ``desired(full=True)`` (start-up, resync) recomputes every Service from the objects, so
    a bug in the bookkeeping cannot outlive the next resync; the unit tests check that both
    give the same result for random event sequences. A relist (``replace``) marks all."""

    stats: Stats = field(default_factory=Stats)
    namespaces: dict[str, bool] = field(default_factory=dict)  # name -> enabled
    services: dict[Key, tuple[str, ...]] = field(default_factory=dict)  # -> IPv4 VIPs
    slices: dict[Key, _Addresses] = field(default_factory=dict)  # (ns, slice name)
    endpoints: dict[Key, _Addresses] = field(default_factory=dict)  # (ns, service name)
    # derived, kept in step by every change to the tables above
    entries: dict[Key, tuple[ServiceBackends, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )  # Service -> its desired entries as last computed (Services with none are absent)
    slices_of: dict[Key, set[Key]] = field(default_factory=dict, repr=False, compare=False)
    in_namespace: dict[str, set[Key]] = field(default_factory=dict, repr=False, compare=False)
    dirty: set[Key] = field(default_factory=set, repr=False, compare=False)
    everything: bool = field(default=True, repr=False, compare=False)  # all dirty
    order: list[Key] | None = field(default=None, repr=False, compare=False)  # sorted entries

    def on_event(self, kind: Kind, event: EventType, obj: Any) -> None:
        """Apply one watch event (or one listed object, as ADDED)."""
        key = _key(obj, namespaced=kind is not Kind.NAMESPACE)
        if key is None:
            self.stats.inc(Counter.NODESYNC_BAD_OBJECT)
            return
        slot: Any = key[1] if kind is Kind.NAMESPACE else key
        value = None if event is EventType.DELETED else _PARSERS[kind](obj)
        if value is None and event is not EventType.DELETED:
            self.stats.inc(Counter.NODESYNC_BAD_OBJECT)
        self._store(kind, slot, value)  # None: a Service turned malformed stops forwarding

    def replace(self, kind: Kind, objs: Iterable[Any]) -> None:
        """A fresh list of ``kind`` (after a relist): whatever it lacks is gone."""
        self._table(kind).clear()
        if kind is Kind.SERVICE:
            self.in_namespace.clear()
        elif kind is Kind.ENDPOINT_SLICE:
            self.slices_of.clear()
        self.everything = True
        for obj in objs:
            self.on_event(kind, EventType.ADDED, obj)

    def refresh(self) -> dict[Key, tuple[tuple[ServiceBackends, ...], ...]]:
        """Recompute the dirty Services' entries; returns ``{Service: (old, new)}`` for
        those whose entries changed (nothing changed: empty)."""
        if self.everything:
            keys: Iterable[Key] = set(self.services) | set(self.entries)
        else:
            keys = self.dirty
        self.everything, self.dirty = False, set()
        changes: dict[Key, tuple[tuple[ServiceBackends, ...], ...]] = {}
        for key in keys:
            new = self._compute(key)
            old = self.entries.get(key, ())
            if new == old:
                continue
            changes[key] = (old, new)
            if not old or not new:
                self.order = None  # the set of Services with entries changed
            if new:
                self.entries[key] = new
            else:
                del self.entries[key]
        return changes

    def desired(self, full: bool = False) -> list[ServiceBackends]:
        """Every VIP that should forward the tunnel port, with its endpoints, ordered by
        namespace and Service name. ``full``: recompute every Service from the objects
        instead of only the dirty ones."""
        if full:
            self.entries.clear()
            self.everything, self.order = True, None
        self.refresh()
        if self.order is None:
            self.order = sorted(self.entries)
        entries = self.entries
        return [b for key in self.order for b in entries[key]]

    def _compute(self, key: Key) -> tuple[ServiceBackends, ...]:
        """One Service's entries from the objects (empty: not forwarded)."""
        ns, name = key
        vips = self.services.get(key)
        if not vips or not self.namespaces.get(ns, False):
            return ()
        names = self.slices_of.get(key)
        if names:
            sources = [self.slices[k] for k in names]
        else:
            legacy = self.endpoints.get(key)
            sources = [legacy] if legacy else []
        endpoints = _choose(sources)
        return tuple(ServiceBackends(ns, name, vip, endpoints) for vip in vips)

    def _store(self, kind: Kind, slot: Any, value: Any) -> None:
        """Set (or with ``None`` remove) one object's value; keep the indexes in step and
        mark dirty the Services it may change."""
        table = self._table(kind)
        old = table.pop(slot, None)
        if value is not None:
            table[slot] = value
        if kind is Kind.NAMESPACE:
            if old != value:
                self.dirty |= self.in_namespace.get(slot, set())
        elif kind is Kind.SERVICE:
            members = self.in_namespace.setdefault(slot[0], set())
            if value is None:
                members.discard(slot)
            else:
                members.add(slot)
            self.dirty.add(slot)
        elif kind is Kind.ENDPOINT_SLICE:
            ns = slot[0]
            if old is not None:
                self.slices_of.get((ns, old.service), set()).discard(slot)
                self.dirty.add((ns, old.service))
            if value is not None:
                self.slices_of.setdefault((ns, value.service), set()).add(slot)
                self.dirty.add((ns, value.service))
        else:
            self.dirty.add(slot)

    def _table(self, kind: Kind) -> dict[Any, Any]:
        tables: dict[Kind, dict[Any, Any]] = {
            Kind.NAMESPACE: self.namespaces,
            Kind.SERVICE: self.services,
            Kind.ENDPOINT_SLICE: self.slices,
            Kind.ENDPOINTS: self.endpoints,
        }
        return tables[kind]


def parse_list(doc: Any, stats: Stats) -> list[tuple[Kind, Any]]:
    """The items of a ``kubectl get a,b,c -A -o json`` document (kind ``List``), with their
    kinds; items of other kinds are skipped, malformed ones counted."""
    items = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        stats.inc(Counter.NODESYNC_BAD_OBJECT)
        return []
    out: list[tuple[Kind, Any]] = []
    for item in items:
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind in _KIND_NAMES:
            out.append((_KIND_NAMES[kind], item))
        elif not isinstance(kind, str):
            stats.inc(Counter.NODESYNC_BAD_OBJECT)
    return out


def load_list(doc: Any, stats: Stats) -> ClusterState:
    """A whole state from one ``kubectl ... -o json`` document (``--once --from-file``)."""
    state = ClusterState(stats)
    for kind, obj in parse_list(doc, stats):
        state.on_event(kind, EventType.ADDED, obj)
    return state


def _choose(sources: Iterable[_Addresses]) -> tuple[str, ...]:
    ready: set[str] = set()
    terminating: set[str] = set()
    for addrs in sources:
        ready.update(addrs.ready)
        terminating.update(addrs.terminating)
    chosen = ready or terminating
    return tuple(sorted(chosen, key=lambda ip: ipaddress.IPv4Address(ip).packed))


def _key(obj: Any, namespaced: bool) -> Key | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not _is_str(meta.get("name")):
        return None
    ns = meta.get("namespace", "")
    if namespaced and not _is_str(ns):
        return None
    return (ns if namespaced else "", meta["name"])


def parse_namespace(obj: Any) -> bool | None:
    labels = _labels(obj)
    return None if labels is None else labels.get(ENABLED_LABEL) == "true"


def parse_service(obj: Any) -> tuple[str, ...] | None:
    """The IPv4 ClusterIPs of a Service; ``()`` for headless and ExternalName Services."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "ExternalName":
        return ()
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(ips, list):
        return None
    vips: list[str] = []
    for ip in ips:
        if ip == "None" or not _is_str(ip):
            continue
        if _ipv4(ip) is None:
            if ":" not in ip:  # IPv6 is skipped on purpose, garbage is counted
                return None
            continue
        vips.append(ip)
    return tuple(vips)


def parse_endpoint_slice(obj: Any) -> _Addresses | None:
    labels = _labels(obj)
    service = labels.get(SERVICE_NAME_LABEL) if labels is not None else None
    if not _is_str(service):
        return None
    if obj.get("addressType") != "IPv4":
        return _Addresses(service, (), ())
    ready: list[str] = []
    terminating: list[str] = []
    for ep in _list(obj.get("endpoints")):
        cond = ep.get("conditions") if isinstance(ep, dict) else None
        addrs = ep.get("addresses") if isinstance(ep, dict) else None
        if not isinstance(addrs, list) or not (cond is None or isinstance(cond, dict)):
            return None  # also reached for a non-list "endpoints" (see _list)
        cond = cond or {}
        is_ready = cond.get("ready") is not False  # unset means ready (discovery/v1)
        is_serving = cond.get("serving", is_ready) is not False
        for ip in addrs:
            if _ipv4(ip) is None:
                return None
            if is_ready and cond.get("terminating") is not True:
                ready.append(ip)
            elif is_serving and cond.get("terminating") is True:
                terminating.append(ip)
    return _Addresses(service, tuple(ready), tuple(terminating))


def parse_endpoints(obj: Any) -> _Addresses | None:
    """Legacy core/v1 Endpoints: ``subsets[].addresses[].ip`` are ready; not-ready ones are
    not used (the legacy object has no terminating state to fall back on)."""
    meta = obj["metadata"]
    ready: list[str] = []
    for subset in _list(obj.get("subsets")):
        if not isinstance(subset, dict):
            return None
        addrs = subset.get("addresses")
        if addrs is not None and not isinstance(addrs, list):
            return None
        for addr in addrs or []:
            ip = addr.get("ip") if isinstance(addr, dict) else None
            if _ipv4(ip) is None:
                if _is_str(ip) and ":" in ip:
                    continue
                return None
            ready.append(str(ip))
    return _Addresses(meta["name"], tuple(ready), ())


_PARSERS = {
    Kind.NAMESPACE: parse_namespace,
    Kind.SERVICE: parse_service,
    Kind.ENDPOINT_SLICE: parse_endpoint_slice,
    Kind.ENDPOINTS: parse_endpoints,
}
_KIND_NAMES = {k.value: k for k in Kind}


def _labels(obj: Any) -> Mapping[str, Any] | None:
    labels = obj.get("metadata", {}).get("labels") or {}
    return labels if isinstance(labels, dict) else None


def _list(value: Any) -> list[Any]:
    """``value`` if it is a list, ``[]`` if absent, ``[None]`` (which every caller rejects)
    if it is anything else."""
    if value is None:
        return []
    return value if isinstance(value, list) else [None]


def _ipv4(value: Any) -> ipaddress.IPv4Address | None:
    if not _is_str(value):
        return None
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        return None


def _is_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""
