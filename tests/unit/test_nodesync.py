"""node-sync without root: objects → desired backends → iptables-restore text, and the real
``kubernetes`` client against an in-process API server double on loopback."""

import json
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError
from tencrypt.kube import client as kubeclient
from tencrypt.kube.reflector import Listed
from tencrypt.lab.topology import PodSpec, ServiceSpec, Topology
from tencrypt.linux.netns import wait_for
from tencrypt.nodesync import cluster, kubeobjects, rules, watch
from tencrypt.nodesync.cluster import (
    ClusterState,
    EventType,
    Kind,
    ServiceBackends,
    load_list,
    parse_list,
)
from tests.kubefakes import builders
from tests.kubefakes.fakeapi import FakeApiServer
from tests.unit.test_probes import kubelet_expands
from tests.unit.test_purity import FORBIDDEN, imported_roots

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SLICES = json.loads((FIXTURES / "nodesync-cluster.json").read_text())
ENDPOINTS = json.loads((FIXTURES / "nodesync-cluster-endpoints.json").read_text())

# What the recorded cluster must give: only namespace "shop" is labelled; db is headless,
# upstream ExternalName; cache has a duplicate slice, an IPv6 slice and a terminating pod;
# payments has no ready pod, only terminating ones; search has a slice with endpoints: null.
EXPECTED_FROM_SLICES = [
    ServiceBackends("shop", "cache", "172.30.77.7", ("10.128.0.12",)),
    ServiceBackends("shop", "payments", "172.30.8.8", ("10.128.0.17", "10.128.0.18")),
    ServiceBackends("shop", "search", "172.30.21.5", ()),
    ServiceBackends("shop", "web", "172.30.12.34", ("10.128.0.11", "10.128.0.12")),
]


def test_recorded_cluster_gives_the_labelled_ipv4_services_and_their_ready_pods():
    stats = Stats()
    assert load_list(SLICES, stats).desired() == EXPECTED_FROM_SLICES
    assert stats.counters == {}  # real objects are never counted as bad


def test_legacy_endpoints_are_used_where_there_are_no_slices():
    assert load_list(ENDPOINTS, Stats()).desired() == [
        ServiceBackends("shop", "cache", "172.30.77.7", ("10.128.0.12",)),
        ServiceBackends("shop", "payments", "172.30.8.8", ()),  # notReadyAddresses only
        ServiceBackends("shop", "search", "172.30.21.5", ()),
        ServiceBackends("shop", "web", "172.30.12.34", ("10.128.0.11", "10.128.0.12")),
    ]


def test_a_slice_wins_over_the_endpoints_object_of_the_same_service():
    state = ClusterState()
    for obj in (
        kubeobjects.build_namespace("a"),
        kubeobjects.build_service("a", "s", "172.30.0.9"),
        builders.build_endpoints("a", "s", ["10.0.0.1"]),
        kubeobjects.build_endpoint_slice("a", "s", ["10.0.0.2"]),
    ):
        state.on_event(cluster._KIND_NAMES[obj["kind"]], EventType.ADDED, obj)
    assert state.desired() == [ServiceBackends("a", "s", "172.30.0.9", ("10.0.0.2",))]


def test_removing_the_label_or_the_namespace_drops_its_services():
    state = load_list(SLICES, Stats())
    unlabelled = kubeobjects.build_namespace("shop", enabled=False)
    state.on_event(Kind.NAMESPACE, EventType.MODIFIED, unlabelled)
    assert state.desired() == []
    state.on_event(Kind.NAMESPACE, EventType.MODIFIED, kubeobjects.build_namespace("shop"))
    assert state.desired() == EXPECTED_FROM_SLICES
    state.on_event(Kind.NAMESPACE, EventType.DELETED, unlabelled)
    assert state.desired() == []


def test_label_value_must_be_exactly_true():
    ns = kubeobjects.build_namespace("x")
    ns["metadata"]["labels"]["tencrypt.io/enabled"] = "yes"
    assert cluster.parse_namespace(ns) is False


def test_relist_forgets_what_the_new_list_lacks():
    state = load_list(SLICES, Stats())
    web_only = [
        o
        for o in SLICES["items"]
        if o["kind"] == "EndpointSlice" and o["metadata"]["name"].startswith("web-")
    ]
    state.replace(Kind.ENDPOINT_SLICE, web_only)
    assert [b for b in state.desired() if b.endpoints] == [EXPECTED_FROM_SLICES[-1]]


def test_endpoints_order_and_output_do_not_depend_on_input_order():
    text = rules.build_restore(load_list(SLICES, Stats()).desired(), "")
    rng = random.Random(7)
    for _ in range(5):
        items = list(SLICES["items"])
        rng.shuffle(items)
        for obj in items:
            if obj["kind"] == "EndpointSlice" and obj.get("endpoints"):
                obj = {**obj, "endpoints": rng.sample(obj["endpoints"], len(obj["endpoints"]))}
        doc = {**SLICES, "items": items}
        assert rules.build_restore(load_list(doc, Stats()).desired(), "") == text


def test_restore_text_balances_like_kube_proxy_and_dnats_both_protocols():
    b = ServiceBackends("p", "s", "172.30.1.1", ("10.0.0.1", "10.0.0.2", "10.0.0.10"))
    text = rules.build_restore([b], "")
    svc = rules.chain_name(rules.SVC_PREFIX, "p", "s", "172.30.1.1")
    seps = [rules.chain_name(rules.SEP_PREFIX, "p", "s", "172.30.1.1", ip) for ip in b.endpoints]
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert "-I PREROUTING 1 -j TENCRYPT" in lines and "-I OUTPUT 1 -j TENCRYPT" in lines
    for proto in ("udp", "tcp"):
        assert (
            f"-A TENCRYPT -d 172.30.1.1/32 -p {proto} -m {proto} --dport 1337 "
            f'-m comment --comment "p/s tunnel" -j {svc}'
        ) in lines
    picks = [line for line in lines if line.startswith(f"-A {svc} ")]
    assert [p.split("-j ")[1] for p in picks] == seps  # numeric order: .1, .2, .10
    assert "--probability 0.3333333333 " in picks[0] and "--probability 0.5000000000 " in picks[1]
    assert "statistic" not in picks[2]
    for sep, ip in zip(seps, b.endpoints, strict=True):
        assert f"-A {sep} -p udp -m udp -j DNAT --to-destination {ip}:1337" in lines
        assert f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:1337" in lines
    assert rules.build_restore([b], "", port=4000).count(":4000") == 6


@given(st.integers(min_value=1, max_value=40))
def test_each_endpoint_is_chosen_with_one_over_n(n):
    ips = tuple(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(n))
    _, lines = rules.build_rules([ServiceBackends("p", "s", "172.30.1.1", ips)])
    picks = [line for line in lines if " -j TENC-SEP-" in line and line.startswith("-A TENC-SVC-")]
    left, chances = 1.0, []
    for line in picks:
        p = float(line.split("--probability ")[1].split()[0]) if "statistic" in line else 1.0
        chances.append(left * p)
        left *= 1 - p
    assert len(chances) == n and left == pytest.approx(0, abs=1e-9)
    assert chances == pytest.approx([1 / n] * n, rel=1e-8)


def test_jumps_are_not_duplicated_and_stale_chains_are_deleted():
    existing = "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":TENCRYPT - [0:0]",
            ":TENC-SEP-OLDOLDOLDOLDOLDO - [0:0]",
            ":KUBE-SERVICES - [0:0]",
            "-A PREROUTING -m comment --comment x -j TENCRYPT",
            "-A OUTPUT -j TENCRYPT",
            "-A TENC-SEP-OLDOLDOLDOLDOLDO -p udp -m udp -j DNAT --to-destination 10.9.9.9:1337",
            "COMMIT",
        ]
    )
    lines = rules.build_restore(EXPECTED_FROM_SLICES, existing).splitlines()
    assert not [line for line in lines if line.startswith("-I ")]
    assert ":TENC-SEP-OLDOLDOLDOLDOLDO - [0:0]" in lines  # flushed, then ...
    assert lines[-2] == "-X TENC-SEP-OLDOLDOLDOLDOLDO"  # ... deleted after the rules
    assert not [line for line in lines if "KUBE-" in line]  # never touches other chains
    assert rules.parse_jumps(existing) == {"PREROUTING", "OUTPUT"}


# iptables-save (nf_tables backend, v1.8.9) output of a node programmed by node-sync
SAVED = """# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:TENC-SVC-NOTNATNOTNATNOTN - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TENC-SEP-BQ4LNP4LGJDB3BOT - [0:0]
:TENC-SEP-YQMHR3SMIWAM4TKW - [0:0]
:TENC-SVC-5TKGAJFK3DXGCOTO - [0:0]
:TENCRYPT - [0:0]
-A PREROUTING -j TENCRYPT
-A OUTPUT -j TENCRYPT
-A TENC-SEP-BQ4LNP4LGJDB3BOT -p udp -m udp -j DNAT --to-destination 10.128.0.12:1337
-A TENC-SEP-BQ4LNP4LGJDB3BOT -p tcp -m tcp -j DNAT --to-destination 10.128.0.12:1337
-A TENC-SEP-YQMHR3SMIWAM4TKW -p udp -m udp -j DNAT --to-destination 10.128.0.11:1337
-A TENC-SEP-YQMHR3SMIWAM4TKW -p tcp -m tcp -j DNAT --to-destination 10.128.0.11:1337
-A TENC-SVC-5TKGAJFK3DXGCOTO -m comment --comment "shop/web -> 10.128.0.11" -m statistic --mode random --probability 0.50000000000 -j TENC-SEP-YQMHR3SMIWAM4TKW
-A TENC-SVC-5TKGAJFK3DXGCOTO -m comment --comment "shop/web -> 10.128.0.12" -j TENC-SEP-BQ4LNP4LGJDB3BOT
-A TENCRYPT -d 172.30.12.34/32 -p udp -m udp --dport 1337 -m comment --comment "shop/web tunnel" -j TENC-SVC-5TKGAJFK3DXGCOTO
-A TENCRYPT -d 172.30.12.34/32 -p tcp -m tcp --dport 1337 -m comment --comment "shop/web tunnel" -j TENC-SVC-5TKGAJFK3DXGCOTO
COMMIT
"""


def test_programmed_pairs_are_read_back_from_iptables_save():
    assert rules.parse_programmed(SAVED) == {
        ("172.30.12.34", "10.128.0.11"),
        ("172.30.12.34", "10.128.0.12"),
    }
    assert rules.parse_chains(SAVED)[-1] == "TENCRYPT"  # the filter table's chain is not ours
    assert "TENC-SVC-NOTNATNOTNATNOTN" not in rules.parse_chains(SAVED)
    assert len(rules.owned_lines(SAVED)) == 4 + 2 + 8  # chains, jumps, rules


def test_cleanup_removes_jumps_and_every_owned_chain():
    lines = rules.build_cleanup(SAVED).splitlines()
    assert "-D PREROUTING -j TENCRYPT" in lines and "-D OUTPUT -j TENCRYPT" in lines
    assert sorted(line for line in lines if line.startswith("-X ")) == sorted(
        f"-X {c}"
        for c in [
            "TENC-SEP-BQ4LNP4LGJDB3BOT",
            "TENC-SEP-YQMHR3SMIWAM4TKW",
            "TENC-SVC-5TKGAJFK3DXGCOTO",
            "TENCRYPT",
        ]
    )
    assert rules.build_cleanup("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


def test_chain_names_are_stable_and_fit_the_kernel_limit():
    name = rules.chain_name(rules.SEP_PREFIX, "a" * 63, "b" * 63, "172.30.255.255", "10.1.2.3")
    assert len(name) <= 28 and name == rules.chain_name(
        rules.SEP_PREFIX, "a" * 63, "b" * 63, "172.30.255.255", "10.1.2.3"
    )


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["None", "10.0.0.1", "fd00::1", "IPv4", "ExternalName", "true"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "metadata",
                    "name",
                    "namespace",
                    "labels",
                    "spec",
                    "clusterIP",
                    "clusterIPs",
                    "type",
                    "endpoints",
                    "addresses",
                    "conditions",
                    "ready",
                    "addressType",
                    "subsets",
                    "ip",
                    "kubernetes.io/service-name",
                    "tencrypt.io/enabled",
                    "terminating",
                    "serving",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(Kind)), st.sampled_from(list(EventType)), JSONISH)
def test_any_object_is_folded_or_counted_never_raised(kind, event, obj):
    state = load_list(SLICES, Stats())
    state.on_event(kind, event, obj)
    for b in state.desired():
        assert all(ip.count(".") == 3 for ip in (b.vip, *b.endpoints))


def test_garbage_lists_are_counted():
    stats = Stats()
    assert parse_list({"items": "nope"}, stats) == [] and parse_list([], stats) == []
    assert parse_list({"items": [{"kind": "Pod"}, 3, {"kind": "Service", "x": 1}]}, stats) == [
        (Kind.SERVICE, {"kind": "Service", "x": 1})
    ]
    assert stats.get("nodesync_bad_object") == 3
    state = ClusterState(stats)
    state.on_event(Kind.SERVICE, EventType.ADDED, {"kind": "Service", "x": 1})
    assert stats.get("nodesync_bad_object") == 4


def test_a_service_turning_malformed_stops_forwarding():
    state = load_list(SLICES, Stats())
    bad = kubeobjects.build_service("shop", "web", "172.30.12.34")
    bad["spec"]["clusterIPs"] = ["banana"]
    state.on_event(Kind.SERVICE, EventType.MODIFIED, bad)
    assert "web" not in {b.name for b in state.desired()}
    assert state.stats.get("nodesync_bad_object") == 1


def test_lab_services_become_the_same_objects_a_cluster_holds():
    # the lab's Services, as the lab plans them: one endpoint, two replicas with a named
    # targetPort (one slice per resolved port set), a not-ready replica, a headless Service
    topology = Topology(
        pods=[
            PodSpec("nginx1", "myproject"),
            PodSpec("nginx2", "myproject", ports={"http": 8080}),
            PodSpec("nginx3", "myproject", ports={"http": 9090}),
            PodSpec("cakephp", "project2"),
        ],
        services=[
            ServiceSpec("web", "myproject", ["nginx2", "nginx3"], not_ready=["nginx1"]),
            ServiceSpec("db", "myproject", ["nginx3"], headless=True),
        ],
    )
    _, pods = topology.plan("t", 1)
    objs = kubeobjects.lab_objects(topology.plan_services(pods))
    doc = json.loads(json.dumps(kubeobjects.build_list(objs)))
    assert load_list(doc, Stats()).desired() == [
        ServiceBackends("myproject", "nginx1", "172.30.0.11", ("172.17.0.11",)),
        ServiceBackends("myproject", "nginx2", "172.30.0.12", ("172.17.0.12",)),
        ServiceBackends("myproject", "nginx3", "172.30.0.13", ("172.17.0.13",)),
        ServiceBackends("myproject", "web", "172.30.0.100", ("172.17.0.12", "172.17.0.13")),
        ServiceBackends("project2", "cakephp", "172.30.0.14", ("172.17.0.14",)),
    ]
    slices = [
        o for o in objs if o["kind"] == "EndpointSlice" and o["metadata"]["name"].startswith("web-")
    ]
    assert sorted(s["ports"][0]["port"] for s in slices) == [8080, 9090]  # one per port set


def test_pure_modules_do_no_io():
    for module in (cluster, rules, kubeobjects):
        assert not imported_roots(Path(module.__file__)) & FORBIDDEN, module.__name__


# -- the real kubernetes client against the API server double (loopback only) --------------


class RecordingApplier:
    name = "recording"

    def __init__(self):
        self.applied, self.modes = [], []

    def apply(self, backends, full=False, touched=None):
        self.applied.append(list(backends))
        self.modes.append("full" if full else "partial")

    @property
    def size(self):
        return sum(len(b.endpoints) for b in self.last) if self.applied else 0

    @property
    def last(self):
        return self.applied[-1] if self.applied else None


class Watching:
    """watch_and_sync in a thread, with the real client configured from a kubeconfig."""

    def __init__(self, server, tmp_path, resync=300.0, watch_timeout=300):
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        self.api = kubeclient.new_api_client(str(kubeconfig))
        self.applier, self.stop, self.stats = RecordingApplier(), threading.Event(), Stats()
        self.thread = threading.Thread(
            target=watch.watch_and_sync,
            daemon=True,
            args=(self.api, self.applier, self.stats, self.stop, resync, watch_timeout),
        )
        self.thread.start()

    def until(self, expected, what):
        wait_for(lambda: self.applier.last == expected, timeout=20, what=what)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=10)
        self.api.close()


@pytest.fixture
def api_server(request):
    servers = []

    def make(objects=SLICES["items"], **kw):
        server = FakeApiServer(objects, **kw)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def watching(tmp_path):
    made = []

    def make(server, **kw):
        w = Watching(server, tmp_path, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def web(ips):
    return ServiceBackends("shop", "web", "172.30.12.34", tuple(ips))


def test_real_client_fake_apiserver_watch_follows_pods_and_labels_without_polling(
    api_server, watching
):
    server = api_server()
    w = watching(server)
    w.until(EXPECTED_FROM_SLICES, "first sync")
    # pod web-...-h8w2x (10.128.0.12) replaced by a new pod at 10.128.0.13
    server.put(
        kubeobjects.build_endpoint_slice(
            "shop", "web", ["10.128.0.11", "10.128.0.13"], suffix="m5l7c"
        )
    )
    w.until([*EXPECTED_FROM_SLICES[:3], web(["10.128.0.11", "10.128.0.13"])], "pod replaced")
    server.put(kubeobjects.build_namespace("shop", enabled=False))
    w.until([], "label removed")
    server.put(kubeobjects.build_namespace("shop", enabled=True))
    w.until([*EXPECTED_FROM_SLICES[:3], web(["10.128.0.11", "10.128.0.13"])], "label back")
    server.delete("Service", "shop", "web")
    w.until(EXPECTED_FROM_SLICES[:3], "service deleted")
    # one list per kind, then only watches: nothing was polled
    for kind in (Kind.NAMESPACE, Kind.SERVICE, Kind.ENDPOINT_SLICE):
        assert server.count(kind, "list") == 1 + (kind is Kind.ENDPOINT_SLICE)  # + detection
        assert server.count(kind, "watch") == 1
    assert server.count(Kind.ENDPOINTS, "list") == 0
    assert len(w.applier.applied) == 5  # exactly one apply per change, none for nothing


def test_real_client_fake_apiserver_resumes_a_timed_out_watch_without_relisting(
    api_server, watching
):
    server = api_server()
    w = watching(server)
    w.until(EXPECTED_FROM_SLICES, "first sync")
    server.end_watches()
    wait_for(lambda: server.count(Kind.ENDPOINT_SLICE, "watch") == 2, what="re-watch")
    server.put(kubeobjects.build_endpoint_slice("shop", "web", ["10.128.0.13"], suffix="m5l7c"))
    w.until([*EXPECTED_FROM_SLICES[:3], web(["10.128.0.13"])], "change after re-watch")
    assert server.count(Kind.SERVICE, "list") == 1


def test_real_client_fake_apiserver_relists_after_410_gone(api_server, watching):
    server = api_server()
    w = watching(server)
    w.until(EXPECTED_FROM_SLICES, "first sync")
    server.pause_watches()  # a partition: meanwhile a pod is replaced and history compacted
    server.put(kubeobjects.build_endpoint_slice("shop", "web", ["10.128.0.13"], suffix="m5l7c"))
    server.compact()
    server.resume_watches()  # every re-watch asks for a version history no longer has
    w.until([*EXPECTED_FROM_SLICES[:3], web(["10.128.0.13"])], "change seen after relist")
    wait_for(
        lambda: server.count(Kind.SERVICE, "list") == server.count(Kind.NAMESPACE, "list") == 2,
        what="every kind relisted once",
    )


def test_real_client_fake_apiserver_without_slice_api_uses_endpoints(api_server, watching):
    server = api_server(ENDPOINTS["items"], serve_slices=False)
    w = watching(server)
    expected = load_list(ENDPOINTS, Stats()).desired()
    w.until(expected, "first sync from Endpoints")
    server.put(builders.build_endpoints("shop", "web", ["10.128.0.11", "10.128.0.13"]))
    w.until([*expected[:3], web(["10.128.0.11", "10.128.0.13"])], "Endpoints change")
    assert server.count(Kind.ENDPOINTS, "watch") == 1


def test_real_client_fake_apiserver_list_once_pages_through_everything(
    api_server, tmp_path, monkeypatch
):
    server = api_server()
    monkeypatch.setattr(kubeclient, "PAGE_SIZE", 2)  # 10 slices: 5 pages
    api = kubeclient.new_api_client(str(server.write_kubeconfig(tmp_path / "kc")))
    try:
        assert watch.list_once(api, Stats()).desired() == EXPECTED_FROM_SLICES
    finally:
        api.close()
    assert server.count(Kind.ENDPOINT_SLICE, "list") == 1 + 5


def test_real_client_fake_apiserver_refuses_a_wrong_token(api_server, tmp_path):
    server = api_server()
    path = server.write_kubeconfig(tmp_path / "kc")
    path.write_text(path.read_text().replace("tencrypt-test-token", "wrong"))
    api = kubeclient.new_api_client(str(path))
    try:
        with pytest.raises(
            SetupError, match=f"API server {server.url}: HTTP 401 .*check the token"
        ):
            watch.list_once(api, Stats())
    finally:
        api.close()


def test_real_client_an_api_server_not_up_yet_is_awaited_and_once_fails_clearly(
    api_server, watching, tmp_path, caplog
):
    """A node boots before its API server answers: the watch waits and retries (logged), then
    converges; --once fails at once with the server named, never a traceback."""
    down = api_server()
    port = int(down.url.rsplit(":", 1)[1])
    path = down.write_kubeconfig(tmp_path / "kc")
    down.stop()
    api = kubeclient.new_api_client(str(path))
    try:
        with pytest.raises(SetupError, match=f"API server {down.url}: .*[Rr]efused"):
            watch.list_once(api, Stats())
    finally:
        api.close()
    w = watching(down)
    wait_for(lambda: "not usable yet" in caplog.text, timeout=20, what="a logged retry")
    assert w.applier.last is None and w.thread.is_alive()
    up = FakeApiServer(SLICES["items"])
    up.start(port)
    try:
        w.until(EXPECTED_FROM_SLICES, "rules once the API server is up")
    finally:
        up.stop()


def test_syncer_waits_until_every_kind_is_listed():
    applier = RecordingApplier()
    syncer = watch.Syncer(applier, Stats(), (Kind.NAMESPACE, Kind.SERVICE, Kind.ENDPOINT_SLICE))
    by_kind = {k: [o for o in SLICES["items"] if o["kind"] == k.value] for k in syncer.kinds}
    syncer.fold(Listed(Kind.NAMESPACE, by_kind[Kind.NAMESPACE]))
    syncer.fold(Listed(Kind.SERVICE, by_kind[Kind.SERVICE]))
    assert syncer.sync() is False and applier.applied == []
    syncer.fold(Listed(Kind.ENDPOINT_SLICE, by_kind[Kind.ENDPOINT_SLICE]))
    assert syncer.sync() is True and applier.applied == [EXPECTED_FROM_SLICES]
    assert syncer.sync() is True and len(applier.applied) == 1  # unchanged: not re-applied
    assert syncer.sync(force=True) and len(applier.applied) == 2  # resync re-applies
    assert applier.modes == ["full", "full"]  # the first sync and the resync are full


# -- the manifests in scripts/k8s stay in step with the code ------------------------------

K8S = Path(__file__).resolve().parents[2] / "scripts" / "k8s"


def manifests():
    yaml = pytest.importorskip("yaml")
    docs = []
    for name in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "daemonset.yaml"):
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return docs, kustomization


def test_rbac_is_read_only_and_covers_exactly_what_node_sync_reads():
    docs, kustomization = manifests()
    assert sorted(kustomization["resources"]) == [
        "daemonset.yaml",
        "namespace.yaml",
        "rbac.yaml",
        "serviceaccount.yaml",
    ]
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "ClusterRole"}
    for rules_ in roles.values():
        for rule in rules_:
            assert set(rule["verbs"]) <= {"get", "list", "watch", "use"}, rule
            if "secrets" in rule["resources"]:
                assert rule["resourceNames"] == ["tencrypt"]  # no other Secret, ever
    granted = {
        (group, res)
        for rule in roles["tencrypt-node-sync"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
        if {"list", "watch"} <= set(rule["verbs"])
    }
    read = {
        ("", "namespaces"),
        ("", "services"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
    }  # watch.list_function's four calls
    assert granted == read


def test_daemonset_is_privileged_on_the_host_and_node_sync_args_parse():
    import argparse

    from tencrypt.nodesync.cli import add_arguments

    docs, _ = manifests()
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] and spec["hostPID"] and spec["serviceAccountName"] == "tencrypt"
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"node-sync", "agent"}
    assert all(c["securityContext"]["privileged"] for c in containers.values())
    sync = containers["node-sync"]
    assert sync["command"] == ["tencrypt", "node-sync"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(kubelet_expands(sync))
    assert not args.once and args.iptables in ("iptables", "iptables-nft", "iptables-legacy")
    assert args.backend == "auto"  # nft on nodes that have it (issue #15), else iptables
