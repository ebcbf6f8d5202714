"""linux.sockets.start_tcp_server: a server on an IP literal binds its own socket, so the
event loop never starts resolver threads for it (on loopback only)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tencrypt.linux.sockets import listening_socket


def test_a_literal_is_bound_as_start_server_binds() -> None:
    sock = listening_socket("127.0.0.1", 0)
    assert sock is not None
    with sock:
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getblocking() is False
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0


def test_ipv6_literal_is_v6_only() -> None:
    try:
        sock = listening_socket("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert sock is not None
    with sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_a_name_is_left_to_start_server() -> None:
    assert listening_socket("localhost", 0) is None


def test_a_taken_address_is_an_oserror_and_leaks_no_socket() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", taken.getsockname()[1])


PROBE = """
import asyncio, json, os, sys
from tencrypt.linux.sockets import start_tcp_server

async def echo(reader, writer):
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()

async def main():
    server = await start_tcp_server(echo, sys.argv[1], 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping\\n")
    answer = await reader.readline()
    writer.close()
    server.close()
    await server.wait_closed()
    return {"answer": answer.decode(), "threads": len(os.listdir("/proc/self/task"))}

print(json.dumps(asyncio.run(main())))
"""


def serve_once(host: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, host], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return dict(json.loads(out))


def test_a_literal_serves_without_resolver_threads() -> None:
    assert serve_once("127.0.0.1") == {"answer": "ping\n", "threads": 1}


def test_a_name_still_serves_through_the_resolver() -> None:
    """The other way: what the literal path saves (the executor's threads: more than one)."""
    result = serve_once("localhost")
    assert result["answer"] == "ping\n"
    assert isinstance(result["threads"], int) and result["threads"] > 1
