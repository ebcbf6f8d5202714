"""Kubernetes Events the agent records on a pod, where `kubectl describe pod` shows them.

Rules:
- Only what a pod's owner must act on and would not otherwise see: today, that the project's
  NetworkPolicies drop the pod's tunnel (agent/netpol.py ``blocked_for``).
- ``warn`` records one ``Warning`` Event per (pod, reason, message): the same finding again
  is not recorded twice while the agent lives; a changed one is. Best effort: a failed
  write is logged once per kind of failure and never retried (the agent's log and the
  proxy's metrics say the same thing).
- Opt-in (scripts/k8s/optional/agent-events.yaml: create Events, nothing else): without it
  the first write's 403 is logged once and the agent stays read-only on the cluster.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from tencrypt.nodesync.kubeobjects import stable_uid

log = logging.getLogger("tencrypt.agent")
COMPONENT = "tencrypt-agent"
MAX_REMEMBERED = 65536  # (pod, reason, message) kept against repeats


class PodEvents:
    def __init__(self, api: Any, node: str) -> None:
        self.api, self.node = api, node
        self._sent: set[tuple[str, str, str]] = set()
        self._problem: str | None = None
        self.writes = 0

    def warn(self, namespace: str, name: str, uid: str, reason: str, message: str) -> None:
        key = (uid, reason, message)
        if key in self._sent:
            return
        if len(self._sent) >= MAX_REMEMBERED:
            self._sent.clear()
        self._sent.add(key)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{name}.tencrypt-{stable_uid(uid, reason, message)[:8]}",
                "namespace": namespace,
            },
            "involvedObject": {"kind": "Pod", "namespace": namespace, "name": name, "uid": uid},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": COMPONENT, "host": self.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.create_namespaced_event(namespace, body)
            self.writes += 1
        except Exception as exc:  # noqa: BLE001 - the client's errors have no common type
            problem = f"{type(exc).__name__} {getattr(exc, 'status', '')}".strip()
            if problem != self._problem:
                self._problem = problem
                log.warning("cannot record Events (%s): the log says it instead", problem)
