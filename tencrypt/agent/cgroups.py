"""A proxy leaves the agent container's cgroup for its pod's (``agent --proxy-cgroup sandbox``).

Why: a container's runtime stops it by killing every process in its cgroup (a hostPID
container has no PID namespace to end), so proxies started by the agent die with the agent
container: an agent restart or a DaemonSet upgrade stops every proxy of the node. Moved
into the cgroup of their pod's sandbox (the infrastructure container's, or the process the
agent enters), they outlive the agent container, and the next agent adopts them
(``--on-exit keep``); they still die with their pod, as a sidecar would, and their memory is
charged to the pod, where the kubelet and the OOM killer account it.

Rules:
1. The sandbox's cgroups are read from ``/proc/SANDBOX/cgroup`` in the node's cgroup
   namespace (the agent's own may be private: its paths would be relative, and the kernel
   refuses to move a process out of the namespace's subtree), so ``move`` runs itself under
   ``nsenter --target 1 --cgroup``; the hierarchies are reached through the node's cgroupfs
   mounted into the agent container (``/host/sys/fs/cgroup`` in daemonset.yaml; on the node
   itself, its own ``/sys/fs/cgroup``), found in this process's mountinfo.
2. Every hierarchy the sandbox is in is joined: cgroup v2's one, or each v1 hierarchy
   (``cpu``, ``memory``, ``pids``, ``name=systemd`` ...); a runtime may read any of them to
   find what to kill.
3. A move that fails is reported, never fatal: that proxy then stops with the agent, as
   before.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tencrypt.agent")


@dataclass(frozen=True, slots=True)
class Mount:
    point: str  # where the hierarchy is mounted (in PID 1's mount namespace)
    root: str  # the part of the hierarchy mounted there
    controllers: frozenset[str]  # v1: its controllers and name=...; v2: empty
    v2: bool


def parse_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup hierarchies mounted, from a mountinfo file (proc(5))."""
    mounts: list[Mount] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(","))
        v2 = tail[0] == "cgroup2"
        controllers = (
            frozenset()
            if v2
            else frozenset(o for o in options if o in V1_CONTROLLERS or o.startswith("name="))
        )
        mounts.append(Mount(_unescape(fields[4]), _unescape(fields[3]), controllers, v2))
    return mounts


V1_CONTROLLERS = frozenset(
    {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio"}
    | {"blkio", "perf_event", "hugetlb", "pids", "rdma", "misc"}
)


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def targets(cgroup: str, mounts: list[Mount]) -> list[str]:
    """The sandbox's cgroup directory in every hierarchy it is in (rule 2): for each, a mount
    of that hierarchy whose root holds the sandbox's path (a container's own cgroupfs is
    rooted at its own cgroup and does not; the node's, mounted into it, is rooted at /).
    A hierarchy no such mount shows is skipped."""
    dirs: list[str] = []
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        wanted = frozenset(n for n in names.split(",") if n)
        mount = next(
            (
                m
                for m in mounts
                if (m.v2 if not wanted else m.controllers == wanted)
                and (m.root == "/" or path == m.root or path.startswith(m.root + "/"))
            ),
            None,
        )
        if mount is None:
            continue
        rel = path[len(mount.root) :] if mount.root != "/" else path
        dirs.append(str(Path(mount.point) / rel.lstrip("/")))
    return dirs


def join(pid: int, sandbox: int) -> list[str]:
    """Move ``pid`` into ``sandbox``'s cgroups (rules 1 and 2); run in the node's cgroup
    namespace. The directories joined; OSError when one cannot be."""
    cgroup = Path(f"/proc/{sandbox}/cgroup").read_text()
    mounts = parse_mounts(Path("/proc/self/mountinfo").read_text())
    joined = []
    for directory in targets(cgroup, mounts):
        Path(directory, "cgroup.procs").write_text(f"{pid}\n")
        joined.append(directory)
    if not joined:
        raise OSError(
            f"no cgroup hierarchy of pid {sandbox} is mounted here (mount the node's "
            "/sys/fs/cgroup into the agent container: daemonset.yaml)"
        )
    return joined


def alike(pid: int, sandbox: int, proc: Path = Path("/proc")) -> bool:
    """``pid`` is in every cgroup ``sandbox`` is in already (both read in this process's
    cgroup namespace, so alike paths mean alike cgroups); False when either cannot be read."""
    try:
        mine = (proc / str(pid) / "cgroup").read_text()
        theirs = (proc / str(sandbox) / "cgroup").read_text()
    except OSError:
        return False
    return bool(mine) and mine == theirs


def move(pid: int, sandbox: int) -> bool:
    """Rule 1: ``join`` in the node's cgroup namespace (a child under nsenter; where PID 1's
    namespace cannot be entered, the child runs in this one: a process on the node, or a
    container sharing the node's); rule 3: True when moved, else False and a warning."""
    child = [sys.executable, "-m", __name__, str(pid), str(sandbox)]
    done = _run(["nsenter", "--target", "1", "--cgroup", "--", *child])
    if done.returncode != 0 and done.stderr.startswith("nsenter:"):
        log.debug("cannot enter PID 1's cgroup namespace (%s): moving from this one", done.stderr)
        done = _run(child)
    if done.returncode != 0:
        log.warning(
            "proxy pid %d stays in the agent's cgroup (%s): it will stop with the agent container",
            pid,
            (done.stderr.strip().splitlines() or ["unknown error"])[-1],
        )
        return False
    log.debug("proxy pid %d joined its pod's cgroups: %s", pid, done.stdout.strip())
    return True


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 1, "", f"cannot run {argv[0]}: {exc}")


def main(argv: list[str]) -> int:
    """``PID SANDBOX``: join (in the namespace this runs in); ``--via-node PID SANDBOX``: the
    launcher's call, ``move`` (which enters the node's cgroup namespace first)."""
    if argv[:1] == ["--via-node"]:
        logging.basicConfig(level=logging.INFO, format="tencrypt-nsenter: %(message)s")
        try:
            return 0 if move(int(argv[1]), int(argv[2])) else 1
        except (IndexError, ValueError):
            print("usage: --via-node PID SANDBOX", file=sys.stderr)
            return 2
    try:
        pid, sandbox = int(argv[0]), int(argv[1])
        print(" ".join(join(pid, sandbox)))
    except (IndexError, ValueError, OSError) as exc:
        print(f"cannot move the proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
