"""A minimal HTTP endpoint serving Prometheus text at /metrics (and / for a browser)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tencrypt.errors import UsageError

log = logging.getLogger("tencrypt.metrics")


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--metrics wants ADDR:PORT, e.g. 127.0.0.1:9137, not {text!r}")
    return host, int(port)


async def serve(address: str, render: Callable[[], str]) -> asyncio.Server:
    host, port = parse_address(address)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            if path in (b"/metrics", b"/"):
                status, body = "200 OK", render().encode()
            else:
                status, body = "404 Not Found", b"not found; try /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, host, port)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
