"""Patching a lab pod: the node-side launcher puts Tencrypt into it, and takes it out again.

Stages of ``patch``:
 1. refuse if a proxy this lab started still runs in the pod;
 2. (the lab playing the node agent) write the project's membership to the pod's file in the
    lab's state dir, ``<state>/members/<pod>.json``: keyed by the pod's name within this lab's
    life, never by its namespace's inode number, which the kernel gives the next namespace
    (core/netnsid.py); ``--no-members`` removes it instead. In a dual-stack or IPv6-only lab
    it holds every family: the pods' IPv6 addresses, the Services' IPv6 cluster IPs and
    endpoints (from the IPv6 EndpointSlices), both families' ``serviceCIDRs`` and
    ``podCIDRs``, and ``podIPs``: each pod's addresses in ``status.podIPs`` order (absent
    from an IPv4 lab's file, whose pods have one address each: the file is as before);
 3. start ``scripts/tencrypt-nsenter.sh --netns <pod ns> -- --psk-file <key file>
    [--members-file <its file>] [--no-strict]`` detached (its own session, so it outlives
    ``tencrypt lab patch``), with ``--members-file`` in ``TENCRYPT_SETUP_ARGS`` too and
    ``TENCRYPT_BIN`` set to the ``tencrypt`` next to this Python, output to
    ``<state>/logs/<pod>.tencrypt.log`` and its pid to ``<state>/pids/<pod>.tencrypt.pid``;
    the launcher runs ``tencrypt setup`` and then *execs* ``tencrypt run``, so the pid we keep
    is the proxy's own; the key file is the pod's own ring if ``write_pod_keys`` wrote one (a
    key rotation, the lab playing the agent), else the project's key;
 4. poll the log for the line ``tencrypt run`` prints when it serves ("tencrypt: ready"),
    bounded; if the launcher exits first or time runs out, stop it, undo the setup and fail
    with the log's tail.

``unpatch``: SIGTERM the proxy (SIGKILL after a grace period), then the launcher with
``--undo`` (``tencrypt setup --undo`` in the pod), which restores routes and resolv.conf;
then the pod's membership file goes, as the agent removes its own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tencrypt.agent.members import MemberView
from tencrypt.core.membership import Members, render_members
from tencrypt.core.psk import KeySet
from tencrypt.errors import SetupError, UsageError
from tencrypt.lab import cleanup, netpolicy, services
from tencrypt.lab.topology import Pod, family_of
from tencrypt.linux import netns, procs
from tencrypt.linux.files import write_atomic
from tencrypt.linux.keyfile import write_key_file

if TYPE_CHECKING:
    from tencrypt.lab.view import LabView as Lab

READY = "tencrypt: ready"
METRICS = "127.0.0.1:9137"  # on the pod's own loopback: `lab exec POD -- curl -s METRICS/metrics`
READY_TIMEOUT = 30.0  # seconds: setup + interpreter start-up on a loaded 2-core machine
STOP_TIMEOUT = 10.0  # seconds of grace between SIGTERM and SIGKILL


def launcher() -> Path:
    source_tree = Path(__file__).resolve().parents[2] / "scripts" / "tencrypt-nsenter.sh"
    if source_tree.exists():
        return source_tree
    found = shutil.which("tencrypt-nsenter.sh")
    if not found:
        raise SetupError("scripts/tencrypt-nsenter.sh not found (run from a source checkout)")
    return Path(found)


def tencrypt_bin() -> Path:
    return Path(sys.executable).parent / "tencrypt"


def launcher_env(setup_args: tuple[str, ...] = ()) -> dict[str, str]:
    """The launcher's environment, as the agent's: by default no setup arguments but those
    ``patch`` adds (``--members-file``: the DaemonSet's agent passes nothing else), so setup
    takes the cluster's ranges from the membership file."""
    env = {**os.environ, "TENCRYPT_BIN": str(tencrypt_bin())}
    env.pop("TENCRYPT_SETUP_ARGS", None)
    if setup_args:
        env["TENCRYPT_SETUP_ARGS"] = " ".join(setup_args)
    return env


def members_of(lab: Lab, pod: Pod) -> Members:
    """``pod``'s membership file as the node agent writes it (format 2): the lab's Services
    and their EndpointSlices as Kubernetes objects (nodesync.kubeobjects), reduced by the
    agent's own code (agent/members.py), every pod IP of the project, the cluster's ranges as
    the agent would discover them (the Service CIDRs, the Nodes' pod CIDRs; each family's,
    primary first), and the pod's
    NetworkPolicy with the agent's report of policies that drop its tunnel (agent/netpol.py,
    through lab/netpolicy.py)."""
    project = pod.project
    view = MemberView()
    objs = services.objects(lab.services)
    view.replace_services(o for o in objs if o["kind"] == "Service")
    view.replace_slices(o for o in objs if o["kind"] == "EndpointSlice")
    found = view.of(project)
    doc = netpolicy.world(lab, project).reduce(pod.name)
    return Members(
        project,
        time.time_ns(),
        frozenset(ip for p in lab.pods.values() if p.project == project for ip in p.ips or [p.ip]),
        found.services,
        found.table,
        tuple(lab.topology.service_cidrs),
        tuple(
            cidr
            for family in lab.families
            for n in lab.nodes.values()
            for cidr in n.pod_cidrs or [n.pod_cidr]
            if family_of(cidr) == family
        ),
        network_policy=json.dumps(doc, sort_keys=True, separators=(",", ":")),
        tunnel_blocked=tuple(sorted(netpolicy.tunnel_blocked(lab, project).get(pod.name, []))),
    )


def members_file(lab: Lab, pod: Pod) -> Path:
    """Where the lab keeps ``pod``'s membership file (handed to setup and run by path)."""
    return lab.state_dir / "members" / f"{pod.name}.json"


def write_members_file(lab: Lab, pod: Pod, members: Members | None = None) -> Path:
    """Hand ``pod``'s proxy its project's membership (or ``members``), as the agent does:
    atomically, so a running proxy reads the old file or the new one."""
    doc = members or members_of(lab, pod)
    return write_atomic(members_file(lab, pod), render_pod_ips(lab, doc))


def render_pod_ips(lab: Lab, members: Members) -> str:
    """``render_members``, plus (a lab with IPv6) ``podIPs``: every pod of the project as
    its addresses in ``status.podIPs`` order, primary first, pods sorted by that first."""
    text = render_members(members)
    if lab.families == (4,) or members.service_table is None:
        return text
    doc = json.loads(text)
    ips = [list(p.ips) for p in lab.pods.values() if p.project == members.project and p.ips]
    doc["podIPs"] = sorted(ips, key=lambda a: (family_of(a[0]), ipaddress.ip_address(a[0])))
    return json.dumps(doc) + "\n"


def pod_key_file(lab: Lab, pod: Pod) -> Path:
    """Where ``write_pod_keys`` puts a pod's own key ring (patch prefers it to the project's)."""
    return lab.psk_file(pod.project).with_name(f"{pod.name}.ring")


def write_pod_keys(lab: Lab, pod: Pod, keys: KeySet) -> Path:
    """Hand ``pod``'s proxy a key ring, atomically, as the agent does in a rotation: a running
    proxy re-reads it within a second (``tencrypt run`` watches its key file)."""
    return write_key_file(pod_key_file(lab, pod), keys)


def proxy_pid(lab: Lab, pod: Pod) -> int | None:
    """The pid of the proxy this lab started in ``pod``, if it still runs."""
    pid = procs.read_pid(lab.pid_file(f"{pod.name}.tencrypt"))
    if pid and procs.alive(pid) and "tencrypt" in procs.cmdline(pid):
        return pid
    return None


def proxies_in(ns: str) -> list[int]:
    """Every ``tencrypt run`` inside namespace ``ns``, whoever started it."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    found = []
    for pid in (int(p) for p in pids.split() if p.isdigit()):
        words = procs.cmdline(pid).split()
        if any(w.endswith("tencrypt") for w in words) and "run" in words:
            found.append(pid)
    return found


def patch(
    lab: Lab,
    pod: Pod,
    strict: bool = True,
    run_args: tuple[str, ...] = (),
    members: bool = True,
    setup_args: tuple[str, ...] = (),
) -> None:
    """Start the launcher for ``pod`` (``run_args`` go to `tencrypt run`, e.g. --no-batch;
    ``setup_args`` to `tencrypt setup`, as an operator's --setup-args would). ``members``:
    hand the proxy its project's membership first, as the agent does; without it the proxy
    runs standalone (DNS and sessions are its only evidence)."""
    if proxy_pid(lab, pod):
        raise UsageError(f"pod {pod.name} is already patched (unpatch it first)")
    if members:
        path = write_members_file(lab, pod)
        setup_args = (*setup_args, "--members-file", str(path))
        run_args = ("--members-file", str(path), *run_args)
    else:
        members_file(lab, pod).unlink(missing_ok=True)
    key = pod_key_file(lab, pod)
    if not key.exists():
        key = lab.psk_file(pod.project)
    if not key.exists():
        raise UsageError(f"no key for project {pod.project} ({key}): is lab {lab.name} up?")
    argv = [
        "bash",
        str(launcher()),
        "--netns",
        pod.netns,
        "--",
        "--psk-file",
        str(key),
        "--metrics",
        METRICS,
    ]
    if not strict:
        argv.append("--no-strict")
    argv += run_args
    log, pid_file = lab.log_file(f"{pod.name}.tencrypt"), lab.pid_file(f"{pod.name}.tencrypt")
    lab.say(f"patching {pod.name}: {' '.join(argv[1:])} (log {log})")
    with open(log, "wb") as out:  # truncated: an old "ready" line must not count
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=launcher_env(setup_args),
        )
    pid_file.write_text(f"{proc.pid}\n")

    def ready() -> bool:
        if proc.poll() is not None:
            raise SetupError(
                f"the proxy in {pod.name} exited with code {proc.returncode} before it was ready"
            )
        return READY in log.read_text(errors="replace")

    try:
        netns.wait_for(ready, timeout=READY_TIMEOUT, what=f"the proxy in {pod.name} to be ready")
    except SetupError as exc:
        cleanup.stop(proc.pid, timeout=STOP_TIMEOUT, group=True)
        proc.poll()
        pid_file.unlink(missing_ok=True)
        _undo(pod, check=False)
        members_file(lab, pod).unlink(missing_ok=True)
        raise SetupError(f"{exc}\nlast lines of {log}:\n{cleanup.tail(log)}") from None
    lab.say(
        f"patched {pod.name}: proxy pid {proc.pid}, {'strict' if strict else 'not strict'}, "
        f"{'membership from the lab' if members else 'standalone (no membership)'}"
    )


def unpatch(lab: Lab, pod: Pod) -> None:
    pid = proxy_pid(lab, pod)
    if pid:
        graceful = cleanup.stop(pid, timeout=STOP_TIMEOUT, group=True)
        lab.say(
            f"stopped the proxy in {pod.name} (pid {pid}{'' if graceful else ', needed SIGKILL'})"
        )
    lab.pid_file(f"{pod.name}.tencrypt").unlink(missing_ok=True)
    _undo(pod, check=True)
    members_file(lab, pod).unlink(missing_ok=True)
    lab.say(f"unpatched {pod.name}: setup undone")


def _undo(pod: Pod, check: bool) -> None:
    proc = subprocess.run(
        ["bash", str(launcher()), "--netns", pod.netns, "--undo"],
        capture_output=True,
        text=True,
        env=launcher_env(),
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise SetupError(
            f"`tencrypt setup --undo` in {pod.name} failed ({proc.returncode}):\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
