"""The agent's report of the key rings its proxies run with, for `tencrypt key rotate`.

Each proxy records the ring it loaded (``keys-loaded.json`` in its setup state directory,
linux/keyfile.py); the agent folds those of its pods into one ``NodeReport`` and publishes it
as the ConfigMap ``tencrypt-keys-<node>`` in its own namespace (core/rotation.py rule 3). The
rotation command waits on these reports between phases.

Rules:
- ``node_report`` is pure: every pod the agent has an entry for counts in its project's
  ``pods``; its ``loaded`` ring is what its proxy recorded ("" if nothing yet: starting,
  dead, or a proxy too old to record it). Fingerprints only, never a key.
- ``KeyReporter.publish`` reads the proxies' records at most every ``every`` seconds and
  writes the ConfigMap only when the report changed or ``heartbeat`` seconds passed (the
  ``updated`` time then tells a live agent from a dead one). A failed write is logged once per
  kind of failure and retried at the next pass: the proxies never wait for it.
- Least privilege (scripts/k8s/rbac.yaml): create, get and update ConfigMaps in the agent's
  own namespace only; no list, no watch, no delete, nothing elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tencrypt.core.rotation import (
    REPORT_KEY,
    REPORT_LABEL,
    REPORT_PREFIX,
    NodeReport,
    render_report,
)
from tencrypt.linux.keyfile import read_loaded

log = logging.getLogger("tencrypt.agent")


def node_report(
    node: str, pods: Iterable[tuple[str, int]], loaded: Callable[[int], str | None], now: float
) -> NodeReport:
    """``pods``: (project, netns inode) of every proxy entry; ``loaded``: a netns's ring."""
    projects: dict[str, tuple[int, dict[str, int]]] = {}
    for project, netns in pods:
        count, rings = projects.get(project, (0, {}))
        ring = loaded(netns) or ""
        rings[ring] = rings.get(ring, 0) + 1
        projects[project] = (count + 1, rings)
    return NodeReport(node, now, projects)


class KeyReporter:
    def __init__(
        self,
        api: Any,
        namespace: str,
        node: str,
        setup_state_dir: Path,
        clock: Callable[[], float] = time.time,
        every: float = 1.0,
        heartbeat: float = 60.0,
    ) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.name = REPORT_PREFIX + node
        self.setup_state_dir, self.clock = setup_state_dir, clock
        self.every, self.heartbeat = every, heartbeat
        self._next = 0.0
        self._sent: tuple[str, float] | None = None  # (content without "updated", when)
        self._problem: str | None = None
        self.writes = 0

    def loaded(self, netns: int) -> str | None:
        return read_loaded(self.setup_state_dir / f"netns-{netns}")

    def publish(self, pods: Iterable[tuple[str, int]]) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        report = node_report(self.node, pods, self.loaded, now)
        content = render_report(NodeReport(report.node, 0.0, report.projects))
        if self._sent and self._sent[0] == content and now - self._sent[1] < self.heartbeat:
            return
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": dict([REPORT_LABEL]),
            },
            "data": {REPORT_KEY: render_report(report)},
        }
        try:
            self._write(body)
        except Exception as exc:  # noqa: BLE001 - the client's errors have no common type
            problem = f"{type(exc).__name__} {getattr(exc, 'status', '')}".strip()
            if problem != self._problem:
                log.error(
                    "cannot publish the key report ConfigMap %s/%s (%s): `tencrypt key "
                    "rotate` will wait for this node; retrying",
                    self.namespace,
                    self.name,
                    getattr(exc, "reason", None) or exc,
                )
            self._problem = problem
            return
        self._problem, self._sent = None, (content, now)
        self.writes += 1

    def _write(self, body: dict[str, Any]) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.api.replace_namespaced_config_map(
                self.name, self.namespace, body, _request_timeout=5
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.api.create_namespaced_config_map(self.namespace, body, _request_timeout=5)
