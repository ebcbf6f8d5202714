"""``tencrypt agent`` on the one-node lab: the real ``kubernetes`` client against the API server
double, the real launcher, real proxies in real pods.

    FakeApiServer on 127.0.0.1 (a test double)   Pods, Services, Namespaces, Secrets "tencrypt"
        ^  list/watch + GET, the real kubernetes client
    tencrypt agent (root namespace; --sandbox annotation; state in pytest's tmp dir)
        |  tencrypt-nsenter.sh <sandbox pid> -- --psk-file <state>/keys/myproject.psk ...
        v
    [nginx1] [nginx2]   myproject: labelled, Secret tencrypt holds the lab's project key
    [cakephp]           project2: not labelled: never touched
    ---------- br0 of node1: where the eavesdropper captures ----------

A lab pod's sandbox PID is that of its HTTP server (the pod's only process before it is
patched), written into its Pod object as the annotation ``tencrypt.io/sandbox-pid`` — the
lab's stand-in for what crictl or the /proc scan find on a real node (unit-tested on sample
outputs in tests/unit/test_agent.py). The tests run in order on one agent: pods patched and
sealed, each with its project's members (pod IPs of every node, Service VIPs) in its own
``members.json`` (the agent's directory for the pod's UID: ``--members-file`` to setup and
run), which follows pods of the project added and removed elsewhere — nginx1 never sees the
dead pod's state planted under its namespace's inode number before the agent starts; a killed
proxy restarted; a removed pod leaves nothing; a namespace labelled and
unlabelled at run time; an agent restarted with ``--on-exit keep`` whose successor adopts
the running proxies; and that successor's ``--on-exit unpatch`` stop.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tencrypt.agent.podstate import SANDBOX_PID_ANNOTATION
from tencrypt.core.membership import Members, parse_members, render_members
from tencrypt.core.netnsid import NetnsId
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.psk import KeySet, fingerprint, parse_key_file
from tencrypt.kube import client as kubeclient
from tencrypt.lab.proxy import METRICS, proxies_in
from tencrypt.lab.topology import PodSpec, Topology
from tencrypt.linux import netns, podnet
from tencrypt.linux.procs import read_pid
from tencrypt.nodesync.kubeobjects import lab_objects
from tests.kubefakes import builders as kubeobjects
from tests.kubefakes.writable import WritableApiServer
from tests.netns.conftest import built_lab

REPO = Path(__file__).resolve().parents[2]
MARKER = "tencrypt-agent-marker-41c7"
READY_WAIT = 90.0  # two interpreters starting at once on a loaded 2-core machine


@pytest.fixture(scope="module")
def lab():
    """Two pods of myproject (one per node's worth of this file's counts) and cakephp of
    project2: the agent's counts below are about exactly these."""
    topology = Topology(
        pods=[
            PodSpec("nginx1", "myproject"),
            PodSpec("nginx2", "myproject", node=2),
            PodSpec("cakephp", "project2"),
        ]
    )
    with built_lab(1, topology) as built:
        yield built


def pod_objects(lab):
    objs = [
        kubeobjects.build_namespace("myproject"),
        kubeobjects.build_namespace("project2", enabled=False),
        kubeobjects.build_secret(
            "myproject", {"PROJECT_PSK": lab.psk_file("myproject").read_text().strip()}
        ),
    ]
    # the lab's Services and their EndpointSlices, as the cluster holds them
    objs += [o for o in lab_objects(lab.services) if o["kind"] in ("Service", "EndpointSlice")]
    for pod in lab.pods.values():
        pid = read_pid(lab.pid_file(f"{pod.name}.http"))
        assert pid and str(pid) in netns.sh(["ip", "netns", "pids", pod.netns]).stdout.split()
        objs.append(
            kubeobjects.build_pod(
                pod.project,
                pod.name,
                pod.node,
                pod.ip,
                annotations={SANDBOX_PID_ANNOTATION: str(pid)},
                uid=pod_uid(lab, pod.name),
            )
        )
    return objs


def pod_uid(lab, pod):
    """A uid per lab: concurrent runs of this file must not share a kubepods cgroup name."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{pod}.{lab.name}"))


DEAD_BOOT = "00000000-dead-4000-8000-000000000000"  # no namespace of this boot has its identity


def plant_dead_pods_state(lab, setup_state, pod):
    """What a dead pod of another project left under the inode number the kernel has given
    ``pod``'s namespace since: setup's state, its proxy's pid and ring, and its membership
    where an agent before this change wrote it (core/netnsid.py)."""
    directory = setup_state / f"netns-{netns_inode(lab, pod)}"
    config = PodConfig(
        "10.128.9.9",
        "eth0",
        "10.128.9.1",
        "172.30.0.10",
        "shop.svc.cluster.local",
        ("shop.svc.cluster.local",),
        "cluster.local",
    )
    state = podnet.SetupState(
        config, "/gone/resolv.conf", "nameserver 172.30.0.10\n", NetnsId(DEAD_BOOT, 4242)
    )
    state.save(directory)
    members = Members("shop", 1, frozenset({"10.128.9.9"}), frozenset({"172.30.0.99"}))
    (directory / "members.json").write_text(render_members(members))
    (directory / "run.pid").write_text("1\n")
    (directory / "keys-loaded.json").write_text('{"ring": "current=deadbeef", "at": 0}')
    return directory


class AgentProcess:
    def __init__(self, api, tmp: Path, on_exit: str, log_name: str, sandbox: str):
        self.state = tmp / "agent-state"  # shared by successive agents, as on a node
        # not setup's default: setup, run and undo must all be handed the same one
        self.setup_state = tmp / "setup-state"
        self.log = tmp / log_name
        self.tmp_kubeconfig = tmp / "kubeconfig"
        self.metrics = f"127.0.0.1:{free_port()}"  # the agent's own: /metrics, probes
        self.argv = [
            sys.executable,
            "-m",
            "tencrypt",
            "agent",
            "--node",
            "node1",
            "--kubeconfig",
            str(api.write_kubeconfig(tmp / "kubeconfig")),
            "--state-dir",
            str(self.state),
            "--sandbox",
            sandbox,
            "--setup-state-dir",
            str(self.setup_state),
            "--proxy-metrics",
            METRICS,
            "--metrics",
            self.metrics,
            "--restart-backoff",
            "0.2",
            "--on-exit",
            on_exit,
            "--log-level",
            "debug",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def stop(self, timeout=60):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def get(self, path):
        """(HTTP status, body) of the agent's endpoint; (0, reason) when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://{self.metrics}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolv_files(lab):
    """Each lab pod's resolv.conf as it is now (to compare with after an undo)."""
    return {
        p.name: (Path("/etc/netns") / p.netns / "resolv.conf").read_text()
        for p in lab.pods.values()
    }


def kill_proxies(lab):
    """Whatever a failed test left running in the lab's pods: lab.down() needs no proxy."""
    for pod in lab.pods.values():
        for pid in proxies_in(pod.netns):
            os.kill(pid, signal.SIGKILL)


class World:
    """The lab, the API double holding its pods, the agents started (the last one current)."""

    def __init__(self, lab, api, tmp):
        self.lab, self.api, self.tmp, self.agents, self.cleanups = lab, api, tmp, [], []
        self.resolv = resolv_files(lab)

    def start_agent(self, on_exit, sandbox="annotation"):
        agent = AgentProcess(self.api, self.tmp, on_exit, f"agent{len(self.agents)}.log", sandbox)
        self.agents.append(agent)
        agent.start()
        return agent

    @property
    def agent(self):
        return self.agents[-1]

    def __iter__(self):  # lab, api, agent, resolv = world
        return iter((self.lab, self.api, self.agent, self.resolv))


@pytest.fixture(scope="module")
def world(lab, tmp_path_factory):
    api = WritableApiServer(pod_objects(lab))  # the agents publish their key reports too
    api.start()
    w = World(lab, api, tmp_path_factory.mktemp("agent"))
    w.planted = plant_dead_pods_state(lab, w.tmp / "setup-state", "nginx1")
    w.start_agent("keep")
    try:
        yield w
    finally:
        for agent in w.agents:
            agent.stop()
        api.stop()
        for undo in w.cleanups:
            undo()
        kill_proxies(lab)


def metrics_up(lab, pod):
    proc = lab.exec(
        pod,
        ["curl", "-sS", "--max-time", "3", f"http://{METRICS}/metrics"],
        check=False,
        timeout=20,
    )
    return proc.returncode == 0 and "tencrypt_drops_total" in proc.stdout


def metric(lab, pod, name):
    text = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"]).stdout
    return sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + " ")
    )


def wait_patched(lab, agent, *pods):
    for pod in pods:
        try:
            netns.wait_for(
                lambda p=pod: metrics_up(lab, p),
                timeout=READY_WAIT,
                interval=0.5,
                what=f"the agent's proxy in {pod} to serve",
            )
        except Exception:
            print(agent.text()[-4000:])
            raise


def has_tenc0(lab, pod):
    return lab.exec(pod, ["ip", "link", "show", "tenc0"], check=False).returncode == 0


def netns_inode(lab, pod):
    return os.stat(netns.NETNS_DIR / lab.pod(pod).netns).st_ino


def members_file(lab, agent, pod):
    """The agent's own file for the pod's UID (never setup's netns-<inode> directory)."""
    return agent.state / "pods" / pod_uid(lab, pod) / "members.json"


def members_of(lab, agent, pod):
    """(pod IPs, Service IPs) of ``pod``'s members.json, None while it has none."""
    try:
        m = parse_members(members_file(lab, agent, pod).read_text())
    except FileNotFoundError:
        return None
    return m.pods, m.services


def project_members(lab, project, *extra_pods):
    pods = [p for p in lab.pods.values() if p.project == project]
    vips = {s.vip for s in lab.services if s.project == project and s.vip}
    return {p.ip for p in pods} | set(extra_pods), vips


def until_members(lab, agent, pods, expected, what):
    for pod in pods:
        netns.wait_for(
            lambda p=pod: members_of(lab, agent, p) == expected,
            timeout=30,
            interval=0.2,
            what=f"{what} in the members of {pod}",
        )


def sealed_curl(lab, capture, src, dst):
    node = lab.nodes["node1"]
    with capture(node.netns, node.bridge, "not port 53") as cap:
        proc = lab.exec(
            src,
            ["curl", "-sS", "--max-time", "20", "-H", f"X-Marker: {MARKER}", f"http://{dst}:8080/"],
            check=False,
            timeout=40,
        )
    assert proc.returncode == 0 and f"Hello from {dst}" in proc.stdout, proc.stderr
    a, b = lab.pod(src), lab.pod(dst)
    pods = {a.ip, a.vip, b.ip, b.vip}
    talk = [f for f in cap.frames() if f.src in pods and f.dst in pods]
    assert talk, "no frames between the pods were captured"
    assert all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in talk), talk[:5]
    assert MARKER.encode() not in cap.data and f"Hello from {dst}".encode() not in cap.data


def test_real_client_fake_apiserver_enabled_pods_get_patched_and_sealed(world, capture):
    lab, api, agent, _ = world
    wait_patched(lab, agent, "nginx1", "nginx2")
    sealed_curl(lab, capture, "nginx1", "nginx2")
    assert metric(lab, "nginx1", "tencrypt_packets_sealed_total") > 0
    # the agent's own endpoint: alive, ready (listed and reconciled), its proxies by phase
    netns.wait_for(lambda: agent.get("/readyz") == (200, "ok\n"), timeout=30, what="/readyz")
    assert agent.get("/healthz") == (200, "ok\n")

    def phases():
        code, text = agent.get("/metrics")
        assert code == 200, text
        return text, {
            line.split('phase="')[1].split('"')[0]: int(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("tencrypt_agent_proxies{")
        }

    # nginx1's and nginx2's proxies serve: the agent's next pass sees them ready
    netns.wait_for(lambda: phases()[1]["ready"] >= 2, timeout=30, what="2 proxies ready")
    text, count = phases()
    enabled = [p for p in lab.pods.values() if p.project == "myproject"]
    assert count["dead"] == 0 and count["ready"] + count["starting"] == len(enabled), text
    assert "tencrypt_agent_ready 1" in text.splitlines()
    check = subprocess.run(  # the agent's exposition, its proxies' included, as Prometheus reads it
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not check.stdout + check.stderr, check
    [rss] = [
        line for line in text.splitlines() if line.startswith("process_resident_memory_bytes ")
    ]
    print(f"agent RSS with {len(enabled)} proxies: {float(rss.split()[1]) / 2**20:.1f} MiB")
    # every ready proxy's own figures, read over its state directory's socket, by pod
    for pod in ("nginx1", "nginx2"):
        assert f'tencrypt_proxy_up{{namespace="myproject",pod="{pod}"}} 1' in text, text
        labelled = f'{{namespace="myproject",pod="{pod}"'
        assert (
            sum(line.startswith("tencrypt_") and labelled in line for line in text.split("\n")) > 20
        )
    # the node's view, from the node (no namespace entered, no port in the pods)
    node = subprocess.run(
        [
            sys.executable,
            "-m",
            "tencrypt",
            "status",
            "--node",
            "--state-dir",
            str(agent.setup_state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert node.returncode == 0, node.stderr
    listed = {line.split()[0]: line.split() for line in node.stdout.splitlines()[1:]}
    for pod in ("nginx1", "nginx2"):
        assert listed[lab.pod(pod).ip][1:3] == ["myproject", "cluster"], node.stdout
    # project2 is not labelled: its pod was never entered
    assert not has_tenc0(lab, "cakephp") and proxies_in(lab.pod("cakephp").netns) == []
    # the key reached the proxies by a root-only file, never by argv or environment
    key = lab.psk_file("myproject").read_text().strip()
    keys = agent.state / "keys"
    assert (keys.stat().st_mode & 0o777, agent.state.stat().st_mode & 0o777) == (0o700, 0o700)
    assert (keys / "myproject.psk").stat().st_mode & 0o777 == 0o600
    assert parse_key_file((keys / "myproject.psk").read_text()) == KeySet(base64.b64decode(key))
    assert [p.name for p in keys.iterdir()] == ["myproject.psk"]
    for pod in ("nginx1", "nginx2"):
        for pid in proxies_in(lab.pod(pod).netns):
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    # a watcher, not a poller: one list per kind, pods selected by node, Secrets by name
    assert api.count("Pod", "list") == api.count("Namespace", "list") == 1
    assert api.count("Secret", "list") == 1
    assert api.count("Pod", "watch") >= 1 and api.count("Secret", "watch") >= 1
    assert api.count("Service", "list") == 1 and api.count("Service", "watch") >= 1


def test_real_client_fake_apiserver_each_patched_pod_holds_its_projects_members(world):
    """members.json beside setup's state of each patched pod: every pod IP and Service VIP
    of the project (cluster-wide), rewritten when a pod of the project comes or goes on any
    node; nothing for the unpatched project."""
    lab, api, agent, _ = world
    wait_patched(lab, agent, "nginx1", "nginx2")
    expected = project_members(lab, "myproject")
    until_members(lab, agent, ("nginx1", "nginx2"), expected, "the lab's pods")
    assert members_of(lab, agent, "cakephp") is None
    path = members_file(lab, agent, "nginx1")
    assert path.stat().st_mode & 0o777 == 0o644 and path.parent.stat().st_mode & 0o777 == 0o700
    for pod in ("nginx1", "nginx2"):
        # handed to setup and run by path; read from the proxy's first start
        [pid] = proxies_in(lab.pod(pod).netns)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--members-file") + 1] == str(members_file(lab, agent, pod))
        log = (agent.state / "pods" / pod_uid(lab, pod) / "proxy.log").read_text()
        assert "membership of project myproject" in log and "project shop" not in log
        setup_dir = agent.setup_state / f"netns-{netns_inode(lab, pod)}"
        assert "members.json" not in {p.name for p in setup_dir.iterdir()}
    # the dead pod's state planted under nginx1's inode number: removed by its setup, unused
    log = (agent.state / "pods" / pod_uid(lab, "nginx1") / "proxy.log").read_text()
    assert f"{world.planted} holds the state of a network namespace that no longer exists" in log
    recorded = podnet.SetupState.load(world.planted)
    assert (
        recorded.netns.boot != DEAD_BOOT and recorded.config.domain == "myproject.svc.cluster.local"
    )
    first = parse_members(path.read_text()).generation
    # a pod of the project on another node (no sandbox here: only its address matters)
    far = kubeobjects.build_pod("myproject", "far", "node9", "10.200.9.9")
    far["status"]["podIPs"].append({"ip": "fd00:200::9"})
    api.put(far)
    until_members(
        lab,
        agent,
        ("nginx1", "nginx2"),
        project_members(lab, "myproject", "10.200.9.9", "fd00:200::9"),
        "a new pod",
    )
    assert parse_members(path.read_text()).generation > first
    api.delete("Pod", "myproject", "far")
    until_members(lab, agent, ("nginx1", "nginx2"), expected, "the pod removed")
    assert "cannot write its membership file" not in agent.text()


def test_real_client_fake_apiserver_killed_proxy_is_restarted(world, capture):
    lab, api, agent, _ = world
    wait_patched(lab, agent, "nginx1", "nginx2")
    ns = lab.pod("nginx2").netns
    [old] = proxies_in(ns)
    os.kill(old, signal.SIGKILL)
    netns.wait_for(
        lambda: proxies_in(ns) not in ([], [old]),
        timeout=30,
        interval=0.2,
        what="a new proxy in nginx2",
    )
    wait_patched(lab, agent, "nginx2")
    [new] = proxies_in(ns)
    assert new != old
    sealed_curl(lab, capture, "nginx1", "nginx2")
    assert "nginx2: the proxy exited" in agent.text()


def ring_of(lab, pod):
    """(role, fingerprint) of each key the proxy in ``pod`` holds, from its /status."""
    text = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"]).stdout
    return [
        (k["role"], k["fingerprint"]) for k in json.loads(text)["keys"] if k["role"] != "retired"
    ]


def test_real_client_fake_apiserver_key_rotation_reloads_every_proxy_without_a_restart(
    world, capture
):
    """`tencrypt key rotate` (the real command, against the API double) takes the project
    through its three phases, waiting on the agent's report; the same proxies load each ring."""
    from kubernetes import client

    from tencrypt.keyrotate import Rotator

    lab, api, agent, _ = world
    wait_patched(lab, agent, "nginx1", "nginx2")
    pods = ("nginx1", "nginx2")
    before = {p: proxies_in(lab.pod(p).netns) for p in pods}
    old = KeySet(base64.b64decode(lab.psk_file("myproject").read_text().strip()))
    assert all(ring_of(lab, p) == list(old.fingerprints().items()) for p in pods)
    out = io.StringIO()
    core = client.CoreV1Api(kubeclient.new_api_client(str(agent.tmp_kubeconfig)))
    new = Rotator(
        core, "myproject", "tencrypt-system", out, grace=2.0, timeout=120.0, poll=0.5
    ).run()
    print(out.getvalue())
    assert new.current != old.current and new.next is None and new.previous is None
    assert "agents: 2/2 pods on current=" in out.getvalue()
    for pod in pods:  # every pod's ring changed, and no proxy restarted
        assert ring_of(lab, pod) == [("current", fingerprint(new.current))]
        assert proxies_in(lab.pod(pod).netns) == before[pod]
    assert parse_key_file((agent.state / "keys" / "myproject.psk").read_text()) == new
    assert "restarting" not in agent.text() and "cannot publish" not in agent.text()
    report = api.get("ConfigMap", "tencrypt-system", "tencrypt-keys-node1")
    assert f"current={fingerprint(new.current)}" in report["data"]["keys.json"]
    sealed_curl(lab, capture, "nginx1", "nginx2")  # a fresh connection, under the new key
    lab.psk_file("myproject").write_text(base64.b64encode(new.current).decode() + "\n")


def test_real_client_fake_apiserver_network_policy_reaches_the_proxies(world, capture):
    """A NetworkPolicy created in the API is reduced by the agent into nginx2's members.json
    and enforced by nginx2's proxy on the tunnel's inner packets (the lab's node here is no
    CNI: only the proxy can refuse); one that does not admit the tunnel port is reported;
    deleting it restores the traffic."""
    lab, api, agent, _ = world
    wait_patched(lab, agent, "nginx1", "nginx2")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "nginx2-from-nobody", "namespace": "myproject", "uid": "np-1"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "nginx2"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}],
        },
    }
    api.put(policy)
    path = members_file(lab, agent, "nginx2")

    def carried() -> bool:
        members = parse_members(path.read_text())
        return members.network_policy is not None and "nginx2-from-nobody" in members.network_policy

    netns.wait_for(carried, timeout=30, interval=0.2, what="the policy in nginx2's members.json")
    assert parse_members(path.read_text()).tunnel_blocked == (("ingress", "nginx2-from-nobody"),)
    assert "nginx2-from-nobody (ingress) drop the tencrypt tunnel" in agent.text()

    def ingress_policies() -> list[str]:
        text = lab.exec("nginx2", ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"])
        return json.loads(text.stdout)["network_policy"]["ingress"]["policies"]

    netns.wait_for(
        lambda: ingress_policies() == ["nginx2-from-nobody"],
        timeout=10,
        interval=0.2,
        what="nginx2's proxy to load the policy",
    )
    assert metric(lab, "nginx2", "tencrypt_netpol_enforced") == 1
    denied = lab.exec(
        "nginx1", ["curl", "-sS", "--max-time", "3", "http://nginx2:8080/"], check=False, timeout=20
    )
    assert denied.returncode != 0
    assert metric(lab, "nginx2", 'tencrypt_drops_total{reason="network_policy"}') > 0
    api.delete("NetworkPolicy", "myproject", "nginx2-from-nobody")
    netns.wait_for(lambda: not carried(), timeout=30, interval=0.2, what="the policy gone")
    netns.wait_for(
        lambda: ingress_policies() == [],
        timeout=10,
        interval=0.2,
        what="nginx2's proxy to drop the policy",
    )
    sealed_curl(lab, capture, "nginx1", "nginx2")
    assert "its NetworkPolicies admit the tunnel again" in agent.text()


def test_real_client_fake_apiserver_removed_pod_leaves_nothing_on_the_node(world):
    lab, api, agent, resolv = world
    wait_patched(lab, agent, "nginx1", "nginx2")
    inode = netns_inode(lab, "nginx2")
    uid = api.get("Pod", "myproject", "nginx2")["metadata"]["uid"]
    assert (agent.setup_state / f"netns-{inode}").is_dir() and (agent.state / "pods" / uid).is_dir()
    assert members_file(lab, agent, "nginx2").is_file()
    api.delete("Pod", "myproject", "nginx2")
    netns.wait_for(
        lambda: not (agent.state / "pods" / uid).exists(),
        timeout=60,
        what="the agent to forget nginx2",
    )
    ns = lab.pod("nginx2").netns
    assert proxies_in(ns) == [] and not has_tenc0(lab, "nginx2")
    assert (Path("/etc/netns") / ns / "resolv.conf").read_text() == resolv["nginx2"]
    assert "tencrypt" not in lab.exec("nginx2", ["nft", "list", "tables"]).stdout
    assert "fwmark" not in lab.exec("nginx2", ["ip", "rule", "show"]).stdout
    assert not (agent.setup_state / f"netns-{inode}").exists()
    assert not members_file(lab, agent, "nginx2").exists()  # gone with the undo
    # nginx2's pod IP left the members of the project (its Service stays)
    pods, vips = project_members(lab, "myproject")
    until_members(lab, agent, ("nginx1",), (pods - {lab.pod("nginx2").ip}, vips), "nginx2 gone")
    # the project keeps its key while nginx1 runs here
    assert metrics_up(lab, "nginx1") and (agent.state / "keys" / "myproject.psk").exists()


def test_real_client_fake_apiserver_namespace_labelled_then_unlabelled_at_run_time(world):
    lab, api, agent, resolv = world
    assert not has_tenc0(lab, "cakephp")
    api.put(
        kubeobjects.build_secret(
            "project2", {"PROJECT_PSK": lab.psk_file("project2").read_text().strip()}
        )
    )
    api.put(kubeobjects.build_namespace("project2"))
    wait_patched(lab, agent, "cakephp")
    assert (agent.state / "keys" / "project2.psk").exists()
    api.put(kubeobjects.build_namespace("project2", enabled=False))
    netns.wait_for(
        lambda: not (agent.state / "keys" / "project2.psk").exists(),
        timeout=60,
        what="project2 unpatched",
    )
    assert proxies_in(lab.pod("cakephp").netns) == [] and not has_tenc0(lab, "cakephp")
    assert (Path("/etc/netns") / lab.pod("cakephp").netns / "resolv.conf").read_text() == resolv[
        "cakephp"
    ]


CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids"))


def into_pod_cgroup(pid: int, uid: str):
    """Move ``pid`` into a cgroup named as the kubelet's cgroupfs driver names a pod's
    container (``kubepods/besteffort/pod<uid>/<container id>``), so that the agent's /proc
    scan finds it as it would on a node. Returns the undo, or None where cgroups are not
    writable here."""
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.procs").exists():
            continue
        leaf = root / "kubepods" / "besteffort" / f"pod{uid}" / ("c0ffee" * 10 + "abcd")
        # only what this test creates is removed again: a runtime on the machine may own
        # kubepods/ and besteffort/
        made = [d for d in (leaf, *list(leaf.parents)[:3]) if not d.exists()]
        try:
            leaf.mkdir(parents=True, exist_ok=True)
            (leaf / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            continue

        def undo(root=root, leaf=leaf, made=made):
            for moved in (leaf / "cgroup.procs").read_text().split():
                try:
                    (root / "cgroup.procs").write_text(f"{moved}\n")
                except OSError:  # it exited meanwhile
                    pass
            for d in made:
                d.rmdir()

        return undo
    return None


def test_real_client_fake_apiserver_restarted_agent_adopts_the_running_proxies(world, capture):
    """The first agent stops with --on-exit keep; the second adopts nginx1's running proxy,
    and finds the re-created nginx2 by the /proc cgroup scan a real node uses (its Pod object
    has no sandbox-pid annotation this time) wherever this machine lets the test make a
    kubepods-style cgroup."""
    lab, api, first, _ = world
    [proxy] = proxies_in(lab.pod("nginx1").netns)
    assert first.stop() == 0  # --on-exit keep
    assert "1 proxies left running" in first.text()
    assert proxies_in(lab.pod("nginx1").netns) == [proxy] and metrics_up(lab, "nginx1")
    nginx2 = next(
        o for o in pod_objects(lab) if o["kind"] == "Pod" and o["metadata"]["name"] == "nginx2"
    )
    del nginx2["metadata"]["annotations"][SANDBOX_PID_ANNOTATION]
    undo = into_pod_cgroup(read_pid(lab.pid_file("nginx2.http")), nginx2["metadata"]["uid"])
    if undo:
        world.cleanups.append(undo)
    second = world.start_agent("unpatch", sandbox="proc" if undo else "annotation")
    netns.wait_for(
        lambda: "adopted the proxy a previous agent started" in second.text(),
        timeout=60,
        what="the new agent to adopt nginx1's proxy",
    )
    if not undo:  # no writable cgroups here: the annotation stands in for the scan
        nginx2 = next(
            o for o in pod_objects(lab) if o["kind"] == "Pod" and o["metadata"]["name"] == "nginx2"
        )
    api.put(nginx2)
    wait_patched(lab, second, "nginx2")
    sealed_curl(lab, capture, "nginx1", "nginx2")
    assert proxies_in(lab.pod("nginx1").netns) == [proxy]  # never restarted
    # the new agent continued the adopted proxy's file: nginx2 is a member again
    until_members(
        lab, second, ("nginx1", "nginx2"), project_members(lab, "myproject"), "nginx2 back"
    )
    assert "nginx1: starting" not in second.text()
    assert f"sandboxes by {'proc' if undo else 'annotation'}" in second.text()


def test_real_client_fake_apiserver_agent_stop_with_on_exit_unpatch_undoes_every_pod(world):
    lab, api, agent, resolv = world
    inode = netns_inode(lab, "nginx1")
    assert agent.stop() == 0
    for pod in lab.pods.values():
        assert proxies_in(pod.netns) == [] and not has_tenc0(lab, pod.name)
        assert (Path("/etc/netns") / pod.netns / "resolv.conf").read_text() == resolv[pod.name]
    assert not (agent.setup_state / f"netns-{inode}").exists()
    assert list((agent.state / "pods").iterdir()) == []
    assert list((agent.state / "keys").iterdir()) == []
    assert "unpatching 2 pods" in agent.text()  # nginx1 adopted, nginx2 its own
