"""The agent's membership feed without root: Pods and Services → each project's members
(pure), and the files that carry them (``members.json`` in setup's state directory)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.agent import feed, members
from tencrypt.agent.feed import MembersFeed
from tencrypt.agent.members import (
    MemberView,
    ProjectMembers,
    parse_pod_ips,
    parse_service,
    parse_service_ips,
)
from tencrypt.core.membership import parse_members
from tencrypt.core.stats import Stats
from tencrypt.kube.objects import EventType
from tests.kubefakes import builders as kubeobjects
from tests.unit.test_purity import FORBIDDEN, imported_roots

ADDED, MODIFIED, DELETED = EventType.ADDED, EventType.MODIFIED, EventType.DELETED


def pod(name, ip="10.128.0.9", ns="shop", node="n1", ips=None, **kw):
    obj = kubeobjects.build_pod(ns, name, node, ip, **kw)
    if ips is not None:
        obj["status"]["podIPs"] = [{"ip": i} for i in ips]
    return obj


def service(name, *vips, ns="shop", **spec):
    obj = kubeobjects.build_service(ns, name, vips[0] if vips else "None")
    obj["spec"]["clusterIPs"] = list(vips) if vips else ["None"]
    obj["spec"].update(spec)
    return obj


# -- what one object contributes ------------------------------------------------------------


def test_a_pod_counts_with_every_ip_of_both_families_in_canonical_text():
    assert parse_pod_ips(pod("web", ips=["10.128.0.9", "FD00:10:128:0::0009"])) == (
        "shop",
        "web",
        frozenset({"10.128.0.9", "fd00:10:128::9"}),
    )
    only_pod_ip = pod("old")
    del only_pod_ip["status"]["podIPs"]  # an older API server: podIP only
    assert parse_pod_ips(only_pod_ip)[2] == {"10.128.0.9"}


def test_pods_without_an_ip_finished_or_on_the_host_network_hold_no_address():
    for obj in (
        pod("pending", ip=None),
        pod("done", phase="Succeeded"),
        pod("crashed", phase="Failed"),
        pod("hostnet", ip="192.168.200.1", host_network=True),
    ):
        assert parse_pod_ips(obj) == ("shop", obj["metadata"]["name"], frozenset()), obj
    leaving = pod("leaving")
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert parse_pod_ips(leaving)[2] == {"10.128.0.9"}  # still talking: still a member


def test_malformed_pods_are_refused():
    garbage = [
        None,
        [],
        {"metadata": {"name": "x"}},
        pod("a", ips=["10.0.0.300"]),
        pod("b", ips=[None]),
        {**pod("c"), "status": {"podIPs": "10.0.0.1"}},
        {**pod("d"), "spec": "nope"},
    ]
    assert [parse_pod_ips(obj) for obj in garbage] == [None] * len(garbage)


def test_a_service_counts_with_its_cluster_ips_but_headless_and_external_names_do_not():
    assert parse_service_ips(service("web", "172.30.0.10", "fd00:30::a")) == (
        "shop",
        "web",
        frozenset({"172.30.0.10", "fd00:30::a"}),
    )
    legacy = service("old", "172.30.0.11")
    del legacy["spec"]["clusterIPs"]  # clusterIP only
    assert parse_service_ips(legacy)[2] == {"172.30.0.11"}
    assert parse_service_ips(service("db"))[2] == frozenset()  # headless
    assert parse_service_ips(service("up", "172.30.0.12", type="ExternalName"))[2] == set()
    assert parse_service_ips(service("bad", "banana")) is None
    assert parse_service_ips(service("worse", clusterIPs="172.30.0.1")) is None


# -- a project's members, and when they change ----------------------------------------------


def test_members_of_a_project_come_from_every_node_and_only_its_own_namespace():
    view = MemberView()
    view.replace_pods(
        [
            pod("a", "10.128.0.1"),
            pod("b", "10.128.1.1", node="n2"),
            pod("c", "10.128.2.1", ns="blog"),
            pod("d", None),
        ]
    )
    view.replace_services(
        [
            service("web", "172.30.0.10", "fd00:30::a"),
            service("db"),
            service("x", "172.30.9.9", ns="blog"),
        ]
    )
    shop = view.of("shop")
    assert (shop.project, shop.version, shop.pods, shop.services) == (
        "shop",
        view.version("shop"),
        frozenset({"10.128.0.1", "10.128.1.1"}),
        frozenset({"172.30.0.10", "fd00:30::a"}),
    )
    assert shop.table is not None and [s.name for s in shop.table] == ["web"]  # db: headless
    assert view.of("nobody") == ProjectMembers("nobody", 0, frozenset(), frozenset(), ())


def test_the_version_moves_only_when_an_address_of_the_project_changes():
    stats = Stats()
    view = MemberView(stats)
    view.replace_pods([pod("a", "10.128.0.1"), pod("c", "10.128.2.1", ns="blog")])
    view.replace_services([])
    shop, blog = view.version("shop"), view.version("blog")
    assert shop > 0 and blog > 0
    not_ready = pod("a", "10.128.0.1")
    not_ready["status"]["conditions"][0]["status"] = "False"
    view.on_pod(MODIFIED, not_ready)  # readiness, same address
    view.replace_pods([not_ready, pod("c", "10.128.2.1", ns="blog")])  # a relist, no news
    assert (view.version("shop"), view.version("blog")) == (shop, blog)
    view.on_pod(ADDED, pod("b", "10.128.1.1", node="n2"))
    assert (view.version("shop"), view.version("blog")) == (shop + 1, blog)
    view.on_pod(MODIFIED, pod("b", "10.128.1.1", node="n2", phase="Succeeded"))
    assert view.version("shop") == shop + 2 and view.of("shop").pods == {"10.128.0.1"}
    view.on_service(ADDED, service("web", "172.30.0.10"))
    view.on_service(DELETED, service("web", "172.30.0.10"))
    assert view.version("shop") == shop + 4 and view.of("shop").services == frozenset()
    view.on_pod(MODIFIED, pod("a", ips=["not-an-ip"]))  # malformed: counted, last kept
    assert view.of("shop").pods == {"10.128.0.1"} and stats.get("agent_bad_object") == 1
    view.on_pod(DELETED, pod("a", "10.128.0.1"))
    assert view.version("shop") == shop + 5 and view.of("shop").pods == frozenset()
    assert view.pods == {"blog": {"c": frozenset({"10.128.2.1"})}}  # nothing empty is kept


POD_IPS = st.sampled_from([None, "10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.3"])
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["pod", "svc"]),
        st.sampled_from([ADDED, MODIFIED, DELETED]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["p", "q"]),
        POD_IPS,
        st.booleans(),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_members_and_versions_follow_any_sequence_of_events(events):
    """Model: the objects as the API holds them. After every event, each project's members
    are what those objects say, and a project whose members moved has a newer version (a
    writer never misses a change)."""
    view = MemberView()
    view.replace_pods([])
    view.replace_services([])
    pods: dict = {}
    services: dict = {}
    for kind, event, name, ns, ip, finished in events:
        before = {p: view.of(p) for p in ("p", "q")}
        if kind == "pod":
            obj = pod(name, ip, ns=ns, phase="Failed" if finished else "Running")
            view.on_pod(event, obj)
            table, contributes = pods, ip if ip and not finished else None
        else:
            obj = service(name, *([ip] if ip else []), ns=ns)
            view.on_service(event, obj)
            table, contributes = services, ip
        if event is DELETED or contributes is None:
            table.pop((ns, name), None)
        else:
            table[(ns, name)] = contributes
        for p in ("p", "q"):
            now = view.of(p)
            assert now.pods == {ip for (n, _), ip in pods.items() if n == p}
            assert now.services == {ip for (n, _), ip in services.items() if n == p}
            moved = (now.pods, now.services) != (before[p].pods, before[p].services)
            assert now.version >= before[p].version and (
                now.version > before[p].version or not moved
            )


def test_pure_modules_do_no_io():
    assert not imported_roots(Path(members.__file__)) & FORBIDDEN


# -- the files ------------------------------------------------------------------------------


class Clock:
    def __init__(self, now=1_000.0):
        self.now = now

    def __call__(self):
        return self.now


def pm(version, pods=("10.128.0.1",), services=("172.30.0.10",), project="shop"):
    return ProjectMembers(project, version, frozenset(pods), frozenset(services))


def test_a_file_is_written_atomically_in_the_agents_directory_for_the_pod(tmp_path):
    root = tmp_path / "pods"
    f = MembersFeed(root, clock=Clock())
    doc = f.write("uid-a", pm(1, pods=("10.128.0.1", "fd00::1")))
    path = root / "uid-a" / "members.json"  # by pod UID: never another pod's (core/netnsid.py)
    assert f.path("uid-a") == path and parse_members(path.read_text()) == doc
    assert json.loads(path.read_text())["pods"] == ["10.128.0.1", "fd00::1"]
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in path.parent.iterdir()) == ["members.json"]  # no temp left
    assert doc.generation == 1_000_000 and f.writes == 1


def test_the_generation_grows_with_every_change_and_nothing_is_rewritten_for_nothing(tmp_path):
    clock = Clock()
    f = MembersFeed(tmp_path, clock=clock)
    first = f.write("u7", pm(1))
    assert f.is_current("u7", pm(1)) and not f.is_current("u7", pm(2))
    assert f.write("u7", pm(1)) is None  # same version: no I/O at all
    assert f.write("u7", pm(2)) is None and f.writes == 1  # new version, same members
    second = f.write("u7", pm(3, pods=("10.128.0.2",)))  # the clock has not moved: +1
    assert second.generation == first.generation + 1
    clock.now = 2_000.0
    assert f.write("u7", pm(4)).generation == 2_000_000 and f.writes == 3


def test_a_restarted_agent_continues_the_generation_a_running_proxy_holds(tmp_path):
    old = MembersFeed(tmp_path, clock=Clock(5_000.0))
    held = old.write("u7", pm(9))
    new = MembersFeed(tmp_path, clock=Clock(1.0))  # its clock went back, and versions restart
    assert new.write("u7", pm(1)) is None and new.writes == 0  # the file is right: kept
    assert new.write("u7", pm(2, pods=())).generation == held.generation + 1
    # a file damaged (or removed) under the proxy: the clock keeps the generation ahead
    f = MembersFeed(tmp_path, clock=Clock(9_000.0))
    f.path("u7").write_text("{half a file")
    assert f.write("u7", pm(1)).generation == 9_000_000


def test_remove_deletes_the_file_and_forgets_what_it_held(tmp_path):
    f = MembersFeed(tmp_path, clock=Clock())
    f.write("u7", pm(1))
    (tmp_path / "u7" / "record.json").write_text("{}")  # the supervisor's: not the feed's
    f.remove("u7")
    assert [p.name for p in (tmp_path / "u7").iterdir()] == ["record.json"]
    assert not f.is_current("u7", pm(1))
    f.remove("u9")  # nothing there: nothing to do


def test_an_adopted_older_proxy_is_fed_where_it_reads_until_its_pod_is_undone(tmp_path):
    """A proxy started by an agent that wrote into setup's netns-<inode> directory keeps
    reading there: its file is continued there (generation included), and removed there."""
    legacy = tmp_path / "setup" / "netns-4242" / "members.json"
    held = MembersFeed(tmp_path / "x", clock=Clock(5_000.0)).write("u7", pm(9))
    legacy.parent.mkdir(parents=True)
    legacy.write_text((tmp_path / "x" / "u7" / "members.json").read_text())
    f = MembersFeed(tmp_path / "pods", clock=Clock(1.0))
    f.read_by("u7", legacy)
    assert f.path("u7") == legacy
    assert f.write("u7", pm(2, pods=())).generation == held.generation + 1
    assert parse_members(legacy.read_text()).pods == frozenset()
    assert not (tmp_path / "pods").exists()
    f.remove("u7")
    assert not legacy.exists() and f.path("u7") == tmp_path / "pods" / "u7" / "members.json"


def test_feed_module_names_the_file_the_proxy_reads():
    assert feed.FILE_NAME == "members.json"


# -- Services with their ports and endpoints (format 2) -------------------------------------


def web_objects():
    svc = kubeobjects.build_service(
        "shop",
        "web",
        "172.30.0.10",
        ports=[
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ],
        affinity=600,
    )
    a = kubeobjects.build_endpoint_slice(
        "shop",
        "web",
        ["10.128.0.2"],
        suffix="a",
        not_ready=["10.128.0.3"],
        ports=[
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ],
    )
    b = kubeobjects.build_endpoint_slice(
        "shop", "web", ["10.129.0.4"], suffix="b", ports=[{"name": "http", "port": 9090}]
    )
    b["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    b["endpoints"][0]["hints"] = {"forZones": [{"name": "zone-a"}]}
    return svc, a, b


def test_a_service_carries_its_ports_affinity_and_each_endpoints_own_ports_and_conditions():
    view = MemberView()
    svc, a, b = web_objects()
    view.replace_services([svc])
    view.replace_slices([a, b])
    [web] = view.of("shop").table or ()
    assert web.ips == ("172.30.0.10",) and web.affinity == 600.0
    assert [(p.name, p.protocol, p.port) for p in web.ports] == [("http", 6, 80), ("dns", 17, 53)]
    by_ip = {e.ip: e for e in web.endpoints}
    assert list(by_ip) == ["10.128.0.2", "10.128.0.3", "10.129.0.4"]
    assert [(p.name, p.port) for p in by_ip["10.128.0.2"].ports] == [("http", 8080), ("dns", 5353)]
    assert by_ip["10.128.0.3"].ready is False and by_ip["10.128.0.3"].serving is False
    moving = by_ip["10.129.0.4"]
    assert (moving.ready, moving.serving, moving.terminating) == (False, True, True)
    assert moving.zones == ("zone-a",) and by_ip["10.128.0.2"].zones is None
    assert [(p.name, p.port) for p in moving.ports] == [("http", 9090)]


def test_slices_move_the_version_and_a_malformed_one_keeps_what_was_known():
    stats = Stats()
    view = MemberView(stats)
    svc, a, b = web_objects()
    view.replace_services([svc])
    view.replace_slices([a])
    v = view.version("shop")
    view.replace_slices([a])  # a relist that finds what was known
    assert view.version("shop") == v
    view.on_slice(EventType.ADDED, b)
    assert view.version("shop") == v + 1
    broken = dict(a, endpoints=[{"addresses": ["banana"]}])
    view.on_slice(EventType.MODIFIED, broken)
    assert stats.get("agent_bad_object") == 1 and view.version("shop") == v + 1
    [web] = view.of("shop").table or ()
    assert {e.ip for e in web.endpoints} == {"10.128.0.2", "10.128.0.3", "10.129.0.4"}
    view.on_slice(EventType.DELETED, b)
    [web] = view.of("shop").table or ()
    assert {e.ip for e in web.endpoints} == {"10.128.0.2", "10.128.0.3"}


def test_fqdn_slices_and_unresolved_ports_give_no_endpoint_port():
    view = MemberView()
    svc, a, _ = web_objects()
    fqdn = dict(a, addressType="FQDN", endpoints=[{"addresses": ["db.example.com"]}])
    unresolved = kubeobjects.build_endpoint_slice(
        "shop", "web", ["10.128.0.7"], suffix="u", ports=[{"name": "http", "port": None}]
    )
    view.replace_services([svc])
    view.replace_slices([fqdn, unresolved])
    [web] = view.of("shop").table or ()
    assert [(e.ip, e.ports) for e in web.endpoints] == [("10.128.0.7", ())]


def test_a_bad_affinity_or_port_makes_the_service_malformed():
    svc, _, _ = web_objects()
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 0}}
    assert parse_service(svc) is None
    svc, _, _ = web_objects()
    svc["spec"]["ports"][0]["protocol"] = "ICMP"
    assert parse_service(svc) is None


def test_a_dual_stack_pods_addresses_are_paired_in_the_file_single_stack_ones_are_not(tmp_path):
    """status.podIPs of a dual-stack pod become the file's ``podIPs`` (what lets a proxy
    believe the IPv6 claim beside the IPv4 source): one pair per pod, IPv4 first."""
    view = MemberView()
    view.replace_pods(
        [
            pod("a", "10.128.0.1", ips=["fd00:10:128::1", "10.128.0.1"]),  # IPv6 primary
            pod("b", "10.128.1.1", ips=["10.128.1.1"]),  # single stack: nothing to pair
            pod("c", "10.128.2.1", ips=["10.128.2.1", "fd00:10:128:2::1"], ns="blog"),
        ]
    )
    view.replace_services([service("web", "172.30.0.10", "fd00:30::a")])
    shop = view.of("shop")
    assert shop.pod_ips == (("10.128.0.1", "fd00:10:128::1"),)
    doc = MembersFeed(tmp_path, clock=Clock()).write("uid-a", shop)
    written = json.loads((tmp_path / "uid-a" / "members.json").read_text())
    assert written["podIPs"] == [["10.128.0.1", "fd00:10:128::1"]]
    assert doc is not None and doc.paired("10.128.0.1", "fd00:10:128::1")
    assert not doc.paired("10.128.1.1", "fd00:10:128::1")
