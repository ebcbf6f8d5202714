"""node-sync programs a real node (nft table or iptables nat chain); traffic to VIP:1337
reaches the right pods, with either backend and across a switch between them.

    [ <p>cl ]  [ <p>w1 ]  [ <p>w2 ]  [ <p>w3 ]  [ <p>api ]    pods: eth0 10.128.0.<n>/23,
     .10 client  .11 web    .12 web    .13 (spare) .14 blog   default via 10.128.0.1
         \\         |          |          |          /
          +-------------- br0 10.128.0.1/23 --------+         [ <p>node ]: ip_forward=1,
                                                              bridge-nf-call-iptables=1

Every pod but the client answers its own name on udp and tcp :1337 (a stand-in for the
proxy). node-sync runs in the root namespace with ``--netns <p>node``, as the lab runs it, and
reads either the recorded cluster (``--once --from-file``) or the API server double on
127.0.0.1 through the real ``kubernetes`` client, with ``--backend nft`` and ``--backend
iptables`` (the tests taking ``backend`` run with each). VIPs and pod IPs are the fixture's:
shop/web 172.30.12.34 → .11 .12, shop/cache 172.30.77.7 → .12, blog/api 172.30.40.2 → .14
(namespace blog is not labelled: never forwarded).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tencrypt.linux import netns
from tencrypt.nodesync import nftrules, rules
from tests.kubefakes import builders as kubeobjects
from tests.kubefakes.fakeapi import FakeApiServer

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "nodesync-cluster.json"
WEB, CACHE, BLOG = "172.30.12.34", "172.30.77.7", "172.30.40.2"
PODS = {
    "cl": "10.128.0.10",
    "w1": "10.128.0.11",
    "w2": "10.128.0.12",
    "w3": "10.128.0.13",
    "api": "10.128.0.14",
}

SERVER = r"""
import selectors, socket, sys
name = sys.argv[1].encode()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 1337))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 1337))
tcp.listen(64)
sel = selectors.DefaultSelector()
sel.register(udp, selectors.EVENT_READ)
sel.register(tcp, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is udp:
            _, peer = udp.recvfrom(2048)
            udp.sendto(name, peer)
        else:
            conn, _ = tcp.accept()
            conn.sendall(name)
            conn.close()
"""

# count requests, each from a fresh socket (a new flow) unless sport pins the source port
CLIENT = r"""
import json, socket, sys
proto, dst, count, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(1.0)
    if sport:
        s.bind(("0.0.0.0", sport))
    try:
        s.connect((dst, 1337))
        if proto == "udp":
            s.send(b"?")
        out.append(s.recv(64).decode())
    except OSError:
        out.append(None)
    finally:
        s.close()
print(json.dumps(out))
"""


class Node:
    def __init__(self, prefix):
        self.prefix = prefix
        self.node = f"{prefix}node"
        self.pods = {name: f"{prefix}{name}" for name in PODS}
        self.servers = []

    def up(self):
        netns.create(self.node)
        for cmd in (
            ["ip", "link", "add", "br0", "type", "bridge"],
            ["ip", "addr", "add", "10.128.0.1/23", "dev", "br0"],
            ["ip", "link", "set", "br0", "up"],
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
        ):
            netns.run(self.node, cmd)
        for name, ip in PODS.items():
            ns, host_if = self.pods[name], f"v{name}{self.prefix[-6:]}"
            netns.create(ns)
            netns.sh(
                [
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    host_if,
                    "netns",
                    self.node,
                ]
            )
            netns.run(self.node, ["ip", "link", "set", host_if, "master", "br0", "up"])
            for cmd in (
                ["ip", "addr", "add", f"{ip}/23", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "route", "add", "default", "via", "10.128.0.1"],
            ):
                netns.run(ns, cmd)
            if name != "cl":
                proc = netns.spawn(ns, [sys.executable, "-c", SERVER, name])
                self.servers.append(proc)
        for name in PODS:
            if name != "cl":  # servers are up when they answer on their own pod IP
                netns.wait_for(lambda n=name: self.ask("udp", PODS[n]) == [n], what=f"{name} up")

    def down(self):
        for proc in self.servers:
            proc.kill()
            proc.wait()
        for ns in [*self.pods.values(), self.node]:
            netns.delete(ns)

    def ask(self, proto, dst, count=1, sport=0):
        out = netns.run(
            self.pods["cl"], [sys.executable, "-c", CLIENT, proto, dst, str(count), str(sport)]
        ).stdout
        return json.loads(out)

    def save(self):
        return netns.run(self.node, ["iptables-save", "-t", "nat"]).stdout

    def listing(self):
        """``nft list table inet tencrypt``, "" while there is none."""
        proc = netns.run(self.node, ["nft", "list", "table", "inet", "tencrypt"], check=False)
        return proc.stdout if proc.returncode == 0 else ""

    def programmed(self, backend):
        """(VIP, endpoint) pairs the node forwards through ``backend``'s rules."""
        if backend == "nft":
            return nftrules.pairs(nftrules.parse_listing(self.listing()))
        return rules.parse_programmed(self.save())

    def owned(self, backend):
        """What ``backend`` holds on the node, as text to compare."""
        if backend == "nft":
            return self.listing().splitlines()
        return rules.owned_lines(self.save())


@pytest.fixture(params=["nft", "iptables"])
def backend(request):
    return request.param


@pytest.fixture
def node():
    n = Node(f"ny{netns.unique_suffix()}")
    try:
        n.up()
        yield n
    finally:
        n.down()
    assert not [ns for ns in netns.listed() if ns.startswith(n.prefix)]


@pytest.fixture
def api():
    server = FakeApiServer(json.loads(FIXTURE.read_text())["items"])
    server.start()
    yield server
    server.stop()


class NodeSync:
    """``python -m tencrypt.nodesync`` (= ``tencrypt node-sync``) watching the API double."""

    def __init__(self, node, api, tmp_path, backend):
        self.argv = [
            sys.executable,
            "-m",
            "tencrypt.nodesync",
            "--netns",
            node.node,
            "--backend",
            backend,
            "--log-level",
            "debug",
            "--kubeconfig",
            str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        ]
        self.log = tmp_path / "node-sync.log"
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


@pytest.fixture
def nodesync(node, api, tmp_path, backend):
    made = []

    def make():
        ns = NodeSync(node, api, tmp_path, backend)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.stop()


def run_once(node, *extra):
    return netns.sh([sys.executable, "-m", "tencrypt.nodesync", "--netns", node.node, *extra])


def test_recorded_cluster_forwards_1337_of_labelled_vips_to_their_pods(node, backend):
    run_once(node, "--once", "--from-file", str(FIXTURE), "--backend", backend)
    udp = node.ask("udp", WEB, count=40)  # 40 new flows: both pods are picked
    assert set(udp) == {"w1", "w2"}, udp
    tcp = node.ask("tcp", WEB, count=40)
    assert set(tcp) == {"w1", "w2"}, tcp
    assert node.ask("udp", CACHE, count=5) == ["w2"] * 5
    assert node.ask("tcp", CACHE) == ["w2"]
    # blog is not labelled: its VIP forwards nothing, though its pod answers directly
    assert node.ask("udp", BLOG) == [None] and node.ask("tcp", BLOG) == [None]
    assert node.ask("udp", PODS["api"]) == ["api"]
    # what the kernel holds reads back as exactly the fixture's pairs
    assert node.programmed(backend) == {
        (WEB, PODS["w1"]),
        (WEB, PODS["w2"]),
        (CACHE, PODS["w2"]),
        ("172.30.8.8", "10.128.0.17"),
        ("172.30.8.8", "10.128.0.18"),
    }
    # a second run changes nothing (no duplicated jumps, same chains)
    before = node.owned(backend)
    run_once(node, "--once", "--from-file", str(FIXTURE), "--backend", backend)
    assert node.owned(backend) == before
    other = {"nft": "iptables", "iptables": "nft"}[backend]
    assert node.owned(other) == []  # the other backend holds nothing


def test_real_client_fake_apiserver_pod_replaced_moves_the_rule_and_the_tunnel_flow(
    node, api, nodesync, backend
):
    api.put(kubeobjects.build_endpoint_slice("shop", "web", [PODS["w2"]], suffix="m5l7c"))
    sync = nodesync()
    sync.start()
    # the proxy's flow: always pod:1337 -> VIP:1337, one conntrack entry kept alive
    netns.wait_for(lambda: node.ask("udp", WEB, sport=1337) == ["w2"], timeout=30, what="web -> w2")
    assert node.ask("udp", WEB, sport=1337) == ["w2"]
    # w2 is replaced by w3 (w2 still answers: only the rule and conntrack can move the flow)
    api.put(kubeobjects.build_endpoint_slice("shop", "web", [PODS["w3"]], suffix="m5l7c"))
    netns.wait_for(
        lambda: node.ask("udp", WEB, sport=1337) == ["w3"],
        timeout=30,
        what="the same 5-tuple now reaching w3",
    )
    assert node.ask("tcp", WEB, count=5) == ["w3"] * 5
    assert node.programmed(backend) >= {(WEB, PODS["w3"])}
    assert (WEB, PODS["w2"]) not in node.programmed(backend)
    # the label goes: every rule of shop goes, and the live flow stops too
    api.put(kubeobjects.build_namespace("shop", enabled=False))
    netns.wait_for(lambda: not node.programmed(backend), timeout=30, what="shop's rules removed")
    assert node.ask("udp", WEB, sport=1337) == [None]
    assert node.ask("tcp", WEB) == [None] and node.ask("udp", CACHE) == [None]
    if backend == "iptables":
        assert [ln for ln in rules.owned_lines(node.save()) if ln.startswith("-A TENC")] == []
    else:
        assert "svc-" not in node.listing()
    # the first sync was full, every change after it a partial one
    log = sync.log.read_text()
    assert log.count("(full sync") == 1 and log.count("(partial sync") >= 2, log


def test_real_client_fake_apiserver_restart_rebuilds_the_same_rules(node, api, nodesync, backend):
    first = nodesync()
    first.start()
    netns.wait_for(lambda: len(node.programmed(backend)) == 5, timeout=30, what="first sync")
    programmed = node.owned(backend)
    assert first.stop() == 0
    assert node.owned(backend) == programmed  # stopping never cuts tunnels
    # someone flushes the dispatch, deletes a hook and leaves a stale chain behind
    if backend == "iptables":
        netns.run(
            node.node,
            ["iptables-restore", "--noflush"],
            input="\n".join(
                [
                    "*nat",
                    ":TENCRYPT - [0:0]",
                    ":TENC-SEP-STALESTALESTALES - [0:0]",
                    "-D OUTPUT -j TENCRYPT",
                    "-A TENC-SEP-STALESTALESTALES -p udp -m udp -j DNAT --to-destination "
                    "10.128.0.13:1337",
                    "COMMIT",
                    "",
                ]
            ),
        )
    else:
        netns.run(
            node.node,
            ["nft", "-f", "-"],
            input="\n".join(
                [
                    "flush chain inet tencrypt services",
                    "delete chain inet tencrypt output",
                    "add chain inet tencrypt svc-stalestalestale",
                    "add rule inet tencrypt svc-stalestalestale dnat ip to 10.128.0.13",
                    "",
                ]
            ),
        )
    assert node.ask("udp", WEB) == [None]
    nodesync().start()
    netns.wait_for(
        lambda: node.owned(backend) == programmed,
        timeout=30,
        what="the restarted node-sync to converge to the same rules",
    )
    assert set(node.ask("udp", WEB, count=40)) == {"w1", "w2"}
    # --cleanup leaves nothing of Tencrypt behind, in either backend
    run_once(node, "--cleanup")
    assert node.owned("nft") == [] and node.owned("iptables") == []


def test_switching_backends_on_a_running_node_leaves_no_stale_rules(node):
    """iptables → nft → iptables with --once: each backend's first sync removes what the
    other programmed, after its own rules are in place; traffic flows at every step."""
    expected = {
        (WEB, PODS["w1"]),
        (WEB, PODS["w2"]),
        (CACHE, PODS["w2"]),
        ("172.30.8.8", "10.128.0.17"),
        ("172.30.8.8", "10.128.0.18"),
    }
    for backend, other in (("iptables", "nft"), ("nft", "iptables"), ("iptables", "nft")):
        run_once(node, "--once", "--from-file", str(FIXTURE), "--backend", backend)
        assert node.programmed(backend) == expected and node.owned(other) == [], backend
        assert "TENC" not in node.save() if backend == "nft" else node.listing() == ""
        assert set(node.ask("udp", WEB, count=30)) == {"w1", "w2"}
        assert node.ask("tcp", CACHE) == ["w2"]


def test_real_client_fake_apiserver_endpoints_change_under_a_stream_and_it_follows(
    node, api, nodesync, backend, tmp_path
):
    """A tunnel-shaped flow (client:1337 → VIP:1337, one conntrack entry) kept busy by a
    bounded stream while the Service's endpoint moves w2 → w3 → w1: every answer comes from
    the endpoint of the moment — once a move is seen the flow never goes back — and the
    kernel's rules read back as what node-sync was told at each step."""
    api.put(kubeobjects.build_endpoint_slice("shop", "web", [PODS["w2"]], suffix="m5l7c"))
    nodesync().start()
    netns.wait_for(lambda: node.ask("udp", WEB, sport=1337) == ["w2"], timeout=30, what="web -> w2")
    log = tmp_path / "stream.log"  # one answer per line, as it comes
    stream = subprocess.Popen(
        netns.exec_argv(
            node.pods["cl"], [sys.executable, "-c", STREAM, WEB, "3000", "0.005", str(log)]
        ),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # the stream is under way on w2 before the first move (node-sync is quicker than an
        # interpreter's start-up: moving at once would move it before its first datagram)
        netns.wait_for(
            lambda: log.exists() and "w2" in log.read_text(), timeout=30, what="stream on w2"
        )
        for target in ("w3", "w1"):
            api.put(kubeobjects.build_endpoint_slice("shop", "web", [PODS[target]], suffix="m5l7c"))
            netns.wait_for(
                lambda t=target: (
                    node.programmed(backend) >= {(WEB, PODS[t])}
                    and len([p for p in node.programmed(backend) if p[0] == WEB]) == 1
                ),
                timeout=30,
                what=f"web -> {target} programmed",
            )
            # the next move only once the stream met this endpoint (a datagram lost in the
            # switch costs it a 0.2 s timeout, longer than node-sync takes to move again)
            netns.wait_for(
                lambda t=target: t in log.read_text().split(),
                timeout=30,
                what=f"the stream answered by {target}",
            )
        stream.wait(timeout=120)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    out = [line or None for line in log.read_text().splitlines()]
    answers = [a for a in out if a]
    assert answers, "the stream got no answer at all"
    order = [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]
    assert order == ["w2", "w3", "w1"], order  # followed each move, never went back
    assert answers[-1] == "w1"


# a stream on one 5-tuple (sport 1337, as the tunnel): count datagrams, one every interval,
# each answered (or not, within 0.2 s) by the endpoint behind the VIP; bounded in count;
# each answer (or an empty line) written to the log file as it comes
STREAM = r"""
import json, socket, sys, time
dst, count, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
log = open(sys.argv[4], "w", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 1337))
s.connect((dst, 1337))
s.settimeout(0.2)
for _ in range(count):
    s.send(b"?")
    try:
        log.write(s.recv(64).decode() + "\n")
    except OSError:
        log.write("\n")
    time.sleep(interval)
"""


def test_lab_services_programmed_through_the_same_path(node, backend):
    from tencrypt.lab.topology import Endpoint, Service, ServicePort
    from tencrypt.nodesync.backends import program_objects

    def lab_service(name, project, vip, endpoint):  # as tencrypt.lab.topology plans one
        http = ServicePort("http", 8080, 8080)
        return Service(name, project, vip, (http,), (Endpoint(name, endpoint, {"http": 8080}),))

    services = [
        lab_service("web", "shop", WEB, PODS["w3"]),
        lab_service("api", "blog", BLOG, PODS["api"]),
    ]
    desired = program_objects(kubeobjects.lab_objects(services), netns=node.node, backend=backend)
    assert [(b.vip, b.endpoints) for b in desired] == [(BLOG, (PODS["api"],)), (WEB, (PODS["w3"],))]
    assert node.ask("udp", WEB) == ["w3"] and node.ask("tcp", BLOG) == ["api"]
    program_objects(kubeobjects.lab_objects(services[:1]), netns=node.node, backend=backend)
    assert node.ask("udp", BLOG) == [None] and node.ask("udp", WEB) == ["w3"]
