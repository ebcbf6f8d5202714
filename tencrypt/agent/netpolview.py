"""What the agent knows of every project's NetworkPolicies, pods and namespace labels: the
input of agent/netpol.py, kept from the API's lists and watch events (issue #23).

Rules:
- Input is Kubernetes JSON: every ``networking.k8s.io/v1`` NetworkPolicy, every Pod and every
  Namespace of the cluster. Nothing here does I/O.
- Policies are parsed once, when they arrive (agent/netpolobjects.py: a malformed one is
  counted, ``agent_bad_object``, and kept: it isolates and allows nothing). Pods are kept as
  ``PodInfo`` (labels, the IPs that count, named container ports), with or without an
  address (one without is no peer, but its own policy can be reduced); a malformed Pod
  event is counted and keeps what was known, a relist leaves it out (as ``MemberView``
  does: it is then no peer, which only narrows, and its own document fails closed).
  A Namespace's labels decide its ``namespaceSelector`` matches; a malformed one is unknown
  (None: no selector matches it).
- ``version(project)`` grows whenever what a reduction reads of the project changes (a
  policy, a pod's labels, addresses or ports, the namespace's labels); an event that changes
  nothing kept here does not move it. ``world(project)`` is the project's ``World`` at that
  version (built once per version).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tencrypt.agent.netpol import World
from tencrypt.agent.netpolobjects import (
    Labels,
    PodInfo,
    Policy,
    namespace_of,
    parse_namespace_labels,
    parse_pod,
    parse_policy,
)
from tencrypt.core.stats import Counter, Stats
from tencrypt.kube.objects import EventType


@dataclass(slots=True)
class PolicyView:
    stats: Stats = field(default_factory=Stats)
    pods: dict[str, dict[str, PodInfo]] = field(default_factory=dict)  # ns -> name ->
    policies: dict[str, dict[str, Policy]] = field(default_factory=dict)  # ns -> name ->
    labels: dict[str, Labels | None] = field(default_factory=dict)  # ns -> its labels
    versions: dict[str, int] = field(default_factory=dict)
    _worlds: dict[str, tuple[int, World]] = field(default_factory=dict)

    # -- lists (a fresh list of every object of a kind: whatever it lacks is gone) -----------

    def replace_pods(self, objs: Iterable[Any]) -> None:
        self._replace(self.pods, ((namespace_of(o), self._pod(o)) for o in objs))

    def replace_policies(self, objs: Iterable[Any]) -> None:
        self._replace(self.policies, ((namespace_of(o), self._policy(o)) for o in objs))

    def replace_namespaces(self, objs: Iterable[Any]) -> None:
        old = dict(self.labels)
        self.labels = {}
        for obj in objs:
            name = _name(obj)
            if name is None:
                self.stats.inc(Counter.AGENT_BAD_OBJECT)
            else:
                self.labels[name] = self._ns_labels(obj)
        for ns in set(old) | set(self.labels):
            if old.get(ns) != self.labels.get(ns):
                self._bump(ns)

    # -- events ------------------------------------------------------------------------------

    def on_pod(self, event: EventType, obj: Any) -> None:
        ns, info = namespace_of(obj), self._pod(obj)
        if ns is None or info is None:
            if event is EventType.DELETED and ns is not None and _name(obj) is not None:
                self._put(self.pods, ns, str(_name(obj)), None)
            return
        self._put(self.pods, ns, info.name, None if event is EventType.DELETED else info)

    def on_policy(self, event: EventType, obj: Any) -> None:
        ns, policy = namespace_of(obj), self._policy(obj)
        if ns is None or policy is None:
            if ns is None and policy is not None:
                self.stats.inc(Counter.AGENT_BAD_OBJECT)
            return
        self._put(self.policies, ns, policy.name, None if event is EventType.DELETED else policy)

    def on_namespace(self, event: EventType, obj: Any) -> None:
        name = _name(obj)
        if name is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
            return
        before = self.labels.get(name, "absent")
        if event is EventType.DELETED:
            self.labels.pop(name, None)
        else:
            self.labels[name] = self._ns_labels(obj)
        if before != self.labels.get(name, "absent"):
            self._bump(name)

    # -- reading -----------------------------------------------------------------------------

    def version(self, project: str) -> int:
        return self.versions.get(project, 0)

    def world(self, project: str) -> World:
        version = self.version(project)
        known = self._worlds.get(project)
        if known is None or known[0] != version:
            world = World(
                project,
                self.labels.get(project),
                dict(self.pods.get(project, {})),
                sorted(self.policies.get(project, {}).values(), key=lambda p: p.name),
                self.stats,
            )
            known = self._worlds[project] = (version, world)
        return known[1]

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the cached worlds of projects not in ``keep`` (no proxy of them here)."""
        wanted = set(keep)
        for project in set(self._worlds) - wanted:
            del self._worlds[project]

    # -- helpers -----------------------------------------------------------------------------

    def _pod(self, obj: Any) -> PodInfo | None:
        info = parse_pod(obj)
        if info is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
        return info

    def _policy(self, obj: Any) -> Policy | None:
        if _name(obj) is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
            return None
        policy = parse_policy(obj)
        if policy.malformed:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
        return policy

    def _ns_labels(self, obj: Any) -> Labels | None:
        labels = parse_namespace_labels(obj)
        if labels is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
        return labels

    def _replace(self, table: dict[str, dict[str, Any]], parsed: Iterable[tuple[Any, Any]]) -> None:
        old = {ns: dict(names) for ns, names in table.items()}
        table.clear()
        for ns, value in parsed:
            if ns is not None and value is not None:
                table.setdefault(ns, {})[value.name] = value
        for ns in set(old) | set(table):
            if old.get(ns) != table.get(ns):
                self._bump(ns)

    def _put(self, table: dict[str, dict[str, Any]], ns: str, name: str, value: Any) -> None:
        names = table.setdefault(ns, {})
        before = names.get(name)
        if value is None:
            names.pop(name, None)
        else:
            names[name] = value
        if not names:
            del table[ns]
        if before != value:
            self._bump(ns)

    def _bump(self, ns: str) -> None:
        self.versions[ns] = self.versions.get(ns, 0) + 1


def _name(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None
