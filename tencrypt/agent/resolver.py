"""Resolving the pods of this node to their sandboxes: the I/O half of ``sandbox.py``.

Modes (``tencrypt agent --sandbox``):
- ``auto`` (default): CRI when ``crictl`` is installed and a runtime socket exists (the one
  given with ``--cri-endpoint``, else containerd's, CRI-O's or cri-dockerd's default), else
  the /proc scan;
- ``cri``, ``proc``: only that one;
- ``annotation``: the pod's ``tencrypt.io/sandbox-pid`` annotation — for the lab and tests,
  where there is no runtime; never for a real cluster (see ``podstate``).

Rules:
- Whatever the mode, an answer is checked before it is used: the PID must be alive, and its
  network namespace must not be one of the node's own (this process's, PID 1's). A pod
  object or a runtime that names a host process must never get the node itself set up.
- A resolved sandbox is cached per pod and kept while its PID still lives in the same
  namespace. The costly look-ups (crictl, a walk of /proc) run at most once per
  ``interval`` seconds, for all the pods still unresolved at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from tencrypt.agent.podstate import PodInfo
from tencrypt.agent.reconcile import Sandbox
from tencrypt.agent.sandbox import (
    ProcInfo,
    parse_cgroup_pod_uid,
    parse_crictl_inspect_pid,
    parse_crictl_pods,
    parse_crictl_ps,
    parse_proc_stat,
    pick_sandbox,
)
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.agent")
MODES = ("auto", "cri", "proc", "annotation")
CRI_ENDPOINTS = (
    "unix:///run/containerd/containerd.sock",
    "unix:///var/run/crio/crio.sock",
    "unix:///var/run/cri-dockerd.sock",
)
CRICTL_TIMEOUT = 10.0


class Resolver:
    def __init__(
        self,
        mode: str = "auto",
        *,
        crictl: str = "crictl",
        endpoint: str | None = None,
        proc: Path = Path("/proc"),
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc, self.interval, self.clock = proc, interval, clock
        self.crictl, self.endpoint = crictl, endpoint
        self.mode = self._choose(mode)
        self.node_netns = {n for n in (self.netns_of("self"), self.netns_of(1)) if n}
        self.cache: dict[str, Sandbox] = {}
        self.next_lookup = 0.0
        self.ratelog = RateLimitedLog(log, per_key_interval=60.0)

    def _choose(self, mode: str) -> str:
        if mode != "auto":
            return mode
        if shutil.which(self.crictl):
            found = self.endpoint or next(
                (e for e in CRI_ENDPOINTS if Path(e.removeprefix("unix://")).exists()), None
            )
            if found:
                self.endpoint = found
                return "cri"
        return "proc"

    # -- the kernel's view ------------------------------------------------------------------

    def netns_of(self, pid: int | str) -> int | None:
        try:
            return os.stat(self.proc / str(pid) / "ns" / "net").st_ino
        except OSError:
            return None

    def valid(self, sandbox: Sandbox) -> bool:
        """The PID still lives in that namespace, and it is not the node's."""
        return sandbox.netns not in self.node_netns and self.netns_of(sandbox.pid) == sandbox.netns

    # -- resolving --------------------------------------------------------------------------

    def seed(self, uid: str, sandbox: Sandbox) -> None:
        """A sandbox known from a record (a previous agent's), used while it stays valid."""
        if self.valid(sandbox):
            self.cache[uid] = sandbox

    def resolve(self, pods: Iterable[PodInfo]) -> dict[str, Sandbox | None]:
        pods = list(pods)
        self.cache = {p.uid: s for p in pods if (s := self.cache.get(p.uid)) and self.valid(s)}
        missing = [p for p in pods if p.uid not in self.cache]
        now = self.clock()
        if missing and (self.mode == "annotation" or now >= self.next_lookup):
            self.next_lookup = now + self.interval
            for uid, sandbox in self._lookup(missing).items():
                if sandbox and self.valid(sandbox):
                    self.cache[uid] = sandbox
                elif sandbox:
                    self.ratelog.warn(
                        ("node-netns", uid),
                        "refusing sandbox pid %d of pod %s: it is in the node's network namespace",
                        sandbox.pid,
                        uid,
                    )
        return {p.uid: self.cache.get(p.uid) for p in pods}

    def _lookup(self, pods: list[PodInfo]) -> dict[str, Sandbox | None]:
        if self.mode == "annotation":
            return {p.uid: self._from_pid(p.sandbox_pid) for p in pods}
        if self.mode == "cri":
            return {uid: self._from_pid(pid) for uid, pid in self._cri(pods).items()}
        return self._scan_proc({p.uid for p in pods})

    def _from_pid(self, pid: int | None) -> Sandbox | None:
        netns = self.netns_of(pid) if pid else None
        return Sandbox(pid, netns) if pid and netns else None

    def _cri(self, pods: list[PodInfo]) -> dict[str, int | None]:
        sandboxes = parse_crictl_pods(self._run_crictl("pods", "--state", "ready", "-o", "json"))
        out: dict[str, int | None] = {}
        for pod in pods:
            sid = sandboxes.get(pod.uid)
            if not sid:
                continue
            pid = parse_crictl_inspect_pid(self._run_crictl("inspectp", "-o", "json", sid))
            if pid is None:  # no infrastructure process (CRI-O drop_infra_ctr): a container's
                running = self._run_crictl("ps", "--pod", sid, "--state", "running", "-o", "json")
                for cid in parse_crictl_ps(running):
                    pid = parse_crictl_inspect_pid(self._run_crictl("inspect", "-o", "json", cid))
                    if pid:
                        break
            out[pod.uid] = pid
        return out

    def _run_crictl(self, *args: str) -> str:
        argv = [
            self.crictl,
            *(["--runtime-endpoint", self.endpoint] if self.endpoint else []),
            *args,
        ]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=CRICTL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.ratelog.warn("crictl", "crictl %s failed: %s", args[0], exc)
            return ""
        if proc.returncode != 0:
            self.ratelog.warn(
                "crictl",
                "crictl %s failed (%d): %s",
                args[0],
                proc.returncode,
                proc.stderr.strip()[:300],
            )
            return ""
        return proc.stdout

    def _scan_proc(self, uids: set[str]) -> dict[str, Sandbox | None]:
        found: dict[str, list[ProcInfo]] = defaultdict(list)
        for entry in os.scandir(self.proc):
            if not entry.name.isdigit():
                continue
            try:
                uid = parse_cgroup_pod_uid((Path(entry.path) / "cgroup").read_text())
                if uid not in uids:
                    continue
                stat = parse_proc_stat((Path(entry.path) / "stat").read_text())
            except OSError:  # the process exited while we looked
                continue
            netns = self.netns_of(entry.name)
            if stat and stat[0] not in ("Z", "X") and netns:
                found[uid].append(ProcInfo(int(entry.name), stat[1], netns))
        return {uid: pick_sandbox(procs, self.node_netns) for uid, procs in found.items()}
