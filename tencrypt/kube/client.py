"""The official ``kubernetes`` client, configured and used the way both daemons need it.

Rules:
- Configuration: ``--kubeconfig`` if given, else the in-cluster service account when running
  in a pod, else ``$KUBECONFIG`` or ``~/.kube/config``.
- A list is read to its end through ``continue`` pages of ``PAGE_SIZE`` objects, as raw JSON:
  the client's model classes refuse a ``null`` list the API server legitimately sends.
- An error is logged as one line (``brief``): HTTP status, reason, the server's message, and
  for 401/403 what to check; never the client's multi-line dump of headers and body.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tencrypt.errors import UsageError

PAGE_SIZE = 500
CONNECT_TIMEOUT = 10  # seconds to connect to the API server
LIST_TIMEOUT = 120  # seconds to read one page


def new_api_client(kubeconfig: str | None, context: str | None = None) -> client.ApiClient:
    """A kubeconfig (or one of its contexts) when one is named; else the in-cluster
    service-account config when running in a pod; else ``$KUBECONFIG`` or ``~/.kube/config``.
    None of them usable: UsageError saying which were tried (never the client's traceback)."""
    if kubeconfig and not os.path.isfile(kubeconfig):
        raise UsageError(f"--kubeconfig {kubeconfig}: no such file")
    try:
        if kubeconfig or context:
            return config.new_client_from_config(config_file=kubeconfig, context=context)
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            return config.new_client_from_config()
    except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        # the client raises these for a missing, unreadable or malformed kubeconfig
        tried = (
            f"--kubeconfig {kubeconfig}"
            if kubeconfig
            else "no service account of a pod here, and $KUBECONFIG or ~/.kube/config"
        )
        context_note = f" (context {context})" if context else ""
        raise UsageError(
            f"cannot configure the Kubernetes client from {tried}{context_note}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "pass --kubeconfig FILE"
        ) from None


def api_failures() -> tuple[type[Exception], ...]:
    """What a request raises when the API server refused it or could not be reached."""
    return (ApiException, *unreachable())


def unreachable() -> tuple[type[Exception], ...]:
    """What a request raises when the API server cannot be reached (refused, timed out, TLS,
    DNS): urllib3's errors, which are not OSErrors, and the OSErrors under them."""
    from urllib3.exceptions import HTTPError

    return (HTTPError, OSError)


def list_all(list_fn: Callable[..., Any]) -> tuple[list[Any], str]:
    """Every object of a kind (following ``continue`` pages) and the list's resourceVersion."""
    items: list[Any] = []
    token = None
    while True:
        resp = list_fn(
            limit=PAGE_SIZE,
            _continue=token,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
        )
        doc = json.loads(resp.data)
        items.extend(doc.get("items") or [])
        meta = doc.get("metadata") or {}
        token = meta.get("continue")
        if not token:
            return items, str(meta.get("resourceVersion", ""))


def brief(exc: Exception) -> str:
    """One line for a log: the client's ApiException prints headers and body on many lines,
    urllib3 wraps a refused connection in three layers of text. A 401/403 says what to check."""
    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message") or ""
        except (ValueError, AttributeError):
            message = ""
        hint = {
            401: " (check the token / kubeconfig)",
            403: " (check the ClusterRoles of scripts/k8s/rbac.yaml are applied and bound "
            "to this ServiceAccount)",
        }.get(exc.status or 0, "")
        return f"HTTP {exc.status} {exc.reason}{': ' + message if message else ''}{hint}"
    reason = getattr(exc, "reason", None)  # urllib3: MaxRetryError(reason=NewConnectionError)
    while getattr(reason, "reason", None) is not None:
        reason = reason.reason  # type: ignore[union-attr]
    if isinstance(exc, unreachable()):
        return f"the API server is unreachable ({reason or exc})"
    return f"{type(exc).__name__}: {reason or exc}"


NOT_FOUND = 404


class _Nothing:
    """What ``optional`` answers for a kind the API does not serve: an empty list, or a watch
    that ends without events once its time-out has passed (so the reflector re-lists at a
    watch's pace, not in a tight loop)."""

    data = b'{"items": [], "metadata": {"resourceVersion": "0"}}'

    def __init__(self, wait: Callable[[float], object] | None = None, seconds: float = 0.0):
        self._wait, self._seconds = wait, seconds

    def stream(self, amt: object = None, decode_content: bool = False) -> list[bytes]:
        if self._wait is not None:
            self._wait(self._seconds)
        return []

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def optional(
    list_fn: Callable[..., Any], stop: Any, on_missing: Callable[[], object]
) -> Callable[..., Any]:
    """``list_fn`` for a kind that older API servers lack: a 404 lists nothing, and a watch
    waits its time-out (or until ``stop``) and ends empty; ``on_missing`` runs once."""
    said = [False]

    def call(**kw: Any) -> Any:
        try:
            return list_fn(**kw)
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            if not said[0]:
                said[0] = True
                on_missing()
            if kw.get("watch"):
                return _Nothing(stop.wait, float(kw.get("timeout_seconds") or 60))
            return _Nothing()

    return call
