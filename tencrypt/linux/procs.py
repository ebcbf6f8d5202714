"""Processes by pid, as /proc shows them: pid files, command lines, liveness.

A pid file may outlive its process, and the pid may be reused: callers that must know it is
still *their* process check ``cmdline`` too. A zombie (state Z) or dead (X) process counts as
gone: it runs nothing, it only waits for its parent to reap it.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def read_pid(path: Path) -> int | None:
    """The pid a pid file holds, or None (no file, empty, not a number)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> str:
    """The process's command line, words joined by spaces; "" if it is gone."""
    try:
        return (
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its parent does not count)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # the command name (field 2) may hold spaces and parentheses: count from its last ")"
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
