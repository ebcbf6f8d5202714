"""Removing a lab completely, including one that died half-way through ``up``.

Nothing here trusts the state file: a crash can happen before it is written, or after it is
lost. What a lab owns is found by name instead:

1. processes whose pid file lies in the lab's state dir (the proxy launchers), if the pid is
   still the process we started (its command line names the state dir): SIGTERM, then SIGKILL;
2. every namespace named ``<lab>-*`` (lab names have no dash, so this never matches another
   lab) plus those recorded in ``<state>/netns/``: its processes are killed and it is deleted,
   which takes its links, routes, iptables rules and sockets with it;
3. ``/etc/netns/<lab>-*`` (the pods' resolv.conf), and the ``/run/tencrypt/netns-<inode>``
   state that ``tencrypt setup`` leaves in a pod that was patched but never unpatched;
4. any process left anywhere whose command line mentions the state dir (dnsmasq, the HTTP
   servers and the proxies all do), e.g. one spawned but not yet inside its namespace;
5. the state dir itself.

The lab never creates anything in the root namespace (veth pairs are created directly inside
the namespaces), so there is nothing to remove there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from tencrypt.errors import SetupError
from tencrypt.linux import netns
from tencrypt.linux.procs import PROC, alive, cmdline, read_pid

ETC_NETNS = Path("/etc/netns")
SETUP_STATE_ROOT = Path("/run/tencrypt")  # `tencrypt setup --state-dir` default


def stop(pid: int, timeout: float = 5.0, group: bool = False) -> bool:
    """SIGTERM ``pid`` (and its process group: ours lead their own), wait up to ``timeout``,
    then SIGKILL. Returns True if it went on SIGTERM alone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill in (os.killpg, os.kill) if group else (os.kill,):
            try:
                kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            netns.wait_for(lambda: not alive(pid), timeout=timeout, what=f"pid {pid} to exit")
            return sig == signal.SIGTERM
        except SetupError:
            continue
    return False


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def lab_namespaces(name: str, state_dir: Path) -> list[str]:
    marked = {p.name for p in (state_dir / "netns").glob("*")}
    return sorted(
        {ns for ns in netns.listed() if ns.startswith(f"{name}-")}
        | {ns for ns in marked if netns.exists(ns)}
    )


def _setup_state_dir(ns: str) -> Path | None:
    """Where ``tencrypt setup`` keeps its state for namespace ``ns`` (see linux/podnet.py:
    keyed by the namespace's inode number, which stat() of the bind mount returns)."""
    try:
        return SETUP_STATE_ROOT / f"netns-{os.stat(netns.NETNS_DIR / ns).st_ino}"
    except OSError:
        return None


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def stray_processes(state_dir: Path) -> list[int]:
    """Processes (not us, not our parents) whose command line mentions ``state_dir``."""
    mentions = re.compile(re.escape(str(state_dir)) + r"(/|\s|$)")
    mine = _ancestors()
    pids = [int(e.name) for e in PROC.iterdir() if e.name.isdigit()]
    return [pid for pid in pids if pid not in mine and mentions.search(cmdline(pid)) and alive(pid)]


def sweep(name: str, state_dir: Path, say: Callable[[str], None]) -> int:
    """Remove everything lab ``name`` made; returns how many things were removed."""
    removed = 0
    for pid_file in sorted((state_dir / "pids").glob("*.pid")):
        pid = read_pid(pid_file)
        if pid and alive(pid) and str(state_dir) in cmdline(pid):
            say(f"stopping {pid_file.stem} (pid {pid})")
            stop(pid, group=True)
            removed += 1
    for ns in lab_namespaces(name, state_dir):
        say(f"deleting namespace {ns}")
        # before the namespace goes: once it is gone, the kernel may give its inode number,
        # and with it this directory's name, to another lab's or a real pod's namespace
        setup_state = _setup_state_dir(ns)
        if setup_state and setup_state.is_dir():
            shutil.rmtree(setup_state, ignore_errors=True)
        netns.delete(ns)
        removed += 1
    if ETC_NETNS.is_dir():
        for etc in sorted(ETC_NETNS.glob(f"{name}-*")):
            shutil.rmtree(etc, ignore_errors=True)
            removed += 1
    for pid in stray_processes(state_dir):
        say(f"killing stray process {pid}: {cmdline(pid)[:80]}")
        stop(pid, timeout=2.0)
        removed += 1
    if state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
        removed += 1
    return removed
