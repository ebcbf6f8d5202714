"""A Kubernetes API server double for tests: what node-sync and the agent read.

It is a test double in the sense of wireguard-go's ``tuntest``: the client (the official
``kubernetes`` package) is real and speaks real HTTP to it on loopback; only the server is
small. What it does as the real one does:

- ``GET /api/v1/namespaces``, ``/api/v1/services``, ``/api/v1/endpoints``,
  ``/apis/discovery.k8s.io/v1/endpointslices``, ``/apis/networking.k8s.io/v1/networkpolicies``
  and ``/api/v1/pods``: a ``<Kind>List`` with a
  resourceVersion, paged with ``limit``/``continue``; items carry no ``kind``/``apiVersion``
  (as in real lists). ``fieldSelector=a.b=v,...`` (equality only, e.g. ``spec.nodeName=n1``)
  filters lists and watches.
- ``?watch=true&resourceVersion=N``: a chunked stream of ``{"type", "object"}`` lines for
  every change after N, held open until ``timeoutSeconds``, ``end_watches()`` or ``stop()``;
  a version older than the last ``compact()`` gets an ``ERROR`` event with code 410;
  ``pause_watches()`` holds watch requests (a partition) until ``resume_watches()``. Under a
  field selector, an object that starts matching arrives as ``ADDED`` and one that stops
  matching as ``DELETED``, as the real API server's watch cache sends them.
- ``/api/v1/secrets`` lists and watches only under ``fieldSelector=metadata.name=<name>``
  for a name in ``secret_names`` (default: ``tencrypt``), else 403 — as the real server
  authorizes an RBAC rule with ``resourceNames``: it takes a list/watch's name from that
  field selector, and refuses it without one.
- Every request needs ``Authorization: Bearer <token>``, else 401; with
  ``serve_slices=False`` the EndpointSlice API answers 404, like a cluster that predates it.
- ``requests`` records (kind name, "list" | "watch") of every request, so a test can
  tell a watcher from a poller; ``count`` and ``open_watches`` take a ``Kind`` or a kind name.
"""

from __future__ import annotations

import copy
import enum
import json
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tencrypt.nodesync.cluster import Kind

PATHS = {
    "/api/v1/namespaces": Kind.NAMESPACE.value,
    "/api/v1/services": Kind.SERVICE.value,
    "/api/v1/endpoints": Kind.ENDPOINTS.value,
    "/apis/discovery.k8s.io/v1/endpointslices": Kind.ENDPOINT_SLICE.value,
    "/api/v1/pods": "Pod",
    "/api/v1/secrets": "Secret",
    "/api/v1/nodes": "Node",
    "/apis/networking.k8s.io/v1/servicecidrs": "ServiceCIDR",
    "/apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
}
TOKEN = "tencrypt-test-token"

ObjKey = tuple[str, str, str]  # (kind name, namespace, name)
Obj = dict[str, Any]
Selector = tuple[tuple[str, str], ...]  # ((dotted field path, value), ...)


class FakeApiServer:
    def __init__(
        self,
        objects: Iterable[dict[str, Any]] = (),
        serve_slices: bool = True,
        secret_names: Iterable[str] = ("tencrypt",),
    ) -> None:
        self.serve_slices, self.secret_names = serve_slices, frozenset(secret_names)
        self.requests: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        self._version = 1000
        self._objects: dict[ObjKey, Obj] = {}
        # (version, kind name, event type, object, the object before this change or None)
        self._events: list[tuple[int, str, str, Obj, Obj | None]] = []
        self._compacted = 0
        self._generation = 0  # bumped by end_watches(): open streams end
        self._closing = False
        self._paused = False
        self._server: ThreadingHTTPServer | None = None
        self._open: dict[str, int] = {}
        for obj in objects:
            self.put(obj)

    # -- the cluster's state, changed by the test ------------------------------------------

    def put(self, obj: dict[str, Any]) -> None:
        """Create or replace an object (its ``kind`` says which list it belongs to)."""
        obj = copy.deepcopy(obj)
        key = _key(obj)
        with self._cond:
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            prev = self._objects.get(key)
            self._objects[key] = obj
            self._events.append((self._version, key[0], "MODIFIED" if prev else "ADDED", obj, prev))
            self._cond.notify_all()

    def delete(self, kind: str, namespace: str, name: str) -> None:
        key = (kind, namespace, name)
        with self._cond:
            prev = self._objects.pop(key)
            self._version += 1
            obj = {**prev, "metadata": {**prev["metadata"], "resourceVersion": str(self._version)}}
            self._events.append((self._version, kind, "DELETED", obj, prev))
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: old watches get 410 Gone."""
        with self._cond:
            self._compacted = self._version
            self._events.clear()

    def end_watches(self) -> None:
        """Close every open watch stream (the server-side timeout of a real API server)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def pause_watches(self) -> None:
        """End every open watch and hold new ones until ``resume_watches`` (a partition)."""
        with self._cond:
            self._paused = True
        self.end_watches()

    def resume_watches(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        with self._cond:
            obj = self._objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def count(self, kind: Kind | str, verb: str) -> int:
        name = _kind_name(kind)
        with self._cond:
            return sum(1 for k, v in self.requests if k == name and v == verb)

    def open_watches(self, kind: Kind | str) -> int:
        with self._cond:
            return self._open.get(_kind_name(kind), 0)

    # -- serving ---------------------------------------------------------------------------

    def start(self, port: int = 0) -> str:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": TOKEN}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                }
            )
        )
        return path

    def list_doc(self, kind: str, limit: int, start: int, selector: Selector = ()) -> Obj:
        with self._cond:
            objs = [
                o
                for (k, _, _), o in sorted(self._objects.items(), key=lambda i: i[0][1:])
                if k == kind and _matches(o, selector)
            ]
            version = self._version
        page = objs[start : start + limit] if limit else objs[start:]
        more = limit and start + limit < len(objs)
        items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page]
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if more:
            meta["continue"] = str(start + limit)
        return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": meta, "items": items}

    def stream(
        self, kind: str, since: int, timeout: float, write: Any, selector: Selector = ()
    ) -> None:
        """Write watch events of ``kind`` after version ``since`` until the stream ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._paused and not self._closing:
                self._cond.wait(0.5)
            generation = self._generation
            self._open[kind] = self._open.get(kind, 0) + 1
        try:
            if since < self._compacted:
                write(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {since}",
                        },
                    }
                )
                return
            while True:
                with self._cond:
                    pending = [
                        (v, t, o, p) for v, k, t, o, p in self._events if k == kind and v > since
                    ]
                    if not pending:
                        left = deadline - time.monotonic()
                        if self._closing or generation != self._generation or left <= 0:
                            return
                        self._cond.wait(min(left, 0.5))
                        continue
                for version, etype, obj, prev in pending:
                    etype = _selected(etype, obj, prev, selector)
                    if etype:
                        write({"type": etype, "object": obj})
                    since = version
        finally:
            with self._cond:
                self._open[kind] -= 1


def _key(obj: Obj) -> ObjKey:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


def _kind_name(kind: Kind | str) -> str:
    return kind.value if isinstance(kind, enum.Enum) else kind


def parse_field_selector(text: str) -> Selector:
    """``spec.nodeName=n1,metadata.namespace=shop`` (``==`` too); other operators refused."""
    out = []
    for term in filter(None, text.split(",")):
        path, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if not sep or path.endswith("!"):
            raise ValueError(f"unsupported field selector term {term!r}")
        out.append((path.strip(), value.strip()))
    return tuple(out)


def _field(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _matches(obj: Obj | None, selector: Selector) -> bool:
    return obj is not None and all(_field(obj, path) == want for path, want in selector)


def _selected(etype: str, obj: Obj, prev: Obj | None, selector: Selector) -> str | None:
    """The event a watch under ``selector`` sees for this change, if any."""
    if not selector:
        return etype
    now, before = _matches(obj, selector), _matches(prev, selector)
    if etype == "DELETED":
        return "DELETED" if before else None
    if now and before:
        return "MODIFIED"
    if now:
        return "ADDED"
    return "DELETED" if before else None


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._status(401, "Unauthorized")
            kind = PATHS.get(url.path)
            if kind is None or (kind == Kind.ENDPOINT_SLICE.value and not api.serve_slices):
                return self._status(404, "NotFound")
            try:
                selector = parse_field_selector(query.get("fieldSelector", ""))
            except ValueError as exc:
                return self._status(400, f"BadRequest: {exc}")
            if kind == "Secret" and selector not in {
                (("metadata.name", n),) for n in api.secret_names
            }:
                return self._status(403, "Forbidden")
            watching = query.get("watch") in ("true", "1", "True")
            with api._cond:
                api.requests.append((kind, "watch" if watching else "list"))
            if not watching:
                doc = api.list_doc(
                    kind, int(query.get("limit", 0)), int(query.get("continue", 0)), selector
                )
                return self._json(200, doc)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                api.stream(
                    kind,
                    int(query.get("resourceVersion") or 0),
                    float(query.get("timeoutSeconds", 300)),
                    self._chunk,
                    selector,
                )
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _chunk(self, event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _json(self, code: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _status(self, code: int, reason: str) -> None:
            self._json(
                code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": reason,
                    "code": code,
                    "message": reason,
                },
            )

    return Handler
