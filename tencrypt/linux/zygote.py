"""A warm parent that forks proxies: one interpreter's imports shared by every pod of a node.

A proxy started as its own program (``tencrypt run``, exec'd by the launcher) imports Python,
asyncio, cryptography, the C extension and Tencrypt itself into memory of its own: most of
its RSS is the same bytes in every proxy of the node, paid again per pod. The *zygote*
imports all of that once (``zygotecmd.warm``), collects and freezes its heap (``gc.collect()``,
``gc.freeze()``: the collector of a child never walks, and so never writes to, the objects
it inherited), and then forks one child per pod. A child's pages stay shared with the zygote
and with its siblings until one of them writes to them (copy on write).

Rules:
- The zygote is single-threaded and never runs an event loop: a fork copies one thread, and
  an asyncio loop or a lock held by another thread must not be half-inherited. It configures
  no logging (the child's ``cli.main`` does, as in ``tencrypt run``).
- One request, one child: a ``SOCK_SEQPACKET`` message carrying ``{"argv": [...], "env":
  {...} | null, "before": [...] | null}`` (JSON) and two file descriptors (SCM_RIGHTS): the
  pod's network namespace (an open ``/proc/<sandbox pid>/ns/net`` or ``/run/netns/NAME``, so a recycled PID cannot
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
  ``tencrypt.cli.main(["run", *argv])`` (with `run`'s parser, built once in the zygote), the
  same code, logs, readiness line and exit codes, and ``os._exit`` with its code (never the
  zygote's atexit handlers).
- The zygote reaps its children (SIGCHLD) so none stays a zombie; whoever supervises a
  proxy watches its PID and start time (/proc/PID/stat), as the agent does for a proxy it
  adopted. Children survive the zygote: they are in sessions of their own.
- EOF on the socket (the client closed it) ends the zygote, not its children. The client
  replaces a zygote that died, or did not answer in time (a late answer must never be taken
  for the next request's).

This module is the protocol and the client: ``Zygote`` starts the zygote (``python -m
tencrypt.zygotecmd FD``, the server side: it imports ``tencrypt.cli`` and all of `run`, which
the agent importing this client must not) on one end of a socketpair, and ``spawn`` asks for
a proxy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeGuard

MAX_REQUEST = 1 << 16  # bytes of one request or answer


class ZygoteError(Exception):
    """The zygote could not start a proxy (its message says why)."""


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


class Zygote:
    """The client: starts the zygote and asks it for proxies."""

    def __init__(
        self,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.python, self.env, self.log = python, env, log
        self.starts = 0
        self._start()

    def _start(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # its output (the zygote's own; a proxy's goes to its log): ``log``, else inherited
        out = open(self.log, "ab") if self.log else None  # noqa: SIM115 - the child's
        try:
            self.proc = subprocess.Popen(
                [self.python, "-m", "tencrypt.zygotecmd", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(theirs.fileno(),),
                env=dict(self.env) if self.env is not None else None,
                start_new_session=True,
            )
        finally:
            theirs.close()
            if out is not None:
                out.close()
        self.starts += 1

    def _replace(self) -> None:
        """A zygote that died, or whose answer is late (a later request would read it), is
        ended and a new one started: the next request goes to the new one."""
        self.close(timeout=1.0)
        self._start()

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
        ``before`` succeeded there (e.g. setup); its PID. ZygoteError if the zygote refused,
        or died or did not answer (then it is replaced: the next request goes to a new one;
        a zygote found dead before a request is replaced first)."""
        if self.proc.poll() is not None:
            self._replace()
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
                self._replace()
                raise ZygoteError(f"the zygote did not answer: {exc}") from exc
        finally:
            os.close(ns_fd)
            os.close(out_fd)
        try:
            reply = json.loads(answer) if answer else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._replace()
            raise ZygoteError("the zygote is gone" if not answer else "the zygote answered garbage")
        if not isinstance(reply.get("pid"), int):
            raise ZygoteError(str(reply.get("error", reply)))
        return int(reply["pid"])

    def close(self, timeout: float = 10.0) -> None:
        """Close the socket: the zygote exits (its children run on); killed after
        ``timeout``."""
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
