"""The membership files: ``members.json`` in the setup state directory of each patched pod.

Where: ``<setup state dir>/netns-<inode of the pod's network namespace>/members.json`` — the
directory ``tencrypt setup`` keeps for that namespace (``linux/podnet.namespace_state_dir``),
which the proxy reads at start and watches (``core/membership.py``).

Rules:
- A file is written before its proxy starts (``Supervisor.launch``, after any undo), making
  the directory (0700, as setup does) if setup has not yet; the proxy's first start sees
  its project's members. A proxy whose file cannot be written is not started.
- Written atomically: a temporary file in the same directory, then a rename; mode 0644 (it
  holds addresses, no secret). A reader sees the old file or the new one.
- ``generation`` grows with every change of a file: the wall clock in milliseconds, or one
  more than the generation the file holds if that is larger. What this agent wrote is
  remembered per namespace; a file it did not write (a previous agent's, before an adopted
  proxy) is read once to continue from it. The clock covers what cannot be read: a file
  removed or damaged under a running proxy, which still holds the generation it loaded and
  would ignore a restart from 1. A file whose members are already right is not rewritten.
- ``remove`` deletes the file (and the directory if nothing else is left in it) once setup
  has undone the pod, so that nothing of the pod stays on the node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tencrypt.agent.cidrs import ClusterRanges
from tencrypt.agent.members import ProjectMembers
from tencrypt.core.membership import (
    FILE_NAME,
    Members,
    MembershipError,
    parse_members,
)
from tencrypt.linux.members import write_members


@dataclass(slots=True, frozen=True)
class Written:
    version: int  # the MemberView version it was computed from (-1: read from disk)
    members: Members
    ranges: ClusterRanges | None = None  # the cluster ranges it carries (None: read from disk)


class MembersFeed:
    def __init__(self, setup_state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.root, self.clock = setup_state_dir, clock
        self.written: dict[int, Written] = {}  # netns inode -> what its file holds
        self.writes = 0  # files written (re-written) so far
        self.ranges = ClusterRanges()  # the cluster's shape as last discovered (agent/cidrs.py)

    def path(self, netns: int) -> Path:
        return self.root / f"netns-{netns}" / FILE_NAME

    def is_current(self, netns: int, members: ProjectMembers | tuple[str, int]) -> bool:
        """True if the file already holds ``members`` and the cluster ranges (by project,
        version and ranges: no I/O)."""
        project, version = (
            (members.project, members.version) if isinstance(members, ProjectMembers) else members
        )
        known = self.written.get(netns)
        return (
            known is not None
            and known.version == version
            and known.members.project == project
            and known.ranges == self.ranges
        )

    def write(self, netns: int, members: ProjectMembers) -> Members | None:
        """Make the namespace's file say ``members`` (format 2 with the cluster ranges, or
        format 1 when ``members.table`` is None); the ``Members`` written, or None if the
        file said so already. ``OSError`` if it cannot be written."""
        if self.is_current(netns, members):
            return None
        r = self.ranges
        known = self.written.get(netns) or self._read(netns)
        doc = Members(
            members.project,
            0,
            members.pods,
            members.services,
            members.table,
            r.service_cidrs if members.table is not None else (),
            r.pod_cidrs if members.table is not None else (),
            r.zone if members.table is not None else None,
        )
        if known is not None and replace(known.members, generation=0) == doc:
            self.written[netns] = Written(members.version, known.members, r)
            return None
        generation = max(known.members.generation + 1 if known else 1, int(self.clock() * 1000))
        doc = replace(doc, generation=generation)
        write_members(self.path(netns).parent, doc)
        self.writes += 1
        self.written[netns] = Written(members.version, doc, r)
        return doc

    def remove(self, netns: int) -> None:
        """Forget the namespace: its file goes, and its directory if it is empty now."""
        self.written.pop(netns, None)
        path = self.path(netns)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # absent, or setup's state still there
            pass

    def forget(self, netns: int) -> None:
        """The directory was removed by someone else (an unreachable pod's leftovers)."""
        self.written.pop(netns, None)

    def _read(self, netns: int) -> Written | None:
        try:
            return Written(-1, parse_members(self.path(netns).read_bytes()))
        except (OSError, MembershipError):
            return None
