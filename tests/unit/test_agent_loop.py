"""tencrypt agent without root, the shells: the resolver on a synthetic /proc and a stand-in
crictl, and the whole agent loop — the real ``kubernetes`` client against the API server
double, the real supervisor driving a stand-in launcher (a script that answers "tencrypt:
ready" and sleeps) instead of nsenter, real processes for the proxies."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from tencrypt.agent import podstate, sandbox
from tencrypt.agent.agent import Agent, start_discovery, start_reflectors
from tencrypt.agent.podstate import SANDBOX_PID_ANNOTATION, AgentKind
from tencrypt.agent.reconcile import Phase, Policy, Sandbox
from tencrypt.agent.resolver import Resolver
from tencrypt.agent.supervisor import Supervisor
from tencrypt.core.membership import parse_members
from tencrypt.core.psk import KeySet, parse_key_file
from tencrypt.kube import client as kubeclient
from tencrypt.kube.reflector import Reflector
from tencrypt.linux.netns import wait_for
from tests.kubefakes import builders as kubeobjects
from tests.kubefakes.fakeapi import FakeApiServer
from tests.unit.test_agent import (
    CGROUPS,
    CRICTL_PODS,
    CRICTL_PS,
    INSPECT_CONTAINER,
    INSPECTP_CONTAINERD,
    INSPECTP_CRIO,
    INSPECTP_CRIO_SPOOFED,
    KEY,
    KEY2,
    UID,
    pod,
    stat_line,
    uid_of,
)

# -- the resolver on a synthetic /proc and a stand-in crictl --------------------------------


class FakeProc:
    """A /proc of directories: each process has cgroup, stat and ns/net; processes of one
    network namespace share ns/net's inode (hard links), as they do on nsfs."""

    def __init__(self, root: Path):
        self.root, self.first, self.inodes = root, {}, {}
        for pid in ("self", 1):
            self.add(pid, "node", "0::/system.slice/kubelet.service\n")

    def add(self, pid, netns, cgroup="0::/\n", start=100, state="S"):
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        (d / "stat").write_text(stat_line(pid if pid != "self" else 9, "p", state, start))
        for other in self.first.get(netns, []):
            if other.exists():
                os.link(other, d / "ns" / "net")
                break
        else:
            (d / "ns" / "net").touch()
        self.first.setdefault(netns, []).append(d / "ns" / "net")
        self.inodes[netns] = (d / "ns" / "net").stat().st_ino

    def inode(self, netns):
        return self.inodes[netns]

    def remove(self, pid):
        shutil.rmtree(self.root / str(pid))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def info(uid=UID, sandbox_pid=None):
    p = podstate.parse_pod(
        pod(
            "web",
            uid=uid,
            annotations={SANDBOX_PID_ANNOTATION: str(sandbox_pid)} if sandbox_pid else None,
        )
    )
    return p


def test_proc_scan_finds_the_pod_by_its_cgroup_and_follows_it(tmp_path):
    proc, clock = FakeProc(tmp_path / "proc"), Clock()
    proc.add(200, "pod", CGROUPS["v2 systemd containerd"], start=500)  # pause
    proc.add(201, "pod", CGROUPS["v2 systemd containerd"], start=900)  # the app
    proc.add(202, "pod", CGROUPS["v2 systemd containerd"], start=50, state="Z")  # a zombie
    proc.add(300, "node", CGROUPS["v1 cgroupfs"], start=10)  # in the node's namespace
    proc.add(
        400,
        "other",
        "0::/kubepods/besteffort/pod" + "e" * 8 + "-eeee-eeee-eeee-" + "e" * 12 + "/x\n",
        start=1,
    )
    r = Resolver("proc", proc=proc.root, interval=1.0, clock=clock)
    assert r.mode == "proc" and r.node_netns == {proc.inode("node")}
    assert r.resolve([info()]) == {UID: Sandbox(200, proc.inode("pod"))}
    proc.remove(200)  # the pause process went; the app still holds the namespace
    assert r.resolve([info()]) == {UID: None}  # a walk of /proc at most once per interval
    clock.now = 1.0
    assert r.resolve([info()]) == {UID: Sandbox(201, proc.inode("pod"))}
    proc.remove(201)
    clock.now = 2.0
    assert r.resolve([info()]) == {UID: None}


def test_annotation_mode_refuses_a_pid_in_the_node_namespace(tmp_path, caplog):
    proc = FakeProc(tmp_path / "proc")
    proc.add(1234, "node")
    proc.add(200, "pod")
    r = Resolver("annotation", proc=proc.root)
    assert r.resolve([info(sandbox_pid=1234)]) == {UID: None}
    assert "in the node's network namespace" in caplog.text
    assert r.resolve([info(sandbox_pid=999)]) == {UID: None}  # no such process
    assert r.resolve([info(sandbox_pid=200)]) == {UID: Sandbox(200, proc.inode("pod"))}
    assert r.resolve([]) == {} and r.cache == {}


FAKE_CRICTL = """#!/usr/bin/env bash
# stand-in crictl: logs its arguments, prints the canned answer for its sub-command
here=$(dirname "$0")
echo "$*" >> "$here/calls"
while [ "${1#-}" != "$1" ]; do shift 2; done   # --runtime-endpoint URL
case "$1" in
  pods) cat "$here/pods.json" ;;
  inspectp) cat "$here/inspectp.json" ;;
  ps) cat "$here/ps.json" ;;
  inspect) cat "$here/inspect.json" ;;
  *) echo "unknown command $1" >&2; exit 1 ;;
esac
"""


@pytest.mark.parametrize(
    "inspectp, pid",
    [(INSPECTP_CONTAINERD, 4242), (INSPECTP_CRIO, 5151), (INSPECTP_CRIO_SPOOFED, 6161)],
)
def test_cri_mode_runs_crictl_against_the_given_endpoint(tmp_path, inspectp, pid):
    bin_dir, proc = tmp_path / "bin", FakeProc(tmp_path / "proc")
    bin_dir.mkdir()
    crictl = bin_dir / "crictl"
    crictl.write_text(FAKE_CRICTL)
    crictl.chmod(0o755)
    for name, text in (
        ("pods", CRICTL_PODS),
        ("inspectp", inspectp),
        ("ps", CRICTL_PS),
        ("inspect", INSPECT_CONTAINER),
    ):
        (bin_dir / f"{name}.json").write_text(text)
    proc.add(pid, "pod")
    r = Resolver("auto", crictl=str(crictl), endpoint="unix:///run/x/cri.sock", proc=proc.root)
    assert r.mode == "cri"
    assert r.resolve([info()]) == {UID: Sandbox(pid, proc.inode("pod"))}
    calls = (bin_dir / "calls").read_text().splitlines()
    assert all(c.startswith("--runtime-endpoint unix:///run/x/cri.sock ") for c in calls)
    assert calls[0].endswith("pods --state ready -o json") and "inspectp -o json aaa2" in calls[1]
    assert len(calls) == (2 if pid != 6161 else 4)  # spoofed infra: ps, then a container
    assert Resolver("auto", crictl=str(tmp_path / "none"), proc=proc.root).mode == "proc"


# -- the whole agent: real client, API double, real supervisor, stand-in launcher ----------

FAKE_LAUNCHER = """#!/usr/bin/env bash
# stand-in for tencrypt-nsenter.sh: logs each call (with the key it was handed), then
# "serves" until signalled; sandbox pid 999 never gets ready
calls="$(dirname "$0")/calls"
if [ "$2" = "--undo" ]; then echo "undo $1" >> "$calls"; exit 0; fi
# what setup and the proxy starting now are handed: the membership file (it must be there);
# recorded before the call is, which the tests wait for
{ echo "${TENCRYPT_SETUP_ARGS##*--members-file }"; ls "$6"; } > "$(dirname "$0")/seen-$1" 2>&1
echo "start $1 $(sed -n 's/^current //p' "$4")" >> "$calls"
[ "$1" = 999 ] || echo "tencrypt: ready: stand-in"
exec sleep 600
"""


class Harness:
    """``Agent.run`` in a thread with reflectors on the API double, on a synthetic /proc."""

    def __init__(self, tmp, server, proc, unpatch=False, **policy):
        self.tmp, self.proc, self.calls = tmp, proc, tmp / "calls"
        launcher = tmp / "launcher.sh"
        launcher.write_text(FAKE_LAUNCHER)
        self.sup = Supervisor(
            tmp / "state",
            launcher,
            Path("/bin/true"),
            ["--no-strict"],
            setup_state_dir=tmp / "setup",
            stop_timeout=5.0,
        )
        self.api = kubeclient.new_api_client(str(server.write_kubeconfig(tmp / "kubeconfig")))
        self.agent = Agent(
            "n1",
            self.sup,
            Resolver("annotation", proc=proc.root),
            Policy(**{"backoff": 0.1, "ready_timeout": 5.0, **policy}),
        )
        self.stop = threading.Event()
        start_reflectors(self.api, self.agent.queue, self.stop, watch_timeout=300)
        start_discovery(self.api, self.agent.queue, self.stop, "n1", every=0.2)
        self.thread = threading.Thread(
            target=self.agent.run, args=(self.stop, unpatch), daemon=True
        )
        self.thread.start()

    def lines(self):
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def until(self, predicate, what):
        wait_for(predicate, timeout=20, interval=0.05, what=what)

    def until_calls(self, *expected):
        self.until(lambda: self.lines() == list(expected), f"launcher calls {expected}")

    def proxy_pid(self, uid):
        return self.sup.records[uid].proxy_pid

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)
        self.api.close()
        assert not self.thread.is_alive()


@pytest.fixture
def env(tmp_path):
    """(server, make_harness, proc): every harness closed, every stand-in proxy killed."""
    proc, servers, made = FakeProc(tmp_path / "proc"), [], []
    for pid, ns in ((200, "a"), (201, "b"), (999, "c")):
        proc.add(pid, ns)

    def make(**kw):
        h = Harness(tmp_path, servers[0], proc, **kw)
        made.append(h)
        return h

    server = FakeApiServer(
        [
            kubeobjects.build_namespace("shop"),
            kubeobjects.build_namespace("blog", enabled=False),
            kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY}),
        ]
    )
    server.start()
    servers.append(server)
    yield server, make, proc
    for h in made:
        if h.thread.is_alive():
            h.close()
    for rec in Supervisor(tmp_path / "state", Path("x"), Path("x"), []).prepare():
        try:
            os.killpg(rec.proxy_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.stop()


def lab_pod(name, sandbox_pid, **kw):
    return kubeobjects.build_pod(
        kw.pop("ns", "shop"),
        name,
        kw.pop("node", "n1"),
        "10.128.0.9",
        annotations={SANDBOX_PID_ANNOTATION: str(sandbox_pid)},
        **kw,
    )


def alive(pid):
    try:
        return sandbox.parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())[0] != "Z"
    except OSError:
        return False


def test_real_client_fake_apiserver_agent_patches_wanted_pods_and_restarts_a_dead_proxy(env):
    server, make, proc = env
    for obj in (
        lab_pod("web", 200),
        lab_pod("hostnet", 201, host_network=True),
        lab_pod("api", 201, ns="blog"),
        lab_pod("remote", 201, node="n2"),
    ):
        server.put(obj)
    h = make()
    h.until_calls(f"start 200 {KEY}")
    web = uid_of("web")
    h.until(lambda: h.agent.reconciler.entries[web].phase is Phase.READY, "web ready")
    state = h.tmp / "state"
    assert {p: oct(p.stat().st_mode & 0o777) for p in (state, state / "keys", state / "pods")} == {
        state: "0o700",
        state / "keys": "0o700",
        state / "pods": "0o700",
    }
    assert oct((state / "keys" / "shop.psk").stat().st_mode & 0o777) == "0o600"
    assert json.loads((state / "pods" / web / "record.json").read_text())["sandbox_pid"] == 200
    assert set(h.agent.view.pods) == {
        uid_of(n, ns) for n, ns in (("web", "shop"), ("hostnet", "shop"), ("api", "blog"))
    }  # not "remote"
    first = h.proxy_pid(web)
    os.kill(first, signal.SIGKILL)
    h.until_calls(f"start 200 {KEY}", "undo 200", f"start 200 {KEY}")
    assert h.proxy_pid(web) != first and alive(h.proxy_pid(web))
    assert h.agent.stats.get("agent_proxy_exits") == 1
    # watchers, not pollers: one list of each kind, Secrets included
    assert server.count("Pod", "list") == server.count("Namespace", "list") == 1
    assert server.count("Secret", "list") == 1 and server.count("Secret", "watch") >= 1


def test_real_client_fake_apiserver_each_proxy_gets_its_projects_members_before_it_starts(env):
    """Pods of the project on every node and its Services' IPs, in the pod's members.json,
    written before its proxy starts and rewritten when (and only when) the project changes."""
    server, make, proc = env
    remote = kubeobjects.build_pod("shop", "remote", "n2", "10.128.1.5")
    remote["status"]["podIPs"].append({"ip": "fd00:10:128:1::5"})
    svc = kubeobjects.build_service("shop", "web", "172.30.0.10")
    svc["spec"]["clusterIPs"].append("fd00:30::a")
    for obj in (
        lab_pod("web", 200),
        remote,
        svc,
        kubeobjects.build_service("shop", "db", "None"),
        kubeobjects.build_pod("shop", "done", "n2", "10.128.1.6", phase="Succeeded"),
        kubeobjects.build_pod("shop", "hostnet", "n2", "192.168.200.2", host_network=True),
        kubeobjects.build_pod("blog", "other", "n2", "10.128.2.2"),
        kubeobjects.build_service("blog", "other", "172.30.0.99"),
    ):
        server.put(obj)
    h = make()
    h.until_calls(f"start 200 {KEY}")
    # the agent's own file for the pod's UID, never setup's netns-<inode> (core/netnsid.py)
    path = h.tmp / "state" / "pods" / uid_of("web") / "members.json"
    assert (h.tmp / "seen-200").read_text().split() == [str(path), str(path)]  # setup, run
    assert h.sup.records[uid_of("web")].members_file == str(path)
    assert not (h.tmp / "setup").exists()

    def members():
        return parse_members(path.read_text())

    first = members()
    assert (first.project, first.pods, first.services) == (
        "shop",
        {"10.128.0.9", "10.128.1.5", "fd00:10:128:1::5"},
        {"172.30.0.10", "fd00:30::a"},
    )
    assert first.service_table is not None and [s.name for s in first.service_table] == ["web"]
    # the cluster's ranges, discovered: a ServiceCIDR object and the Nodes' podCIDRs
    server.put(service_cidr("kubernetes", "172.30.0.0/16", "fd00:30::/112"))
    server.put(node("n1", "10.128.0.0/23", zone="zone-a"))
    server.put(node("n2", "10.128.2.0/23"))
    h.until(lambda: members().pod_cidrs == ("10.128.0.0/23", "10.128.2.0/23"), "the ranges")
    ranged = members()
    assert ranged.service_cidrs == ("172.30.0.0/16", "fd00:30::/112") and ranged.zone == "zone-a"
    # the Service's endpoints, from an EndpointSlice: in the file as the proxy resolves them
    server.put(kubeobjects.build_endpoint_slice("shop", "web", ["10.128.1.5"], port=8443))
    h.until(lambda: members().service_table[0].endpoints, "the endpoint in the file")
    [endpoint] = members().service_table[0].endpoints
    assert endpoint.ip == "10.128.1.5" and [p.port for p in endpoint.ports] == [8443]
    feed = h.sup.feed
    # another project's pod: shop's file is not touched
    writes, blog = feed.writes, h.agent.members.version("blog")
    first = members()
    server.put(kubeobjects.build_pod("blog", "more", "n3", "10.128.2.3"))
    h.until(lambda: h.agent.members.version("blog") > blog, "blog's new pod seen")
    # (the Pod watch delivers in order: by the time shop's change is in the file, blog's was
    # handled, and the write count says it wrote nothing)
    # a pod of the project added on another node, then removed; a Service IP removed
    server.put(kubeobjects.build_pod("shop", "new", "n3", "10.128.3.3"))
    h.until(lambda: "10.128.3.3" in members().pods, "the new pod in the file")
    assert feed.writes == writes + 1 and members().generation > ranged.generation
    server.delete("Pod", "shop", "remote")
    h.until(lambda: members().pods == {"10.128.0.9", "10.128.3.3"}, "remote gone")
    server.put(kubeobjects.build_service("shop", "web", "172.30.0.10"))
    h.until(lambda: members().services == {"172.30.0.10"}, "the IPv6 VIP gone")
    assert feed.writes == writes + 3
    # unpatched: the file goes after the undo, with the pod's directory
    server.put(kubeobjects.build_namespace("shop", enabled=False))
    h.until(lambda: not path.parent.exists(), "the pod's directory removed")
    assert h.lines()[-1] == "undo 200"


def test_real_client_fake_apiserver_a_proxy_never_ready_is_killed_and_retried(env):
    server, make, proc = env
    server.put(lab_pod("slow", 999))
    h = make(ready_timeout=0.5, backoff=0.1)
    h.until(
        lambda: h.lines()[:3] == [f"start 999 {KEY}", "undo 999", f"start 999 {KEY}"],
        "a kill and a retry",
    )
    assert h.agent.stats.get("agent_proxy_exits") >= 1
    assert h.agent.reconciler.entries[uid_of("slow")].failures >= 1


def test_real_client_fake_apiserver_label_pod_and_sandbox_removal_stop_and_undo(env):
    server, make, proc = env
    server.put(lab_pod("web", 200))
    server.put(lab_pod("db", 201))
    h = make()
    h.until(lambda: sorted(h.lines()) == [f"start 200 {KEY}", f"start 201 {KEY}"], "both up")
    pids = {n: h.proxy_pid(uid_of(n)) for n in ("web", "db")}
    server.put(kubeobjects.build_namespace("shop", enabled=False))
    h.until(lambda: sorted(h.lines()[2:]) == ["undo 200", "undo 201"], "both undone")
    h.until(lambda: not (h.tmp / "state" / "keys" / "shop.psk").exists(), "key removed")
    assert not any(alive(p) for p in pids.values())
    assert list((h.tmp / "state" / "pods").iterdir()) == []
    server.put(kubeobjects.build_namespace("shop"))
    h.until(lambda: len(h.lines()) == 6, "both started again")
    server.delete("Pod", "shop", "web")
    h.until(lambda: h.lines()[6:] == ["undo 200"], "web undone")
    h.until(
        lambda: not (h.tmp / "state" / "pods" / uid_of("web")).exists(),
        "web's record and membership file removed",
    )
    assert (h.tmp / "state" / "keys" / "shop.psk").exists()  # db still runs
    # db's sandbox dies with its last process: nothing to undo in it, only node-side state
    leftover = h.tmp / "setup" / f"netns-{proc.inode('b')}"
    assert (h.tmp / "state" / "pods" / uid_of("db") / "members.json").exists()
    leftover.mkdir(parents=True)
    (leftover / "setup.json").write_text("{}")  # what setup would keep
    db = h.proxy_pid(uid_of("db"))
    proc.remove(201)
    h.until(lambda: not leftover.exists(), "node-side setup state removed")
    h.until(lambda: not alive(db), "db's proxy stopped")
    assert h.lines()[7:] == []  # no undo: the namespace is gone
    assert not (h.tmp / "state" / "pods" / uid_of("db")).exists()


def test_real_client_fake_apiserver_key_rotation_never_restarts_and_bad_keys_keep_the_last(
    env, caplog
):
    server, make, proc = env
    server.delete("Secret", "shop", "tencrypt")
    server.put(lab_pod("web", 200))
    h = make()
    h.until(lambda: h.agent.stats.get("agent_key_problems") == 1, "the missing key noticed")
    assert h.lines() == [] and "no Secret tencrypt" in caplog.text
    server.put(kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY}))
    h.until_calls(f"start 200 {KEY}")
    running = h.proxy_pid(uid_of("web"))
    key_file = h.tmp / "state" / "keys" / "shop.psk"
    for data in (
        {"PROJECT_PSK": KEY, "PROJECT_PSK_NEXT": KEY2},  # the three phases
        {"PROJECT_PSK": KEY2, "PROJECT_PSK_PREVIOUS": KEY},
        {"PROJECT_PSK": KEY2},
    ):
        server.put(kubeobjects.build_secret("shop", data))
        want = KeySet(
            *(
                base64.b64decode(data[k]) if k in data else None
                for k in ("PROJECT_PSK", "PROJECT_PSK_NEXT", "PROJECT_PSK_PREVIOUS")
            )
        )
        h.until(
            lambda want=want: key_file.exists() and parse_key_file(key_file.read_text()) == want,
            f"the key file holding {want}",
        )
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert h.lines() == [f"start 200 {KEY}"]  # no undo, no restart: the same proxy
    assert h.proxy_pid(uid_of("web")) == running and alive(running)
    server.put(kubeobjects.build_secret("shop", {"PROJECT_PSK": "not-a-key"}))
    h.until(lambda: h.agent.stats.get("agent_key_problems") == 2, "the bad key noticed")
    assert "keeping its last key" in caplog.text and "not-a-key" not in caplog.text
    assert alive(running) and len(h.lines()) == 1


def test_real_client_fake_apiserver_restarted_agent_adopts_then_unpatches_on_exit(env):
    server, make, proc = env
    server.put(lab_pod("web", 200))
    first = make()
    first.until_calls(f"start 200 {KEY}")
    web = uid_of("web")
    first.until(lambda: first.agent.reconciler.entries[web].phase is Phase.READY, "ready")
    pid = first.proxy_pid(web)
    first.close()  # --on-exit keep: the proxy outlives its agent
    assert alive(pid)
    second = make(unpatch=True)
    second.until(lambda: second.agent.stats.get("agent_proxies_adopted") == 1, "adopted")
    server.put(lab_pod("db", 201))
    second.until(lambda: len(second.lines()) == 2, "db started")
    assert second.lines() == [f"start 200 {KEY}", f"start 201 {KEY}"]  # web not restarted
    assert second.proxy_pid(web) == pid and alive(pid)
    db = second.proxy_pid(uid_of("db"))
    second.close()  # --on-exit unpatch: both stopped (adopted or not) and undone
    assert not alive(pid) and not alive(db)
    assert sorted(second.lines()[2:]) == ["undo 200", "undo 201"]
    state = second.tmp / "state"
    assert list((state / "pods").iterdir()) == [] and list((state / "keys").iterdir()) == []


def record(uid, netns, **kw):
    return {
        "uid": uid,
        "namespace": "shop",
        "name": uid,
        "sandbox_pid": 4000 + netns,
        "netns": netns,
        "key_id": "k",
        "proxy_pid": 999999,
        "proxy_start": 1,
        **kw,
    }


def test_a_dead_namespaces_state_is_removed_unless_its_inode_is_another_pods_now(tmp_path):
    """The kernel gives a dead namespace's inode number to the next one at once: the state
    setup kept under it is removed when the pod's namespace is gone, but not once another pod
    of ours holds that number (its setup replaced the dead one's state: core/netnsid.py)."""
    sup = Supervisor(tmp_path / "state", Path("x"), Path("x"), [], setup_state_dir=tmp_path)
    for rec in (record("old", 7), record("new", 7), record("other", 8)):
        (sup.pod_dir(rec["uid"])).mkdir(parents=True)
        (sup.pod_dir(rec["uid"]) / "record.json").write_text(json.dumps(rec))
    sup.prepare()
    for netns in (7, 8):
        sup.setup_dir(netns).mkdir()
        (sup.setup_dir(netns) / "setup.json").write_text("{}")
    sup.feed.write("old", pm_of("shop"))
    assert sup.undo("old", Sandbox(4007, 7), reachable=False)
    assert (sup.setup_dir(7) / "setup.json").exists()  # "new"'s own state now
    assert not sup.feed.path("old").exists()  # the dead pod's membership file went
    sup.forget("old")
    sup.forget("new")  # its namespace died too: nobody else has inode 7
    assert sup.undo("new", Sandbox(4007, 7), reachable=False)
    assert not sup.setup_dir(7).exists() and sup.setup_dir(8).exists()


def test_an_adopted_proxy_of_an_older_agent_is_fed_where_it_reads(tmp_path):
    """A record without ``members_file`` is an older agent's: its proxy reads members.json in
    setup's netns-<inode> directory, and is fed there; the proxy's next start is not."""
    sup = Supervisor(tmp_path / "state", Path("x"), Path("x"), [], setup_state_dir=tmp_path)
    sup.pod_dir("old").mkdir(parents=True)
    (sup.pod_dir("old") / "record.json").write_text(json.dumps(record("old", 7)))
    (sup.pod_dir("new").mkdir())
    (sup.pod_dir("new") / "record.json").write_text(
        json.dumps(record("new", 8, members_file="/x/new/members.json"))
    )
    sup.prepare()
    assert sup.feed.path("old") == tmp_path / "netns-7" / "members.json"
    assert sup.feed.path("new") == sup.pod_dir("new") / "members.json"
    assert sup.write_members("shop/old", "old", pm_of("shop"))
    assert parse_members((tmp_path / "netns-7" / "members.json").read_text()).project == "shop"


def pm_of(project):
    from tencrypt.agent.members import ProjectMembers

    return ProjectMembers(project, 1, frozenset({"10.128.0.9"}), frozenset())


def test_real_client_fake_apiserver_secrets_are_watched_by_name_only(env):
    """The API double authorizes Secrets as the RBAC rule does (resourceNames: tencrypt): the
    agent's field-selected list and watch pass, an unscoped list is refused."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    server, make, proc = env
    server.put(kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY}, name="db-password"))
    h = make()
    h.until(lambda: server.count("Secret", "watch") >= 1, "the Secret watch")
    core = client.CoreV1Api(h.api)
    with pytest.raises(ApiException) as refused:
        core.list_secret_for_all_namespaces()
    assert refused.value.status == 403
    names = [
        s.metadata.name
        for s in core.list_secret_for_all_namespaces(field_selector="metadata.name=tencrypt").items
    ]
    assert names == ["tencrypt"]
    assert set(h.agent.view.keys) == {"shop"}


def test_real_client_fake_apiserver_a_forbidden_list_is_logged_in_one_line_with_a_hint(
    env, tmp_path, caplog
):
    """What an operator sees when the RBAC is missing or stale: one line, status and cause."""
    import queue as queue_

    from kubernetes import client

    server, make, proc = env
    api = kubeclient.new_api_client(str(server.write_kubeconfig(tmp_path / "kc-forbidden")))
    stop = threading.Event()
    unscoped = client.CoreV1Api(api).list_secret_for_all_namespaces  # as without the selector
    Reflector(AgentKind.SECRET, unscoped, queue_.Queue(), stop).start()
    try:
        wait_for(lambda: "relisting" in caplog.text, timeout=20, what="the refusal logged")
    finally:
        stop.set()
        api.close()
    [line] = [r.getMessage() for r in caplog.records if "relisting" in r.getMessage()][:1]
    assert "Secret: HTTP 403 Forbidden" in line and "scripts/k8s/rbac.yaml" in line
    assert "\n" not in line and "HTTP response headers" not in line


def node(name, *pod_cidrs, zone=None):
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": pod_cidrs[0] if pod_cidrs else None, "podCIDRs": list(pod_cidrs)},
    }


def service_cidr(name, *cidrs):
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def test_a_cluster_without_endpointslices_gets_format_1_files_and_the_agent_still_runs(env):
    server, make, proc = env
    server.serve_slices = False  # as an API server before discovery.k8s.io/v1
    server.put(lab_pod("web", 200))
    server.put(kubeobjects.build_service("shop", "web", "172.30.0.10"))
    h = make()
    h.until_calls(f"start 200 {KEY}")
    path = h.tmp / "state" / "pods" / uid_of("web") / "members.json"
    h.until(path.exists, "the membership file")
    members = parse_members(path.read_text())
    assert members.service_table is None and members.services == {"172.30.0.10"}
    assert h.agent.slices_unserved
    assert ("EndpointSlice", "list") not in server.requests  # 404s are not recorded as served
