"""The node daemons' HTTP endpoint (node-sync and the agent): Prometheus text at ``/metrics``
(and ``/``), the kubelet's probes at ``/healthz`` (liveness) and ``/readyz`` (readiness), on
a thread of its own, until ``stop`` is set.

A probe is a callable answering ``(ok, reason)``: 200 and ``ok`` when true, 503 and the
reason otherwise, so that ``kubectl describe pod`` shows why a probe failed. Not for the
proxy: a proxy serves its own pod (linux/metrics.py, asyncio) and must not carry http.server.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tencrypt.argtypes import parse_address
from tencrypt.errors import UsageError

log = logging.getLogger("tencrypt.probes")

PROMETHEUS = "text/plain; version=0.0.4"
Probe = Callable[[], tuple[bool, str]]


def answer(
    path: str, render: Callable[[], str], probes: Mapping[str, Probe]
) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) for a GET of ``path``."""
    path = path.split("?", 1)[0]
    if path in ("/metrics", "/"):
        return 200, PROMETHEUS, render().encode()
    probe = probes.get(path)
    if probe is None:
        known = ", ".join(["/metrics", *sorted(probes)])
        return 404, "text/plain", f"not found; try {known}\n".encode()
    try:
        ok, reason = probe()
    except Exception as exc:  # noqa: BLE001 - a probe that fails says so, the server lives on
        log.exception("probe %s failed", path)
        ok, reason = False, f"the probe itself failed: {exc}"
    return (200 if ok else 503), "text/plain", f"{'ok' if ok else reason}\n".encode()


def serve(
    address: str,
    render: Callable[[], str],
    stop: threading.Event,
    probes: Mapping[str, Probe] | None = None,
) -> ThreadingHTTPServer:
    """Serve ``render`` and ``probes`` on ``address`` (ADDR:PORT) in a daemon thread; shut
    down when ``stop`` is set. An address that cannot be bound is a UsageError."""
    host, port = parse_address(address)
    routes = dict(probes or {})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            code, kind, body = answer(self.path, render, routes)
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 literal

        class Server6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_class = Server6
    try:
        server = server_class((host, port), Handler)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()

    def shut_down_when_stopped() -> None:
        stop.wait()
        server.shutdown()

    threading.Thread(target=shut_down_when_stopped, daemon=True).start()
    return server
