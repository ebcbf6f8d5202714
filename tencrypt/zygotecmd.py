"""The zygote's server side (tencrypt/linux/zygote.py has the rules and the client): warm up
once, then fork one proxy per request.

``python -m tencrypt.zygotecmd FD`` imports what a proxy runs (``warm``: ``PRELOAD``, with ssl
kept out as `tencrypt run` keeps it out), collects and freezes the heap, prints "tencrypt
zygote: ready" on stderr and answers requests on the inherited ``SOCK_SEQPACKET`` socket FD
until its client closes it. Each request is parsed by ``zygote.parse_request``; the child
``become_proxy`` turns into the pod's proxy and runs ``tencrypt.cli.main(["run", ...])``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

from tencrypt.linux.zygote import MAX_REQUEST, parse_request

CLONE_NEWNET = 0x40000000  # linux/sched.h
PR_SET_NAME = 15  # linux/prctl.h
CHILD_NAME = b"tencrypt-run"  # a forked proxy's /proc/PID/comm (its cmdline is the zygote's)

# What `tencrypt run` imports, imported here once for every child. cli.main imports the run
# handler's module; runcmd.serve imports some inside the function, and the proxy more once it
# runs (found with the module list of a forked proxy once ready, bench/results/idle.md):
# the netfilter queues, the GSO socket, the C extension (tencrypt.fastpath loads it lazily),
# the executor that applies effects, and the idna codec that a socket's str host needs.
PRELOAD = (
    "ctypes",  # allocator.tune, and setns here
    "tencrypt.cli",
    "tencrypt.runcmd",
    "tencrypt.linux.metrics",
    "tencrypt.linux.podnet",
    "tencrypt.linux.dns",
    "tencrypt.linux.inbound",
    "tencrypt.linux.nfqueue",
    "tencrypt.linux.gso",
    "tencrypt.fastpath",
    "tencrypt._fastpath",
    "concurrent.futures.thread",
    "encodings.idna",
)


def warm(preload: Sequence[str] = PRELOAD) -> tuple[list[str], argparse.ArgumentParser]:
    """Import what a proxy needs, as `tencrypt run` would (ssl kept out), build `run`'s
    argument parser once (every child parses with it: not built again in each), then
    freeze the heap. The modules imported, and the parser."""
    import importlib

    from tencrypt import cli

    cli.keep_out("run")
    before = set(sys.modules)
    for name in preload:
        importlib.import_module(name)
    parser = cli.build_parser(only="run")
    gc.collect()
    gc.freeze()
    return sorted(set(sys.modules) - before), parser


def reap(_signum: int = 0, _frame: object = None) -> None:
    """Collect every child that has exited (SIGCHLD handler)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into the pod's network namespace")


def set_name(name: bytes) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def become_proxy(
    sock: socket.socket,
    parser: argparse.ArgumentParser | None,
    netns_fd: int,
    out_fd: int,
    argv: list[str],
    env: dict[str, str] | None,
    before: list[str] | None = None,
) -> int:
    """In the child: turn into the pod's proxy and run it (the module's rules); its exit code."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    sock.close()
    os.setsid()
    setns(netns_fd)
    os.close(netns_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    for fd in (devnull, out_fd):
        if fd > 2:
            os.close(fd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    set_name(CHILD_NAME)
    if before:
        done = subprocess.run(before, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            print(
                f"tencrypt zygote: {before[0]} exited with {done.returncode}; no proxy",
                file=sys.stderr,
                flush=True,
            )
            return done.returncode if done.returncode > 0 else 1
    import logging

    logging.root.handlers.clear()  # cli.main's basicConfig configures it, as in `run`
    from tencrypt import cli

    sys.argv = ["tencrypt", "run", *argv]
    return cli.main(["run", *argv], parser=parser)


def handle(
    sock: socket.socket, data: bytes, fds: list[int], parser: argparse.ArgumentParser | None
) -> dict[str, object]:
    """One request: fork the proxy, or say why not. Closes the descriptors it was given."""
    try:
        req = parse_request(data)
        if req is None or len(fds) != 2:
            return {"error": "malformed request: JSON {argv, env} and two descriptors expected"}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; tests see what it does from outside
            code = 70  # EX_SOFTWARE: the child failed before `run` could say why
            try:
                code = become_proxy(sock, parser, fds[0], fds[1], *req)
            except SystemExit as exc:  # argparse's --help and usage errors, as `run` exits
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException as exc:  # noqa: BLE001 - a child never returns to the loop
                try:
                    os.write(2, f"tencrypt zygote: the proxy failed: {exc!r}\n".encode())
                except OSError:
                    pass
            finally:
                for stream in (sys.stdout, sys.stderr):  # os._exit flushes nothing
                    try:
                        stream.flush()
                    except (OSError, ValueError):
                        pass
                os._exit(code)
        return {"pid": pid}
    except OSError as exc:
        return {"error": f"fork failed: {exc}"}
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def serve(sock: socket.socket, parser: argparse.ArgumentParser | None = None) -> int:
    """Answer requests until the client closes its end."""
    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 4)
        except ConnectionResetError:
            return 0
        if not data and not fds:
            return 0
        reply = handle(sock, data, fds, parser)
        try:
            sock.send(json.dumps(reply).encode())
        except (BrokenPipeError, ConnectionResetError):
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tencrypt.zygotecmd FD``: serve on inherited socket FD."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m tencrypt.zygotecmd FD", file=sys.stderr)
        return 2
    modules, parser = warm()
    sock = socket.socket(fileno=int(args[0]))
    print(f"tencrypt zygote: ready: {len(modules)} modules warm", file=sys.stderr, flush=True)
    return serve(sock, parser)


if __name__ == "__main__":
    sys.exit(main())
