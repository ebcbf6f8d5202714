"""Where a file that a pod sees really lives on the node: pure reading of /proc/PID/mountinfo.

Why: container runtimes bind-mount each pod's resolv.conf from a file of the node. containerd
and CRI-O mount it read-only into the pod's infrastructure (pause) container — the process
the launcher enters — and writable into the application containers; all of them share the
node's file, so rewriting that file in place reaches every container of the pod.

Rules:
- A line of mountinfo (proc(5)) is: mount id, parent id, major:minor, root (the path inside
  the mounted filesystem), mount point (relative to the reading process's root), per-mount
  options, optional fields, ``-``, filesystem type, source, super options. Paths escape
  space, tab, newline and backslash as octal (``\\040``). Malformed lines are skipped.
- The mount holding a path is the one with the longest mount point at or above it; of mounts
  stacked on one point the last listed is on top.
- The node's path of a pod's file: the pod's mount of it names a device and a root inside
  that device; the node mount of the same device whose root is the longest prefix of it
  gives the node path. The caller must still check it is the same file (device and inode):
  a node mount can itself be hidden by a later one.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    mount_id: int
    parent_id: int
    dev: str  # "major:minor"
    root: str  # path of the mount's top inside its filesystem
    mount_point: str
    options: frozenset[str]  # per-mount options: "ro" or "rw", "nosuid", ...
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo file, in its order."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 2:
            continue
        if not (fields[0].isdigit() and fields[1].isdigit() and ":" in fields[2]):
            continue
        mounts.append(
            Mount(
                int(fields[0]),
                int(fields[1]),
                fields[2],
                _unescape(fields[3]),
                _unescape(fields[4]),
                frozenset(fields[5].split(",")),
                rest[0],
                _unescape(rest[1]),
            )
        )
    return mounts


def _under(path: str, top: str) -> str | None:
    """``path`` relative to ``top`` ("" when equal), or None when it is not at or below it."""
    if top == "/":
        return path.lstrip("/")
    if path == top:
        return ""
    return path[len(top) + 1 :] if path.startswith(top + "/") else None


def mount_of(mounts: Iterable[Mount], path: str) -> Mount | None:
    """The mount that ``path`` (absolute, normalised) lies in."""
    best: Mount | None = None
    for m in mounts:
        if _under(path, m.mount_point) is not None and (
            best is None or len(m.mount_point) >= len(best.mount_point)
        ):
            best = m
    return best


def node_path(pod_mounts: Iterable[Mount], path: str, node_mounts: Iterable[Mount]) -> str | None:
    """The path on the node (in the mount namespace of ``node_mounts``) of the file that the
    pod sees at ``path``, or None when no node mount shows that part of its filesystem."""
    path = posixpath.normpath(path)
    mount = mount_of(pod_mounts, path)
    if mount is None:
        return None
    below = _under(path, mount.mount_point)
    inside = posixpath.join(mount.root, below) if below else mount.root
    best: tuple[int, str] | None = None
    for m in node_mounts:
        rest = _under(inside, m.root)
        if m.dev == mount.dev and rest is not None and (best is None or len(m.root) > best[0]):
            best = (len(m.root), posixpath.join(m.mount_point, rest) if rest else m.mount_point)
    return best[1] if best else None
