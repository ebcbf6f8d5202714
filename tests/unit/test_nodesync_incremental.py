"""node-sync's incremental recompute, without root: a watch event recomputes only the Services
it can change (``ClusterState.refresh``), and the result is always what a recompute of
everything from the same objects gives — for random event sequences (Hypothesis), with
relists, malformed objects, namespaces losing their label, slices moving between Services
and two Services claiming one VIP. The nft program built from the touched VIPs only
(``nftrules.updated``, ``diff(only=)``) is the one built from everything."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tencrypt.core.stats import Stats
from tencrypt.kube.objects import EventType
from tencrypt.kube.reflector import Changed
from tencrypt.nodesync import cluster, nftrules, watch
from tencrypt.nodesync.cluster import ClusterState, Kind, ServiceBackends
from tencrypt.nodesync.kubeobjects import (
    build_endpoint_slice,
    build_namespace,
    build_service,
)
from tests.kubefakes import builders
from tests.unit.test_nodesync_scale import fold_fixture

NAMESPACES = ("shop", "blog")
SERVICES = ("a", "b", "c")
# every sequence starts from a small live cluster, so that short random sequences reach the
# interesting cases (a slice moving between two forwarded Services) often
START = [
    ("put", (("Namespace", "", "shop"), build_namespace("shop"))),
    ("put", (("Service", "shop", "a"), build_service("shop", "a", "172.30.1.1"))),
    ("put", (("Service", "shop", "b"), build_service("shop", "b", "172.30.1.2"))),
    ("sync", None),
]
PODS = tuple(f"10.1.0.{i}" for i in range(1, 6))


def _service(ns: str, name: str, vip: int) -> dict:
    if vip == 0:  # headless
        obj = build_service(ns, name, "None")
        obj["spec"]["clusterIPs"] = ["None"]
        return obj
    if vip == 9:  # malformed: counted, and the Service stops forwarding
        obj = build_service(ns, name, "172.30.1.1")
        obj["spec"]["clusterIPs"] = ["banana"]
        return obj
    return build_service(ns, name, f"172.30.1.{vip}")  # a small pool: VIPs collide


def _slice(ns: str, slice_name: str, service: str, ready: list[int], gone: list[int]) -> dict:
    obj = build_endpoint_slice(
        ns,
        service,
        [PODS[i] for i in ready],
        suffix=slice_name,
        not_ready=[PODS[i] for i in gone if i not in ready],
    )
    obj["metadata"]["name"] = slice_name  # one slice name, any Service: slices move
    return obj


# one object of some kind: its store key and the object
OBJECTS = st.one_of(
    st.builds(
        lambda ns, on: (("Namespace", "", ns), build_namespace(ns, on)),
        st.sampled_from(NAMESPACES),
        st.booleans(),
    ),
    st.builds(
        lambda ns, name, vip: (("Service", ns, name), _service(ns, name, vip)),
        st.sampled_from(NAMESPACES),
        st.sampled_from(SERVICES),
        st.integers(0, 9),
    ),
    st.builds(
        lambda ns, sl, svc, ready, gone: (
            ("EndpointSlice", ns, sl),
            _slice(ns, sl, svc, ready, gone),
        ),
        st.sampled_from(NAMESPACES),
        st.sampled_from(("s1", "s2")),
        st.sampled_from(SERVICES),
        st.lists(st.integers(0, len(PODS) - 1), max_size=3),
        st.lists(st.integers(0, len(PODS) - 1), max_size=2),
    ),
    st.builds(
        lambda ns, svc, ips: (
            ("Endpoints", ns, svc),
            builders.build_endpoints(ns, svc, [PODS[i] for i in ips]),
        ),
        st.sampled_from(NAMESPACES),
        st.sampled_from(SERVICES),
        st.lists(st.integers(0, len(PODS) - 1), max_size=3),
    ),
)
# a step: put an object, delete one, relist a kind, or sync (refresh) here
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), OBJECTS),
        st.tuples(st.just("delete"), OBJECTS),
        st.tuples(st.just("relist"), st.sampled_from(list(Kind))),
        st.tuples(st.just("sync"), st.none()),
    ),
    max_size=40,
)


def _from_scratch(store: dict) -> list[ServiceBackends]:
    """The desired state of a new ClusterState fed the objects as they are now."""
    fresh = ClusterState(Stats())
    for (kind, _, _), obj in store.items():
        fresh.on_event(Kind(kind), EventType.ADDED, obj)
    return fresh.desired(full=True)


@settings(max_examples=500, deadline=None)
@given(STEPS)
@example(  # a slice relabelled from one forwarded Service to another: both change
    [
        ("put", (("EndpointSlice", "shop", "s1"), _slice("shop", "s1", "a", [0], []))),
        ("sync", None),
        ("put", (("EndpointSlice", "shop", "s1"), _slice("shop", "s1", "b", [1], []))),
        ("sync", None),
    ]
)
@example(  # the namespace loses its label, then its Services change while it is off
    [
        ("put", (("Namespace", "", "shop"), build_namespace("shop", False))),
        ("sync", None),
        ("put", (("Service", "shop", "a"), _service("shop", "a", 5))),
        ("put", (("Namespace", "", "shop"), build_namespace("shop", True))),
        ("sync", None),
    ]
)
def test_incremental_recompute_equals_a_full_one_for_any_event_sequence(steps):
    state, store = ClusterState(Stats()), {}
    program = nftrules.program_of(state.desired())
    for verb, arg in [*START, *steps]:
        if verb == "put":
            (kind, ns, name), obj = arg
            store[(kind, ns, name)] = obj
            state.on_event(Kind(kind), EventType.MODIFIED, obj)
        elif verb == "delete":
            (kind, ns, name), obj = arg
            store.pop((kind, ns, name), None)
            state.on_event(Kind(kind), EventType.DELETED, obj)
        elif verb == "relist":
            state.replace(arg, [o for (k, _, _), o in store.items() if k == arg.value])
        else:
            changes = state.refresh()
            desired = state.desired()
            assert desired == _from_scratch(store)
            # the backend, told only the touched VIPs, builds the same program and diff
            touched = {b.vip for pair in changes.values() for side in pair for b in side}
            new = nftrules.program_of(desired)
            assert nftrules.updated(program, desired, touched) == new
            assert nftrules.diff(program, new, only=touched) == nftrules.diff(program, new)
            program = new
    assert state.desired() == _from_scratch(store)
    assert state.desired(full=True) == _from_scratch(store)


def _big_cluster(n: int) -> ClusterState:
    state = ClusterState(Stats())
    state.on_event(Kind.NAMESPACE, EventType.ADDED, build_namespace("bench"))
    state.on_event(Kind.NAMESPACE, EventType.ADDED, build_namespace("small"))
    for i in range(n):
        state.on_event(
            Kind.SERVICE,
            EventType.ADDED,
            build_service("bench", f"s{i}", f"172.30.{i // 250}.{i % 250 + 1}"),
        )
        ips = [f"10.{128 + k}.{i // 250}.{i % 250 + 1}" for k in range(3)]
        state.on_event(
            Kind.ENDPOINT_SLICE,
            EventType.ADDED,
            build_endpoint_slice("bench", f"s{i}", ips, suffix="x"),
        )
    for i in range(3):
        state.on_event(
            Kind.SERVICE, EventType.ADDED, build_service("small", f"t{i}", f"172.31.0.{i + 1}")
        )
    return state


def test_one_event_recomputes_only_the_services_it_can_change(monkeypatch):
    """Counted, not timed: at 10,000 Services a slice event recomputes one Service, a
    namespace event the Services in that namespace; nothing at all when nothing changed."""
    state = _big_cluster(10_000)
    assert len(state.desired()) == 10_003
    computed = []
    real = cluster.ClusterState._compute
    monkeypatch.setattr(
        cluster.ClusterState, "_compute", lambda self, key: computed.append(key) or real(self, key)
    )
    moved = build_endpoint_slice("bench", "s42", ["10.9.9.9"], suffix="x")
    state.on_event(Kind.ENDPOINT_SLICE, EventType.MODIFIED, moved)
    changes = state.refresh()
    assert computed == [("bench", "s42")]
    assert [b.endpoints for b in changes[("bench", "s42")][1]] == [("10.9.9.9",)]
    computed.clear()
    assert state.refresh() == {} and computed == []
    state.on_event(Kind.NAMESPACE, EventType.MODIFIED, build_namespace("small", enabled=False))
    changes = state.refresh()
    assert sorted(computed) == [("small", f"t{i}") for i in range(3)]
    assert set(changes) == {("small", f"t{i}") for i in range(3)}
    assert len(state.desired()) == 10_000


class Recorder:
    name = "recording"
    size = 0

    def __init__(self):
        self.calls = []

    def apply(self, backends, full=False, touched=None):
        self.calls.append(("full" if full else "partial", list(backends), touched))


def test_the_syncer_tells_the_backend_which_vips_an_event_touched_and_resync_repairs():
    applier = Recorder()
    syncer = watch.Syncer(applier, Stats(), (Kind.NAMESPACE, Kind.SERVICE, Kind.ENDPOINT_SLICE))
    fold_fixture(syncer)
    assert syncer.sync()
    full = applier.calls[-1][1]
    moved = build_endpoint_slice("shop", "web", ["10.128.0.13"], suffix="m5l7c")
    syncer.fold(Changed(Kind.ENDPOINT_SLICE, EventType.MODIFIED, moved))
    assert syncer.sync()
    mode, backends, touched = applier.calls[-1]
    assert mode == "partial" and touched == {"172.30.12.34"}
    web = [b for b in backends if b.name == "web"]
    assert [b.endpoints for b in web] == [("10.128.0.13",)]
    assert [b for b in backends if b.name != "web"] == [b for b in full if b.name != "web"]
    # a bookkeeping slip in the cache (as a bug would leave it) lasts until the next
    # resync: that one recomputes every Service from the objects
    syncer.state.entries[("shop", "web")] = (ServiceBackends("shop", "web", "1.2.3.4", ()),)
    assert syncer.sync(force=True)
    mode, backends, touched = applier.calls[-1]
    assert mode == "full" and touched is None
    assert [b.endpoints for b in backends if b.name == "web"] == [("10.128.0.13",)]
    assert "1.2.3.4" not in {b.vip for b in backends}
