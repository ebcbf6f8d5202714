"""A minimal HTTP endpoint: Prometheus text at /metrics (and / for a browser), and the
proxy's state as JSON at /status when a second callable is given (``tencrypt status``
reads it). Listen on loopback or the pod IP only: /status names the pod's peers.

Every proxy also serves both on a Unix socket in its state directory (``SOCKET_FILE``,
mode 0600 in a root-only directory on the node): the node agent scrapes it for its node-level
/metrics and ``tencrypt status --node`` reads it, with no port open in the pod (issue 25).
``get_unix`` is the client side."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from tencrypt.argtypes import parse_address
from tencrypt.errors import SetupError, UsageError
from tencrypt.linux.sockets import start_tcp_server

log = logging.getLogger("tencrypt.metrics")

SOCKET_FILE = "metrics.sock"
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


def _handler(
    render: Callable[[], str], status: Callable[[], object] | None
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
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

    return handle


async def serve(
    address: str, render: Callable[[], str], status: Callable[[], object] | None = None
) -> asyncio.Server:
    host, port = parse_address(address)
    try:
        return await start_tcp_server(_handler(render, status), host, port)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from exc


async def serve_unix(
    path: Path, render: Callable[[], str], status: Callable[[], object] | None = None
) -> asyncio.Server:
    """The same endpoint on the Unix socket ``path`` (a stale one is replaced), 0600."""
    path.unlink(missing_ok=True)
    old = os.umask(0o177)  # created 0600: never a moment readable by others
    try:
        return await asyncio.start_unix_server(_handler(render, status), str(path))
    except (OSError, UnicodeError) as exc:  # e.g. a path longer than AF_UNIX's 107 bytes
        raise SetupError(f"cannot serve metrics on {path}: {exc}") from exc
    finally:
        os.umask(old)


def get_unix(path: Path, target: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``target`` from the endpoint on the Unix socket ``path``: (HTTP status, body).
    OSError when nothing answers in time; ValueError for a reply that is not HTTP."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"{path}: not an HTTP reply")
    return int(parts[1]), body
