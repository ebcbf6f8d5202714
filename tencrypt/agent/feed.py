"""The membership files: each patched pod's ``members.json``, in the agent's own directory for it.

Where: ``<agent state dir>/pods/<pod UID>/members.json`` (``Supervisor.pod_dir``, beside the
pod's record and log), handed to the pod's ``tencrypt setup`` and ``tencrypt run`` as
``--members-file``. A pod's UID is never given to another pod. The inode number of its network
namespace, which named these files before, is (core/netnsid.py): a file kept in setup's
``netns-<inode>`` directory was read by the next pod whose namespace got that number — another
project's membership, in the worst case.

Rules:
- A file is written before its proxy starts (``Supervisor.launch``, after any undo), making
  the pod's directory (0700) if needed; the proxy's first start sees its project's members.
  A proxy whose file cannot be written is not started.
- Written atomically: a temporary file in the same directory, then a rename; mode 0644 (it
  holds addresses, no secret). A reader sees the old file or the new one.
- ``generation`` grows with every change of a file: the wall clock in milliseconds, or one
  more than the generation the file holds if that is larger. What this agent wrote is
  remembered per pod; a file it did not write (a previous agent's, before an adopted
  proxy) is read once to continue from it. The clock covers what cannot be read: a file
  removed or damaged under a running proxy, which still holds the generation it loaded and
  would ignore a restart from 1. A file whose members are already right is not rewritten.
- ``remove`` deletes the file once setup has undone the pod (or its namespace is gone); the
  supervisor's ``forget`` then removes the pod's directory, so nothing of the pod stays.
- A proxy adopted from an agent that still wrote into setup's directory reads
  ``<setup state dir>/netns-<inode>/members.json``: ``read_by`` points its pod's file there
  (its namespace is alive: the proxy holds it) until the pod is undone.
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
class PodPolicy:
    """A pod's NetworkPolicy as its file carries it (core/membership.py rule 4)."""

    document: str  # tencrypt-netpol/1, canonical JSON text
    tunnel_blocked: tuple[tuple[str, str], ...] = ()  # (direction, policy)


@dataclass(slots=True, frozen=True)
class Written:
    version: int  # the MemberView version it was computed from (-1: read from disk)
    members: Members
    ranges: ClusterRanges | None = None  # the cluster ranges it carries (None: read from disk)


class MembersFeed:
    def __init__(self, pods_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.root, self.clock = pods_dir, clock
        self.written: dict[str, Written] = {}  # pod UID -> what its file holds
        self.elsewhere: dict[str, Path] = {}  # pod UID -> where an adopted older proxy reads
        self.writes = 0  # files written (re-written) so far
        self.ranges = ClusterRanges()  # the cluster's shape as last discovered (agent/cidrs.py)

    def path(self, uid: str) -> Path:
        return self.elsewhere.get(uid) or self.root / uid / FILE_NAME

    def read_by(self, uid: str, path: Path) -> None:
        """The pod's proxy reads ``path``, not ``path(uid)`` (an adopted older proxy)."""
        self.elsewhere[uid] = path

    def is_current(self, uid: str, members: ProjectMembers | tuple[str, int]) -> bool:
        """True if the file already holds ``members`` and the cluster ranges (by project,
        version and ranges: no I/O)."""
        project, version = (
            (members.project, members.version) if isinstance(members, ProjectMembers) else members
        )
        known = self.written.get(uid)
        return (
            known is not None
            and known.version == version
            and known.members.project == project
            and known.ranges == self.ranges
        )

    def write(
        self, uid: str, members: ProjectMembers, policy: PodPolicy | None = None
    ) -> Members | None:
        """Make the pod's file say ``members`` (format 2 with the cluster ranges and the pod's
        ``policy``, or format 1 when ``members.table`` is None); the ``Members`` written, or
        None if the file said so already. ``OSError`` if it cannot be written."""
        if self.is_current(uid, members):
            return None
        r = self.ranges
        known = self.written.get(uid) or self._read(uid)
        v2 = members.table is not None
        doc = Members(
            members.project,
            0,
            members.pods,
            members.services,
            members.table,
            r.service_cidrs if v2 else (),
            r.pod_cidrs if v2 else (),
            r.zone if v2 else None,
            policy.document if v2 and policy else None,
            policy.tunnel_blocked if v2 and policy else (),
            pod_ips=members.pod_ips if v2 else (),
        )
        if known is not None and replace(known.members, generation=0) == doc:
            self.written[uid] = Written(members.version, known.members, r)
            return None
        generation = max(known.members.generation + 1 if known else 1, int(self.clock() * 1000))
        doc = replace(doc, generation=generation)
        write_members(self.path(uid).parent, doc)
        self.writes += 1
        self.written[uid] = Written(members.version, doc, r)
        return doc

    def remove(self, uid: str) -> None:
        """Forget the pod: its file goes (the directory is the supervisor's)."""
        path = self.path(uid)
        self.written.pop(uid, None)
        self.elsewhere.pop(uid, None)
        path.unlink(missing_ok=True)

    def _read(self, uid: str) -> Written | None:
        try:
            return Written(-1, parse_members(self.path(uid).read_bytes()))
        except (OSError, MembershipError):
            return None
