"""Named network namespaces and running programs inside them.

Thin wrappers around iproute2's ``ip netns`` (which also bind-mounts
``/etc/netns/<name>/resolv.conf`` for programs it starts), used by the lab, the
benchmarks and the namespace tests. Names carry a unique suffix so that runs never
collide (``unique_suffix``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tencrypt.errors import SetupError

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000  # linux/sched.h


def unique_suffix() -> str:
    """A short suffix unique to this process and call: pid plus 3 random hex digits."""
    return f"{os.getpid() % 100000}{secrets.token_hex(2)[:3]}"


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def listed() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def create(name: str) -> None:
    if not exists(name):
        sh(["ip", "netns", "add", name])
    sh(["ip", "-n", name, "link", "set", "lo", "up"])


def delete(name: str) -> None:
    """Kill every process still in the namespace, then remove it. Never raises for a missing one."""
    if not exists(name):
        return
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def run(
    name: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``name`` and capture its output."""
    return sh(exec_argv(name, argv), check=check, timeout=timeout, input=input)


def spawn(
    name: str, argv: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running program inside namespace ``name`` in its own process group."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            exec_argv(name, argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


def sh(
    argv: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise SetupError quoting the command and its stderr."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input
        )
    except FileNotFoundError as exc:
        raise SetupError(
            f"{argv[0]} not found: install it (see README, scripts/install.sh)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise SetupError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until true (never a bare sleep); SetupError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise SetupError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """This thread in network namespace ``name`` for the block; sockets and devices opened in
    it stay in that namespace after the thread returns home."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(target)
        os.close(home)
