"""Finding a pod's sandbox from what the node shows: pure parsing of the runtime's and the
kernel's text. The shell (``resolver.py``) runs the commands and reads the files.

Rules:
- A sandbox is reached through a PID (``nsenter --target PID --net``); any process of the pod
  will do, as all of a pod's containers share its network namespace. The namespace's inode,
  not the PID, says which sandbox it is (``reconcile.Sandbox``).
- CRI (``crictl``, any runtime): ``crictl pods --state ready -o json`` maps the pod's uid to
  its ready sandbox (the newest if a restarted pod briefly has two); ``crictl inspectp -o
  json`` gives the infrastructure container's ``info.pid`` (containerd; CRI-O). CRI-O without
  an infrastructure process (``drop_infra_ctr``) has no pid there: then a running container
  of the pod is used (``crictl ps --pod ID`` and ``crictl inspect``'s ``info.pid``).
- /proc: a process belongs to a pod when its cgroup path names ``pod<uid>`` — cgroupfs
  (``/kubepods/burstable/pod<uid>/<id>``) and systemd (``kubepods-burstable-pod<uid with _
  for ->.slice``) drivers, cgroup v1 and v2, and paths seen from another cgroup namespace
  (``/../..``). The sandbox is the earliest-started process of the pod that is not in one of
  the node's own network namespaces (the pause/pod process when there is one).
- Anything unreadable or unexpected gives None (no sandbox yet), never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from tencrypt.agent.reconcile import Sandbox

_HEX = "[0-9a-f]"
POD_CGROUP = re.compile(
    rf"pod({_HEX}{{8}}[-_]{_HEX}{{4}}[-_]{_HEX}{{4}}[-_]{_HEX}{{4}}[-_]{_HEX}{{12}})"
    r"(?:\.slice)?(?=/|$)",
    re.MULTILINE,
)


@dataclass(slots=True, frozen=True)
class ProcInfo:
    """What the /proc scan learns of one process of a pod."""

    pid: int
    start: int  # start time in clock ticks after boot (/proc/PID/stat field 22)
    netns: int  # inode of /proc/PID/ns/net


def parse_cgroup_pod_uid(text: str) -> str | None:
    """The pod uid named in the contents of /proc/PID/cgroup, if any."""
    match = POD_CGROUP.search(text.lower())
    return match.group(1).replace("_", "-") if match else None


def parse_proc_stat(text: str) -> tuple[str, int] | None:
    """(state, start time in ticks) from /proc/PID/stat. The command name (field 2) may hold
    spaces and parentheses: the fields that follow are counted from its last ``)``."""
    head, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or not head or len(fields) < 20 or not fields[19].isdigit():
        return None
    return fields[0], int(fields[19])


def pick_sandbox(procs: Iterable[ProcInfo], node_netns: Collection[int]) -> Sandbox | None:
    """The earliest-started process of a pod outside the node's network namespaces."""
    candidates = sorted(
        (p for p in procs if p.netns not in node_netns), key=lambda p: (p.start, p.pid)
    )
    return Sandbox(candidates[0].pid, candidates[0].netns) if candidates else None


def parse_crictl_pods(text: str) -> dict[str, str]:
    """``crictl pods -o json`` → {pod uid: id of its newest ready sandbox}."""
    best: dict[str, tuple[int, str]] = {}
    for item in _items(_json(text), "items"):
        meta = item.get("metadata") or {}
        uid, sid = meta.get("uid") if isinstance(meta, dict) else None, item.get("id")
        if item.get("state") != "SANDBOX_READY" or not isinstance(uid, str) or not sid:
            continue
        created = _int(item.get("createdAt"))
        if uid not in best or created > best[uid][0]:
            best[uid] = (created, str(sid))
    return {uid: sid for uid, (_, sid) in best.items()}


def parse_crictl_ps(text: str) -> list[str]:
    """``crictl ps --pod ID -o json`` → ids of the running containers, oldest first."""
    running = [
        (_int(c.get("createdAt")), str(c["id"]))
        for c in _items(_json(text), "containers")
        if c.get("state") == "CONTAINER_RUNNING" and c.get("id")
    ]
    return [cid for _, cid in sorted(running)]


def parse_crictl_inspect_pid(text: str) -> int | None:
    """``info.pid`` of ``crictl inspectp -o json`` or ``crictl inspect -o json``; None when
    the runtime reports no process (CRI-O's spoofed infra container, a stopped one)."""
    doc = _json(text)
    info = doc.get("info") if isinstance(doc, dict) else None
    if isinstance(info, str):  # crictl prints an info value verbatim if it is not JSON
        info = _json(info)
    pid = info.get("pid") if isinstance(info, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1 else None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def _items(doc: Any, key: str) -> list[dict[str, Any]]:
    items = doc.get(key) if isinstance(doc, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
