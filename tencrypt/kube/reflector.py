"""List, then watch, one kind of object into a queue: client-go's reflector, in a thread.

Rules:
- list (paged) → one ``Listed`` with every object; then watch from the list's
  resourceVersion → one ``Changed`` per event. ``BOOKMARK`` events only advance the version.
- A watch that ends (the server's timeout) resumes from the last version it saw; ``410
  Gone`` relists at once; any other error (HTTP, reset, bad JSON) is logged in one line and
  relists after a capped exponential backoff, so nothing that happened meanwhile is lost.
- The reflector knows nothing of its consumer: any list function of the client
  (``functools.partial`` adds selectors) and any enum member as the kind's label will do.
  node-sync labels Namespaces, Services and EndpointSlices with its ``Kind``; the agent
  labels Pods, Namespaces, Services and Secrets with its ``AgentKind``.
- The raw JSON of each object is queued, not the client's model classes: the watch helper
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.watch.watch import iter_resp_lines

from tencrypt.kube.client import CONNECT_TIMEOUT, brief, list_all
from tencrypt.kube.objects import EventType

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300  # seconds the server keeps one watch open before we re-watch
MAX_BACKOFF = 30.0
GONE = 410


@dataclass(slots=True)
class Listed:
    kind: enum.Enum  # the caller's own label for what it lists
    items: list[Any]


@dataclass(slots=True)
class Changed:
    kind: enum.Enum
    event: EventType
    obj: Any


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class Reflector(threading.Thread):
    def __init__(
        self,
        kind: enum.Enum,
        list_fn: Callable[..., Any],
        out: queue.Queue[object],
        stop: threading.Event,
        watch_timeout: int = WATCH_TIMEOUT,
    ) -> None:
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
            resp = self.list_fn(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + 30),
            )
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
