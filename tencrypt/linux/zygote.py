"""A warm parent that forks proxies: one interpreter's imports shared by every pod of a node.

A proxy started as its own program (``tencrypt run``, exec'd by the launcher) imports Python,
asyncio, cryptography, the C extension and Tencrypt itself into memory of its own: most of
its RSS is the same bytes in every proxy of the node, paid again per pod. The *zygote*
imports all of that once (``warm``), collects and freezes its heap (``gc.collect()``,
``gc.freeze()``: the collector of a child never walks, and so never writes to, the objects
it inherited), and then forks one child per pod. A child's pages stay shared with the zygote
and with its siblings until one of them writes to them (copy on write).

Rules:
- The zygote is single-threaded and never runs an event loop: a fork copies one thread, and
  an asyncio loop or a lock held by another thread must not be half-inherited. It configures
  no logging (the child's ``cli.main`` does, as in ``tencrypt run``).
- One request, one child: a ``SOCK_SEQPACKET`` message carrying ``{"argv": [...], "env":
  {...} | null, "before": [...] | null}`` (JSON) and two file descriptors (SCM_RIGHTS): the pod's network namespace
  (an open ``/proc/<sandbox pid>/ns/net`` or ``/run/netns/NAME``, so a recycled PID cannot
  redirect it) and the file the proxy's stdout and stderr go to (the pod's log). The answer
  is ``{"pid": N}`` or ``{"error": "..."}``. A malformed request is answered with an error,
  never a crash, and the descriptors it carried are closed.
- The child becomes what ``nsenter --net -- tencrypt run ARGV`` would have made: its own
  session and process group (the supervisor signals the group), the default signal
  dispositions, the pod's network namespace (only that one, as the launcher enters only
  that one), stdin ``/dev/null``, stdout and stderr on the log, ``env`` as its environment
  when given; ``before`` (a command, e.g. the launcher's ``--setup-only``: `tencrypt setup`
  in the pod) run there and waited for, its output on the log, and a failure of it the
  child's exit code, as the launcher's ``set -e`` would have it; then
  ``tencrypt.cli.main(["run", *argv])``, the same code, logs, readiness line and exit codes,
  and ``os._exit`` with its code (never the zygote's atexit handlers).
- The zygote reaps its children (SIGCHLD) so none stays a zombie; whoever supervises a
  proxy watches its PID and start time (/proc/PID/stat), as the agent does for a proxy it
  adopted. Children survive the zygote: they are in sessions of their own.
- EOF on the socket (the client closed it) ends the zygote, not its children.

``Zygote`` is the client: it starts ``python -m tencrypt.linux.zygote`` on one end of a
socketpair and ``spawn`` asks for a proxy.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeGuard

CLONE_NEWNET = 0x40000000  # linux/sched.h
PR_SET_NAME = 15  # linux/prctl.h
MAX_REQUEST = 1 << 16
CHILD_NAME = b"tencrypt-run"  # /proc/PID/comm of a forked proxy (its cmdline is the zygote's)

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


class ZygoteError(Exception):
    """The zygote could not start a proxy (its message says why)."""


def warm(preload: Sequence[str] = PRELOAD) -> list[str]:
    """Import what a proxy needs, as `tencrypt run` would (ssl kept out), build the run
    parser once (argparse's lazy imports), then freeze the heap. The modules imported."""
    import importlib

    from tencrypt import cli

    cli.keep_out("run")
    before = set(sys.modules)
    for name in preload:
        importlib.import_module(name)
    cli.build_parser(only="run")
    gc.collect()
    gc.freeze()
    return sorted(set(sys.modules) - before)


Request = tuple[list[str], dict[str, str] | None, list[str] | None]


def _words(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(a, str) for a in value)


def parse_request(data: bytes) -> Request | None:
    """``(argv, env, before)`` from a request's JSON; None if it is not one."""
    try:
        req = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(req, dict):
        return None
    argv, env, before = req.get("argv"), req.get("env"), req.get("before")
    if not _words(argv):
        return None
    if before is not None and not (_words(before) and before):
        return None
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        return None
    return argv, env, before


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
    return cli.main(["run", *argv])


def handle(sock: socket.socket, data: bytes, fds: list[int]) -> dict[str, object]:
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
                code = become_proxy(sock, fds[0], fds[1], *req)
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


def serve(sock: socket.socket) -> int:
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
        reply = handle(sock, data, fds)
        try:
            sock.send(json.dumps(reply).encode())
        except (BrokenPipeError, ConnectionResetError):
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tencrypt.linux.zygote FD``: serve on inherited socket FD."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m tencrypt.linux.zygote FD", file=sys.stderr)
        return 2
    modules = warm()
    sock = socket.socket(fileno=int(args[0]))
    print(f"tencrypt zygote: ready: {len(modules)} modules warm", file=sys.stderr, flush=True)
    return serve(sock)


class Zygote:
    """The client: starts the zygote and asks it for proxies."""

    def __init__(
        self,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # its output (the zygote's own; a proxy's goes to its log): ``log``, else inherited
        out = open(log, "ab") if log else None  # noqa: SIM115 - the child's
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "tencrypt.linux.zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(theirs.fileno(),),
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        finally:
            theirs.close()
            if log:
                out.close()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spawn(
        self,
        netns: str | Path,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        before: Sequence[str] | None = None,
    ) -> int:
        """Fork a proxy running ``tencrypt run ARGV`` in network namespace ``netns`` (a path:
        ``/proc/PID/ns/net``, ``/run/netns/NAME``), its output appended to ``log``, after
        ``before`` succeeded there (e.g. setup); its PID.
        ZygoteError if the zygote refused or is gone."""
        ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        out_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            request = json.dumps(
                {
                    "argv": list(argv),
                    "env": dict(env) if env else None,
                    "before": list(before) if before else None,
                }
            )
            self.sock.settimeout(timeout)
            try:
                socket.send_fds(self.sock, [request.encode()], [ns_fd, out_fd])
                answer = self.sock.recv(MAX_REQUEST)
            except OSError as exc:
                raise ZygoteError(f"the zygote does not answer: {exc}") from exc
        finally:
            os.close(ns_fd)
            os.close(out_fd)
        if not answer:
            raise ZygoteError("the zygote is gone")
        reply = json.loads(answer)
        if "pid" not in reply:
            raise ZygoteError(str(reply.get("error", reply)))
        return int(reply["pid"])

    def close(self, timeout: float = 10.0) -> None:
        """Close the socket: the zygote exits (its children run on)."""
        self.sock.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
