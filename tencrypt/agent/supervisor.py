"""The proxies on this node: launched, watched, stopped, undone; keys and records on disk.

Layout of the state directory (default /run/tencrypt-agent: tmpfs, so keys never reach a
disk; everything 0700, key files 0600, owned by root)::

    keys/<project>.psk          the project's key ring (core.psk.render_key_file), as
                                `tencrypt run --psk-file` reads and re-reads it
    pods/<uid>/record.json      what was started: sandbox PID and netns, key id, proxy PID and
                                its start time (to tell it from a recycled PID after a restart)
    pods/<uid>/members.json     the project's membership (``feed.MembersFeed``), given to the
                                pod's setup and proxy as --members-file: keyed by the pod's
                                UID, which never repeats, not by its netns inode, which does
    pods/<uid>/proxy.log        the launcher's and the proxy's output (proxy.log.1: the run
                                before, kept for one restart)

Stages of ``launch``:
 1. with ``undo_first``, ``tencrypt-nsenter.sh PID --undo``: what a dead proxy left;
 2. the pod's membership file (``feed.MembersFeed``), so the proxy's first start sees its
    project's members; a proxy whose file cannot be written is not started;
 3. ``bash tencrypt-nsenter.sh PID -- --psk-file <key file> --members-file <its file>
    [run args]`` detached (its own session: it outlives the agent), with ``--members-file``
    in ``TENCRYPT_SETUP_ARGS`` too, output to the pod's log. The launcher runs ``tencrypt
    setup`` then *execs* ``tencrypt run``, so the PID kept is the proxy's own;
 4. the record is written at once, so that an agent killed right after still finds it.
With a zygote (``agent --fork-proxies``, linux/zygote.py), stage 3 is a request to it
instead: it forks a child into the sandbox's network namespace (``/proc/PID/ns/net``), which
runs ``tencrypt-nsenter.sh PID --setup-only`` there (setup, and the cgroup move) and then
becomes ``tencrypt run`` with the same arguments, environment and log; the PID kept is again
the proxy's own, and from then on nothing differs (records, readiness, signals to its process
group, restarts): the agent watches it by PID and start time, as it does an adopted proxy,
and the zygote reaps it.
Readiness is the line ``tencrypt: ready`` in the log (``tencrypt run`` prints it on stderr
once it serves), polled by the agent's loop rather than waited for here: one slow pod must
not hold up the others.

``terminate``: SIGTERM to the proxy's process group, SIGKILL after ``stop_timeout``.
``undo``: ``tencrypt-nsenter.sh PID --undo`` while the sandbox is still reachable, then the
membership file; when it is not (the pod's namespace died with its last process) only the
state ``tencrypt setup`` keeps on the node is left, ``netns-<inode>``, and it is removed —
unless another pod of ours has that inode number now (the kernel reuses them at once): that
directory is the new pod's, whose setup already removed (or will remove) the dead one's
state (core/netnsid.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tencrypt.agent.feed import MembersFeed, PodPolicy
from tencrypt.agent.members import ProjectMembers
from tencrypt.agent.reconcile import Sandbox, Want
from tencrypt.agent.sandbox import parse_proc_stat
from tencrypt.core.membership import FILE_NAME as MEMBERS_FILE
from tencrypt.core.psk import KeySet
from tencrypt.errors import SetupError
from tencrypt.linux import netns
from tencrypt.linux.keyfile import write_key_file
from tencrypt.linux.zygote import Zygote, ZygoteError

log = logging.getLogger("tencrypt.agent")
READY = "tencrypt: ready"  # tencrypt.runcmd.serve prints it once the proxy serves
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # RFC 1123 label, as k8s checks


@dataclass(slots=True)
class Record:
    uid: str
    namespace: str
    name: str
    sandbox_pid: int
    netns: int
    key_id: str
    proxy_pid: int
    proxy_start: int  # /proc/PID/stat start time: the PID is ours only while it matches
    members_file: str = ""  # what the proxy reads ("": an older agent's, in setup's directory)

    @property
    def sandbox(self) -> Sandbox:
        return Sandbox(self.sandbox_pid, self.netns)

    def want(self) -> Want:
        return Want(self.uid, self.namespace, self.name, self.sandbox, self.key_id)


class Supervisor:
    def __init__(
        self,
        state_dir: Path,
        launcher: Path,
        tencrypt_bin: Path,
        run_args: list[str],
        setup_args: str = "",
        setup_state_dir: Path = Path("/run/tencrypt"),
        proc: Path = Path("/proc"),
        stop_timeout: float = 10.0,
        undo_timeout: float = 60.0,
        proxy_cgroup: str = "agent",
        zygote: Zygote | None = None,
    ) -> None:
        # setup, run and undo must agree on where setup keeps the pod's state
        self.state_dir, self.launcher = state_dir, launcher
        self.run_args = [*run_args, "--state-dir", str(setup_state_dir)]
        self.keys, self.pods = state_dir / "keys", state_dir / "pods"
        self.setup_state_dir, self.proc = setup_state_dir, proc
        self.stop_timeout, self.undo_timeout = stop_timeout, undo_timeout
        self.proxy_cgroup = proxy_cgroup  # "sandbox": proxies join their pod's cgroups
        self.settled: set[str] = set()  # pods whose proxy was moved (or is to stay put)
        self.zygote = zygote  # forks the proxies (linux/zygote.py); None: the launcher execs
        self.env = {
            **os.environ,
            "TENCRYPT_BIN": str(tencrypt_bin),
            "TENCRYPT_SETUP_ARGS": f"--state-dir {setup_state_dir} {setup_args}".strip(),
        }
        self.env.pop("TENCRYPT_PROJECT_PSK", None)  # the key goes by file, never by environment
        if proxy_cgroup == "sandbox":  # the launcher moves the proxy before it runs
            self.env["TENCRYPT_CGROUP_PYTHON"] = sys.executable
        self.feed = MembersFeed(self.pods)
        self.records: dict[str, Record] = {}
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    # -- the state directory ----------------------------------------------------------------

    def prepare(self) -> list[Record]:
        """Make the directories (0700) and load what a previous agent recorded."""
        try:
            for d in (self.state_dir, self.keys, self.pods):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                d.chmod(0o700)  # also when it existed, or was made under another umask
        except OSError as exc:
            raise SetupError(
                f"cannot prepare the state directory {self.state_dir}: {exc.strerror}"
            ) from exc
        for path in sorted(self.pods.glob("*/record.json")):
            try:
                rec = Record(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring unreadable record %s: %s", path, exc)
                continue
            self.records[rec.uid] = rec
            if not rec.members_file:  # its proxy reads where the agent before this one wrote
                self.feed.read_by(rec.uid, self.setup_dir(rec.netns) / MEMBERS_FILE)
        return list(self.records.values())

    def key_file(self, project: str) -> Path:
        if not NAMESPACE_NAME.fullmatch(project):
            raise SetupError(f"not a namespace name: {project!r}")
        return self.keys / f"{project}.psk"

    def write_key(self, project: str, keys: KeySet) -> None:
        """Replace the project's key file atomically: a proxy starting (or re-reading it: a
        rotation) meanwhile reads the old ring or the new one, never half of one, and never
        a file anyone else could read."""
        write_key_file(self.key_file(project), keys)

    def remove_key(self, project: str) -> None:
        self.key_file(project).unlink(missing_ok=True)

    def key_projects(self) -> set[str]:
        return {p.stem for p in self.keys.glob("*.psk")}

    def pod_dir(self, uid: str) -> Path:
        return self.pods / uid

    def setup_dir(self, netns: int) -> Path:
        """Where ``tencrypt setup`` keeps a namespace's state (linux/podnet.py)."""
        return self.setup_state_dir / f"netns-{netns}"

    def forget(self, uid: str) -> None:
        """Drop the pod's record, log and membership file: nothing of it stays on the node."""
        self.records.pop(uid, None)
        self.children.pop(uid, None)
        self.settled.discard(uid)
        self.feed.remove(uid)
        shutil.rmtree(self.pod_dir(uid), ignore_errors=True)

    # -- proxies ----------------------------------------------------------------------------

    def launch(
        self,
        want: Want,
        undo_first: bool = False,
        members: ProjectMembers | None = None,
        policy: PodPolicy | None = None,
    ) -> Record | None:
        """Start the launcher for ``want`` (its project's ``members`` written first); None
        (logged) if it could not even be started."""
        sandbox = want.sandbox
        assert sandbox is not None and want.key_id is not None
        if undo_first:
            self.undo(want.uid, sandbox, reachable=True)
        if want.uid in self.feed.elsewhere:  # an adopted older proxy's file: not for this one
            self.feed.remove(want.uid)
        members_file = self.feed.path(want.uid)
        if members is not None and not self.write_members(want.ref, want.uid, members, policy):
            return None
        pod_dir = self.pod_dir(want.uid)
        pod_dir.mkdir(mode=0o700, exist_ok=True)
        log_path = pod_dir / "proxy.log"
        if log_path.exists():
            log_path.replace(pod_dir / "proxy.log.1")
        argv = [
            "bash",
            str(self.launcher),
            str(sandbox.pid),
            "--",
            "--psk-file",
            str(self.key_file(want.namespace)),
            "--members-file",
            str(members_file),
            *self.run_args,
        ]
        setup_args = f"{self.env['TENCRYPT_SETUP_ARGS']} --members-file {members_file}"
        env = {**self.env, "TENCRYPT_SETUP_ARGS": setup_args}
        child: subprocess.Popen[bytes] | None = None
        try:
            if self.zygote is not None:
                pid = self.zygote.spawn(
                    self.proc / str(sandbox.pid) / "ns" / "net",
                    argv[4:],  # what the launcher would give `tencrypt run`
                    log_path,
                    env=env,
                    before=[*argv[:3], "--setup-only"],
                )
            else:
                with open(log_path, "wb") as out:
                    child = subprocess.Popen(
                        argv,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        env=env,
                    )
                pid = child.pid
        except (OSError, ZygoteError) as exc:
            log.error("%s: cannot start the launcher: %s", want.ref, exc)
            return None
        stat = self._stat(pid)
        rec = Record(
            want.uid,
            want.namespace,
            want.name,
            sandbox.pid,
            sandbox.netns,
            want.key_id,
            pid,
            stat[1] if stat else 0,
            str(members_file),
        )
        self.records[want.uid] = rec
        if child is not None:
            self.children[want.uid] = child
        else:
            self.children.pop(want.uid, None)
        self.settled.discard(want.uid)  # a new proxy: moved again once it is ready
        tmp = pod_dir / "record.json.tmp"
        tmp.write_text(json.dumps(asdict(rec), indent=1) + "\n")
        tmp.replace(pod_dir / "record.json")
        return rec

    def write_members(
        self, ref: str, uid: str, members: ProjectMembers, policy: PodPolicy | None = None
    ) -> bool:
        """The pod's membership file says ``members`` and ``policy``; False (logged) if it
        cannot."""
        try:
            written = self.feed.write(uid, members, policy)
        except OSError as exc:
            log.error(
                "%s: cannot write its membership file %s: %s",
                ref,
                self.feed.path(uid),
                exc.strerror or exc,
            )
            return False
        if written is not None:
            log.debug(
                "%s: members of %s: %d pod IPs, %d Service IPs (generation %d)",
                ref,
                written.project,
                len(written.pods),
                len(written.services),
                written.generation,
            )
        return True

    def alive(self, uid: str) -> bool:
        """The proxy we started (or adopted) for ``uid`` still runs."""
        child = self.children.get(uid)
        if child is not None:
            return child.poll() is None  # reaps our own child, so it is never a zombie
        rec = self.records.get(uid)
        stat = self._stat(rec.proxy_pid) if rec else None
        return bool(rec and stat and stat[0] not in ("Z", "X") and stat[1] == rec.proxy_start)

    def settle(self, uid: str) -> None:
        """With ``--proxy-cgroup sandbox``, move the pod's proxy into its sandbox's cgroups
        (agent/cgroups.py), once per proxy: from then on it outlives the agent container."""
        rec = self.records.get(uid)
        if self.proxy_cgroup != "sandbox" or rec is None or uid in self.settled:
            return
        from tencrypt.agent import cgroups

        self.settled.add(uid)  # tried once: a failure is logged, the proxy runs on regardless
        # the launcher moved it before it started (or an earlier agent did): then no child
        if cgroups.alike(rec.proxy_pid, rec.sandbox_pid) or cgroups.move(
            rec.proxy_pid, rec.sandbox_pid
        ):
            log.info("%s/%s: the proxy runs in its pod's cgroups", rec.namespace, rec.name)

    def ready(self, uid: str) -> bool:
        try:
            return READY in (self.pod_dir(uid) / "proxy.log").read_text(errors="replace")
        except OSError:
            return False

    def tail(self, uid: str, lines: int = 8) -> str:
        try:
            text = (self.pod_dir(uid) / "proxy.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def signal(self, uid: str, sig: signal.Signals) -> None:
        rec = self.records.get(uid)
        if rec and self.alive(uid):  # never signal a group whose leader is not ours any more
            try:
                os.killpg(rec.proxy_pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate(self, uid: str) -> bool:
        """Stop the proxy: SIGTERM, SIGKILL after the grace period. True if SIGTERM did."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self.signal(uid, sig)
            try:
                netns.wait_for(
                    lambda: not self.alive(uid),
                    timeout=self.stop_timeout,
                    what=f"the proxy of pod {uid} to exit",
                )
                return sig == signal.SIGTERM
            except SetupError:
                log.warning("pod %s: the proxy ignored %s", uid, sig.name)
        return False

    def undo(self, uid: str, sandbox: Sandbox, reachable: bool) -> bool:
        """Restore pod ``uid``'s namespace (``--undo``) if it can still be reached, else
        remove what ``tencrypt setup`` kept on the node for it; then its membership file.
        True if nothing is left."""
        if not reachable:
            self.remove_leftover(uid, sandbox.netns)
            self.feed.remove(uid)
            return True
        argv = ["bash", str(self.launcher), str(sandbox.pid), "--undo"]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=self.env, timeout=self.undo_timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("undo in sandbox pid %d failed: %s", sandbox.pid, exc)
            return False
        if proc.returncode != 0:
            log.error(
                "undo in sandbox pid %d failed (%d): %s",
                sandbox.pid,
                proc.returncode,
                (proc.stderr.strip() or proc.stdout.strip())[-500:],
            )
            return False
        self.feed.remove(uid)  # after setup's state: the proxy read it to the end
        return True

    def remove_leftover(self, uid: str, netns: int) -> None:
        """Remove the state setup kept for pod ``uid``'s namespace, which is gone — unless
        another pod of ours has been given its inode number since: the directory is then
        that pod's (its setup removed the dead namespace's state, or will: it is stale)."""
        heir = next((r for r in self.records.values() if r.netns == netns and r.uid != uid), None)
        if heir is not None:
            log.info(
                "pod %s: its namespace (inode %d) is gone and %s/%s has its inode number now: "
                "%s is left to that pod's setup",
                uid,
                netns,
                heir.namespace,
                heir.name,
                self.setup_dir(netns),
            )
            return
        shutil.rmtree(self.setup_dir(netns), ignore_errors=True)

    def _stat(self, pid: int) -> tuple[str, int] | None:
        try:
            return parse_proc_stat((self.proc / str(pid) / "stat").read_text())
        except OSError:
            return None
