"""A minimal HTTP endpoint: Prometheus text at /metrics (and / for a browser), and the
proxy's state as JSON at /status when a second callable is given (``tencrypt status``
reads it). Listen on loopback or the pod IP only: /status names the pod's peers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from tencrypt.argtypes import parse_address
from tencrypt.errors import UsageError
from tencrypt.linux.sockets import start_tcp_server

log = logging.getLogger("tencrypt.metrics")

PROMETHEUS = "text/plain; version=0.0.4"
JSON = "application/json"


def respond(
    path: bytes, render: Callable[[], str], status: Callable[[], object] | None
) -> tuple[str, str, bytes]:
    """(HTTP status line, content type, body) for a GET of ``path``."""
    path = path.split(b"?", 1)[0]
    if path in (b"/metrics", b"/"):
        return "200 OK", PROMETHEUS, render().encode()
    if path == b"/status" and status is not None:
        return "200 OK", JSON, (json.dumps(status(), sort_keys=True) + "\n").encode()
    hint = "try /metrics or /status" if status is not None else "try /metrics"
    return "404 Not Found", "text/plain", f"not found; {hint}\n".encode()


async def serve(
    address: str, render: Callable[[], str], status: Callable[[], object] | None = None
) -> asyncio.Server:
    host, port = parse_address(address)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            code, kind, body = respond(path, render, status)
            writer.write(
                f"HTTP/1.1 {code}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()

    try:
        return await start_tcp_server(handle, host, port)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
