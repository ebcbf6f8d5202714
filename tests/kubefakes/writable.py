"""The API server double (``FakeApiServer``) with the few writes key rotation needs.

Besides what the base double serves, as the real API server does it:

- ``GET /api/v1/namespaces/NS/secrets/NAME`` and ``.../configmaps/NAME``: one object, 404 if
  absent; a Secret only for a name in ``secret_names`` (403 otherwise: an RBAC rule with
  ``resourceNames``).
- ``GET /api/v1/namespaces/NS/configmaps?labelSelector=k=v``: a ConfigMapList.
- ``PUT`` of one of those: replaces it when the body's ``metadata.resourceVersion`` is the
  stored one, else 409 Conflict (optimistic concurrency); 404 if absent.
- ``POST /api/v1/namespaces/NS/configmaps``: creates, 409 if it exists.

``writes`` records (kind, namespace, name, verb) of every successful write, ``forbid``
makes a (verb, kind) answer 403.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.kubefakes import fakeapi
from tests.kubefakes.fakeapi import TOKEN, FakeApiServer

_ONE = re.compile(r"^/api/v1/namespaces/([^/]+)/(secrets|configmaps)(?:/([^/]+))?$")
_KINDS = {"secrets": "Secret", "configmaps": "ConfigMap"}


class WritableApiServer(FakeApiServer):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.writes: list[tuple[str, str, str, str]] = []
        self.forbid: set[tuple[str, str]] = set()
        self.on_write: Any = None  # called (kind, namespace, name) after a successful write

    def start(self, port: int = 0) -> str:
        base = fakeapi._handler(self)  # noqa: SLF001 - extended, not copied
        api = self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:  # noqa: N802
                found = self._route()
                if found is None:
                    return super().do_GET()
                kind, ns, name, _ = found
                if not self._allowed("get", kind, name):
                    return None
                if name is None:
                    query = {k: v[-1] for k, v in parse_qs(urlparse(self.path).query).items()}
                    want = query.get("labelSelector", "")
                    key, _, value = want.partition("=")
                    items = [
                        o
                        for (k, n, _), o in sorted(api._objects.items())
                        if k == kind
                        and n == ns
                        and (not want or (o["metadata"].get("labels") or {}).get(key) == value)
                    ]
                    return self._json(
                        200,
                        {
                            "kind": f"{kind}List",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(api._version)},
                            "items": items,
                        },
                    )
                obj = api.get(kind, ns, name)
                return self._json(200, obj) if obj else self._status(404, "NotFound")

            def do_PUT(self) -> None:  # noqa: N802
                found = self._route()
                if found is None or found[2] is None:
                    return self._status(405, "MethodNotAllowed")
                kind, ns, name, body = found
                if not self._allowed("update", kind, name):
                    return None
                with api._cond:
                    old = api._objects.get((kind, ns, name))
                    if old is None:
                        return self._status(404, "NotFound")
                    sent = (body.get("metadata") or {}).get("resourceVersion")
                    if sent is not None and sent != old["metadata"]["resourceVersion"]:
                        return self._status(409, "Conflict")
                    self._store(kind, ns, name, body, "update")
                return self._json(200, api.get(kind, ns, name) or {})

            def do_POST(self) -> None:  # noqa: N802
                found = self._route()
                if found is None or found[2] is not None:
                    return self._status(405, "MethodNotAllowed")
                kind, ns, _, body = found
                name = (body.get("metadata") or {}).get("name", "")
                if not self._allowed("create", kind, name):
                    return None
                with api._cond:
                    if (kind, ns, name) in api._objects:
                        return self._status(409, "AlreadyExists")
                    self._store(kind, ns, name, body, "create")
                return self._json(201, api.get(kind, ns, name) or {})

            def _route(self) -> tuple[str, str, str | None, dict[str, Any]] | None:
                match = _ONE.match(urlparse(self.path).path)
                if match is None:
                    return None
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                return _KINDS[match[2]], match[1], match[3], body

            def _allowed(self, verb: str, kind: str, name: str | None) -> bool:
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._status(401, "Unauthorized")
                    return False
                if (verb, kind) in api.forbid or (
                    kind == "Secret" and name not in api.secret_names
                ):
                    self._status(403, "Forbidden")
                    return False
                return True

            def _store(
                self, kind: str, ns: str, name: str, body: dict[str, Any], verb: str
            ) -> None:
                obj = {**body, "kind": kind, "apiVersion": "v1"}
                obj["metadata"] = {**(body.get("metadata") or {}), "namespace": ns, "name": name}
                api.put(obj)
                api.writes.append((kind, ns, name, verb))
                if api.on_write is not None:
                    api.on_write(kind, ns, name)

        self._server = fakeapi.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url
