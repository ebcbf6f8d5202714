"""tencrypt agent without root, the pure part: which pods are wanted and with which key, the
reconciler (starts, stops, restarts with backoff), the sandbox parsers on sample crictl and
/proc outputs; and the manifests in scripts/k8s against the agent's flags and reads. The
shells (resolver, supervisor, the loop with the real client) are in test_agent_loop.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tencrypt.agent
from tencrypt.agent import podstate, sandbox
from tencrypt.agent.podstate import SANDBOX_PID_ANNOTATION, AgentKind, BadKey, NodeView
from tencrypt.agent.reconcile import Phase, Policy, Reconciler, Sandbox, Verb, Want
from tencrypt.core.psk import KeySet
from tencrypt.kube.objects import EventType
from tests.kubefakes import builders as kubeobjects
from tests.unit.test_probes import kubelet_expands
from tests.unit.test_purity import FORBIDDEN, imported_roots

KEY = "q1ICqQvTWb4Vh7K3mM4yOeJ3YbTpB0P0m1BQ8Xv6y2A="
KEY2 = "Zm9ydHktdHdvIGJ5dGVzIG9mIG5vdGhpbmcgbXVjaCE="
UID = "0f3a6b8e-5c1d-4e2f-9a7b-1c2d3e4f5a6b"
CID = "1f2e3d4c5b6a79880f1e2d3c4b5a69788f9e0d1c2b3a49586f7e8d9c0b1a2938"


def test_pure_modules_import_no_io():
    root = Path(tencrypt.agent.__file__).parent
    for name in ("podstate.py", "reconcile.py", "sandbox.py"):
        assert not imported_roots(root / name) & FORBIDDEN, name


# -- which pods are wanted ---------------------------------------------------------------


def view_of(*objs, node="n1"):
    view = NodeView(node)
    view.replace(AgentKind.NAMESPACE, [o for o in objs if o["kind"] == "Namespace"])
    view.replace(AgentKind.POD, [o for o in objs if o["kind"] == "Pod"])
    return view


def pod(name, ns="shop", node="n1", ip="10.128.0.9", **kw):
    return kubeobjects.build_pod(ns, name, node, ip, **kw)


def uid_of(name, ns="shop"):
    return kubeobjects.build_pod(ns, name, "n1", None)["metadata"]["uid"]


def test_wanted_pods_are_on_this_node_in_enabled_namespaces_with_their_own_network():
    terminating = pod("leaving")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    dual = pod("dual", ip="fd00::7")
    dual["status"]["podIPs"] = [{"ip": "fd00::7"}, {"ip": "10.128.0.7"}]
    view = view_of(
        kubeobjects.build_namespace("shop"),
        kubeobjects.build_namespace("blog", enabled=False),
        pod("web"),
        terminating,
        pod("pending", ip=None),
        pod("hostnet", host_network=True),
        pod("done", phase="Succeeded"),
        pod("crashed", phase="Failed"),
        pod("own-proxy", annotations={"tencrypt.io/agent": "false"}),
        pod("elsewhere", node="n2"),
        pod("api", ns="blog"),
        pod("orphan", ns="gone"),
        pod("v6only", ip="fd00::9"),
        dual,
    )
    assert [p.name for p in view.wanted()] == ["dual", "leaving", "v6only", "web"]
    assert view.pods[uid_of("dual")].ip == "10.128.0.7"  # IPv4: the tunnel's family
    assert view.pods[uid_of("v6only")].ip == "fd00::9"  # IPv6-only: the tunnel over IPv6
    assert "elsewhere" not in {p.name for p in view.pods.values()}
    assert view.stats.counters == {}


def test_labels_namespaces_and_pod_events_change_what_is_wanted():
    view = view_of(kubeobjects.build_namespace("shop"), pod("web"), pod("db"))
    view.on_event(
        AgentKind.NAMESPACE, EventType.MODIFIED, kubeobjects.build_namespace("shop", enabled=False)
    )
    assert view.wanted() == []
    view.on_event(AgentKind.NAMESPACE, EventType.MODIFIED, kubeobjects.build_namespace("shop"))
    view.on_event(AgentKind.POD, EventType.DELETED, pod("db"))
    assert [p.name for p in view.wanted()] == ["web"]
    view.on_event(AgentKind.POD, EventType.MODIFIED, pod("web", phase="Succeeded"))
    assert view.wanted() == []
    view.on_event(AgentKind.NAMESPACE, EventType.DELETED, kubeobjects.build_namespace("shop"))
    view.replace(AgentKind.POD, [pod("new")])  # a relist replaces, it does not merge
    assert list(view.pods.values())[0].name == "new" and view.wanted() == []


def test_sandbox_pid_annotation_is_a_positive_pid_or_nothing():
    for value, want in (
        ("4242", 4242),
        (" 77 ", 77),
        ("1", None),
        ("0", None),
        ("-5", None),
        ("12a", None),
        ("", None),
    ):
        p = podstate.parse_pod(pod("web", annotations={SANDBOX_PID_ANNOTATION: value}))
        assert p.sandbox_pid == want, value
    assert podstate.parse_pod(pod("web")).sandbox_pid is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "metadata",
                    "spec",
                    "status",
                    "uid",
                    "name",
                    "namespace",
                    "annotations",
                    "labels",
                    "data",
                    "PROJECT_PSK",
                    "items",
                    "info",
                    "pid",
                    "id",
                    "state",
                    "containers",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(json_values)
def test_malformed_objects_are_counted_never_raised(obj):
    view = NodeView("n1")
    for kind in AgentKind:
        view.on_event(kind, EventType.ADDED, obj)
    assert view.wanted() == []
    assert isinstance(podstate.parse_secret_key(obj), BadKey)
    text = json.dumps(obj)  # and the crictl parsers take whatever JSON comes
    sandbox.parse_crictl_inspect_pid(text), sandbox.parse_crictl_pods(text)
    sandbox.parse_crictl_ps(text)


@given(st.text(max_size=300))
def test_proc_text_parsers_never_raise(text):
    sandbox.parse_cgroup_pod_uid(text), sandbox.parse_proc_stat(text)
    sandbox.parse_crictl_inspect_pid(text), sandbox.parse_crictl_pods(text)


def test_project_key_comes_from_the_secret_and_errors_never_quote_it():
    secret = kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY + "\n"})
    assert podstate.parse_secret_key(secret) == KeySet(base64.b64decode(KEY))
    short = KEY[:30]
    for values in (
        {"OTHER": KEY},
        {"PROJECT_PSK": short},
        {"PROJECT_PSK": "A" * 43 + "="},
        {"PROJECT_PSK": "AAAA" * 10 + "AAA="},
    ):
        bad = podstate.parse_secret_key(kubeobjects.build_secret("shop", values))
        assert isinstance(bad, BadKey) and short[:8] not in bad.reason, values
    bad = podstate.parse_secret_key({"data": {"PROJECT_PSK": "%%%"}})
    assert "not valid Secret data" in bad.reason
    k1, k2 = (
        podstate.parse_secret_key(kubeobjects.build_secret("s", {"PROJECT_PSK": k}))
        for k in (KEY, KEY2)
    )
    assert podstate.key_id(k1) == podstate.key_id(k1) != podstate.key_id(k2)
    assert KEY not in podstate.key_id(k1)


def test_node_view_keeps_each_projects_key_from_the_watched_secrets():
    view = NodeView("n1")
    assert view.key("shop") == BadKey("no Secret tencrypt in the namespace")
    view.replace(
        AgentKind.SECRET,
        [
            kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY}),
            kubeobjects.build_secret("blog", {"PROJECT_PSK": "short"}),
        ],
    )
    assert view.key("shop") == KeySet(base64.b64decode(KEY))
    assert isinstance(view.key("blog"), BadKey) and "short" not in view.key("blog").reason
    view.on_event(
        AgentKind.SECRET,
        EventType.MODIFIED,
        kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY2}),
    )
    assert view.key("shop") == KeySet(base64.b64decode(KEY2))
    view.on_event(
        AgentKind.SECRET, EventType.DELETED, kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY2})
    )
    assert isinstance(view.key("shop"), BadKey)
    # a Secret of another name (a server that ignored the field selector) never becomes a key
    view.on_event(
        AgentKind.SECRET,
        EventType.ADDED,
        kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY}, name="db-password"),
    )
    view.on_event(AgentKind.SECRET, EventType.ADDED, {"metadata": "junk"})
    assert isinstance(view.key("shop"), BadKey) and view.stats.get("agent_bad_object") == 2
    view.replace(AgentKind.SECRET, [])  # a relist forgets what is gone
    assert view.keys == {}


# -- the reconciler ------------------------------------------------------------------------

SB, SB_NEW = Sandbox(100, 4026531999), Sandbox(300, 4026532111)


def want(uid="u1", sb=SB, key="k1"):
    return Want(uid, "shop", uid, sb, key)


def verbs(actions):
    return [(a.verb, a.want.uid) for a in actions]


def started(r, w, now=0.0, ready=True):
    [a] = r.plan(now)
    assert a.verb is Verb.START and a.want == w and not a.undo_first
    r.on_started(a.want, now)
    if ready:
        r.on_ready(w.uid, now)


def test_nothing_is_planned_before_the_first_complete_view():
    r = Reconciler()
    r.on_adopted(want(), Phase.DEAD, now=0.0)
    assert r.plan(0.0) == []  # not even the dead adopted proxy: the pods are not listed yet
    r.on_desired([])
    assert verbs(r.plan(0.0)) == [(Verb.STOP, "u1")]


def test_a_pod_starts_once_its_sandbox_and_key_are_known():
    r = Reconciler()
    r.on_desired([want(sb=None), want("u2", key=None)])
    assert r.plan(0.0) == []
    r.on_desired([want(), want("u2", key=None)])
    started(r, want())
    assert r.plan(1.0) == [] and r.next_deadline() is None


@pytest.mark.parametrize(
    "changed, reason",
    [(want(sb=SB_NEW), "sandbox"), (want(sb=None), "sandbox"), (None, "pod gone")],
)
def test_pod_gone_or_sandbox_replaced_stop_then_start_afresh(changed, reason):
    r = Reconciler()
    r.on_desired([want()])
    started(r, want())
    r.on_desired([changed] if changed else [])
    [stop] = r.plan(2.0)
    assert stop.verb is Verb.STOP and reason in stop.reason
    assert stop.want == want()  # the old sandbox and key: that is where the undo goes
    assert r.plan(2.0) == [stop]  # until the shell reports it done
    r.on_stopped("u1")
    if changed and changed.sandbox:
        started(r, changed, now=2.0)
    else:
        assert r.plan(2.0) == []


def test_a_key_change_never_stops_a_proxy_the_entry_notes_the_new_ring():
    r = Reconciler()
    r.on_desired([want()])
    started(r, want())
    r.on_desired([want(key="k2")])  # a rotation: the shell rewrote the key file
    assert r.plan(1.0) == [] and r.entries["u1"].key_id == "k2"
    r.on_exited("u1", 2.0)  # a restart after a crash starts with the ring the file holds
    [a] = r.plan(3.0)
    assert a.verb is Verb.START and a.want.key_id == "k2"


def test_the_secrets_ring_with_next_and_previous_keys():
    data = {"PROJECT_PSK": KEY, "PROJECT_PSK_NEXT": KEY2}
    ring = podstate.parse_secret_key(kubeobjects.build_secret("shop", data))
    assert ring == KeySet(base64.b64decode(KEY), next=base64.b64decode(KEY2))
    promoted = podstate.parse_secret_key(
        kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY2, "PROJECT_PSK_PREVIOUS": KEY})
    )
    assert promoted == KeySet(base64.b64decode(KEY2), previous=base64.b64decode(KEY))
    assert len({podstate.key_id(ring), podstate.key_id(promoted)}) == 2
    same = podstate.parse_secret_key(
        kubeobjects.build_secret("shop", {"PROJECT_PSK": KEY, "PROJECT_PSK_NEXT": KEY})
    )
    assert isinstance(same, BadKey) and "same key" in same.reason and KEY[:8] not in same.reason


def test_another_process_of_the_same_sandbox_is_the_same_sandbox():
    r = Reconciler()
    r.on_desired([want()])
    started(r, want())
    r.on_desired([want(sb=Sandbox(101, SB.netns))])  # the first handle exited: same namespace
    assert r.plan(1.0) == [] and r.entries["u1"].sandbox == Sandbox(101, SB.netns)


def test_an_unknown_key_keeps_a_running_proxy_on_its_last_key():
    r = Reconciler()
    r.on_desired([want()])
    started(r, want())
    r.on_desired([want(key=None)])
    assert r.plan(1.0) == []
    r.on_exited("u1", 2.0)
    [a] = r.plan(3.0)
    assert a.verb is Verb.START and a.want.key_id == "k1" and a.undo_first


def test_restarts_back_off_exponentially_and_reset_after_a_stable_run():
    r = Reconciler(Policy(backoff=1.0, backoff_max=8.0, stable=30.0, ready_timeout=100.0))
    r.on_desired([want(sb=SB)])
    started(r, want(), now=0.0)
    now, delays = 0.0, []
    for _ in range(6):  # dies at once, every time
        r.on_exited("u1", now)
        due = r.next_deadline()
        delays.append(due - now)
        assert r.plan(due - 0.01) == []
        [a] = r.plan(due)
        assert a.verb is Verb.START and a.undo_first
        r.on_desired([want(sb=Sandbox(555, SB.netns))])
        [a] = r.plan(due)
        assert a.want.sandbox.pid == 555  # the newest handle of the same sandbox
        r.on_started(a.want, due)
        r.on_ready("u1", due)
        now = due + 1.0
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    r.on_exited("u1", now + 30.0)  # after a stable run the next death starts from 1 s again
    assert r.next_deadline() == now + 31.0
    assert r.stats.get("agent_proxy_exits") == 7


def test_a_proxy_not_ready_in_time_is_killed_and_counts_as_a_failure():
    r = Reconciler(Policy(ready_timeout=30.0, backoff=2.0))
    r.on_desired([want()])
    started(r, want(), now=0.0, ready=False)
    assert r.next_deadline() == 30.0 and r.plan(29.9) == []
    [kill] = r.plan(30.0)
    assert kill.verb is Verb.KILL
    r.on_exited("u1", 30.0)
    assert r.entries["u1"].phase is Phase.DEAD and r.next_deadline() == 32.0
    r.on_ready("u1", 31.0)  # a late "ready" from the dead process changes nothing
    assert r.entries["u1"].phase is Phase.DEAD


def test_adopted_proxies_are_kept_if_alive_and_restarted_at_once_if_dead():
    r = Reconciler(Policy(ready_timeout=30.0))
    r.on_adopted(want("ready"), Phase.READY, now=0.0)
    r.on_adopted(want("starting"), Phase.STARTING, now=0.0)
    r.on_adopted(want("dead"), Phase.DEAD, now=0.0)
    r.on_desired([want("ready"), want("starting"), want("dead")])
    [a] = r.plan(0.0)
    assert (a.verb, a.want.uid, a.undo_first) == (Verb.START, "dead", True)
    assert r.stats.counters == {"agent_proxies_adopted": 2, "agent_proxies_found_dead": 1}
    r.on_started(a.want, 0.0)
    r.on_ready("dead", 0.0)
    assert verbs(r.plan(30.0)) == [(Verb.KILL, "starting")]  # adopted mid-start, never ready


# -- sandbox parsers on sample outputs ------------------------------------------------------
# Shaped after the runtimes' own structs: containerd's SandboxInfo (info.pid, processStatus,
# netNamespaceClosed, runtimeSpec) and CRI-O's createSandboxInfo (image, pid, runtimeSpec;
# only runtimeSpec when the infra container is spoofed, drop_infra_ctr); crictl wraps them as
# {"status": ..., "info": ...}. No CRI runtime runs here: these are samples, not recordings.


def _sb(sid, uid, state, created):
    return {
        "id": sid,
        "metadata": {"name": "web-7d9c", "uid": uid, "namespace": "shop", "attempt": 1},
        "state": state,
        "createdAt": str(created),
        "labels": {"io.kubernetes.pod.uid": uid},
        "annotations": {},
        "runtimeHandler": "",
    }


CRICTL_PODS = json.dumps(
    {
        "items": [
            _sb("aaa1", UID, "SANDBOX_NOTREADY", 1700000000000000000),
            _sb("aaa2", UID, "SANDBOX_READY", 1700000100000000000),
            _sb(
                "bbb1",
                "b" * 8 + "-bbbb-bbbb-bbbb-" + "b" * 12,
                "SANDBOX_READY",
                1700000200000000000,
            ),
            _sb(
                "bbb2",
                "b" * 8 + "-bbbb-bbbb-bbbb-" + "b" * 12,
                "SANDBOX_READY",
                1700000300000000000,
            ),
            {"id": "broken", "metadata": None},
        ]
    }
)
SPEC = {
    "linux": {
        "namespaces": [
            {"type": "pid"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "network", "path": "/var/run/netns/cni-6d1b2c3a"},
        ]
    }
}
INSPECTP_CONTAINERD = json.dumps(
    {
        "status": {"id": "aaa2", "state": "SANDBOX_READY", "network": {"ip": "10.128.0.9"}},
        "info": {
            "pid": 4242,
            "processStatus": "running",
            "netNamespaceClosed": False,
            "image": "pause:3.9",
            "runtimeType": "io.containerd.runc.v2",
            "runtimeSpec": SPEC,
        },
    }
)
INSPECTP_CRIO = json.dumps(
    {
        "status": {"id": "aaa2"},
        "info": {"image": "registry.k8s.io/pause:3.9", "pid": 5151, "runtimeSpec": SPEC},
    }
)
INSPECTP_CRIO_SPOOFED = json.dumps({"status": {"id": "aaa2"}, "info": {"runtimeSpec": SPEC}})
CRICTL_PS = json.dumps(
    {
        "containers": [
            {"id": "c2", "podSandboxId": "aaa2", "state": "CONTAINER_RUNNING", "createdAt": "20"},
            {"id": "c1", "podSandboxId": "aaa2", "state": "CONTAINER_RUNNING", "createdAt": "10"},
            {"id": "c0", "podSandboxId": "aaa2", "state": "CONTAINER_EXITED", "createdAt": "5"},
        ]
    }
)
INSPECT_CONTAINER = json.dumps(
    {
        "status": {"id": "c1", "state": "CONTAINER_RUNNING"},
        "info": {"sandboxID": "aaa2", "pid": 6161, "runtimeSpec": SPEC},
    }
)


def test_crictl_outputs_give_the_ready_sandbox_and_its_pid():
    assert sandbox.parse_crictl_pods(CRICTL_PODS) == {
        UID: "aaa2",
        "b" * 8 + "-bbbb-bbbb-bbbb-" + "b" * 12: "bbb2",
    }
    assert sandbox.parse_crictl_inspect_pid(INSPECTP_CONTAINERD) == 4242
    assert sandbox.parse_crictl_inspect_pid(INSPECTP_CRIO) == 5151
    assert sandbox.parse_crictl_inspect_pid(INSPECTP_CRIO_SPOOFED) is None
    assert sandbox.parse_crictl_ps(CRICTL_PS) == ["c1", "c2"]
    assert sandbox.parse_crictl_inspect_pid(INSPECT_CONTAINER) == 6161
    for bad in (
        "",
        "null",
        "[]",
        '{"info": "not json"}',
        '{"info": {"pid": true}}',
        '{"info": {"pid": 1}}',
        '{"info": {"pid": "42"}}',
    ):
        assert sandbox.parse_crictl_inspect_pid(bad) is None, bad


U_ = UID.replace("-", "_")
CGROUPS = {  # /proc/PID/cgroup of a pod's process, as each setup writes it
    "v1 cgroupfs": f"12:pids:/kubepods/besteffort/pod{UID}/{CID}\n"
    f"11:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/\n0::/\n",
    "v2 systemd containerd": f"0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{U_}.slice/cri-containerd-{CID}.scope\n",
    "v2 guaranteed cri-o": f"0::/kubepods.slice/kubepods-pod{U_}.slice/crio-{CID}.scope\n",
    "v2 from another cgroupns": f"0::/../../kubepods-besteffort-pod{U_}.slice/"
    f"cri-containerd-{CID}.scope\n",
    "openshift 3.11 docker": f"11:cpuset:/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{U_}.slice/docker-{CID}.scope\n",
    "pod cgroup itself": f"0::/kubepods/pod{UID}\n",
}


def test_cgroup_paths_of_every_driver_name_the_pod_uid():
    for setup, text in CGROUPS.items():
        assert sandbox.parse_cgroup_pod_uid(text) == UID, setup
    for text in (
        "0::/system.slice/containerd.service\n",
        "0::/user.slice/session-3.scope\n",
        "0::/system.slice/podman-1234.scope\n",
        f"0::/x/pod{UID}extra/\n",
        "",
    ):
        assert sandbox.parse_cgroup_pod_uid(text) is None, text


def stat_line(pid, comm, state, start):
    rest = ["1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(start)] + ["0"] * 30
    return f"{pid} ({comm}) {state} " + " ".join(rest) + "\n"


def test_proc_stat_fields_are_counted_after_the_last_parenthesis():
    assert sandbox.parse_proc_stat(stat_line(7, "tencrypt run", "S", 123456)) == ("S", 123456)
    assert sandbox.parse_proc_stat(stat_line(7, "a) (b) Z", "R", 99)) == ("R", 99)
    assert sandbox.parse_proc_stat("7 (x) S 1 2") is None


def test_the_sandbox_is_the_earliest_process_outside_the_node_namespaces():
    P = sandbox.ProcInfo
    node = {4026531840}
    procs = [P(300, 900, 4026532500), P(200, 500, 4026532500), P(100, 100, 4026531840)]
    assert sandbox.pick_sandbox(procs, node) == Sandbox(200, 4026532500)
    assert sandbox.pick_sandbox([P(100, 100, 4026531840)], node) is None
    assert sandbox.pick_sandbox([], node) is None


# -- the manifests in scripts/k8s agree with the agent ---------------------------------------

K8S = Path(__file__).resolve().parents[2] / "scripts" / "k8s"


def k8s_docs():
    yaml = pytest.importorskip("yaml")  # as test_nodesync: PyYAML is not a declared dependency
    return [
        d
        for name in ("rbac.yaml", "daemonset.yaml")
        for d in yaml.safe_load_all((K8S / name).read_text())
        if d
    ]


def test_agent_rbac_grants_exactly_what_the_agent_reads():
    [role] = [
        d
        for d in k8s_docs()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "tencrypt-agent"
    ]
    granted = {
        (res, verb, tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    # start_reflectors: list+watch pods, namespaces, services, endpointslices and
    # networkpolicies (the membership feed), and the Secrets named tencrypt only;
    # start_discovery: list nodes and servicecidrs, get OpenShift's Network named cluster
    # (agent/cidrs.py)
    assert granted == {
        ("pods", "list", ()),
        ("pods", "watch", ()),
        ("namespaces", "list", ()),
        ("namespaces", "watch", ()),
        ("services", "list", ()),
        ("services", "watch", ()),
        ("endpointslices", "list", ()),
        ("endpointslices", "watch", ()),
        ("secrets", "list", ("tencrypt",)),
        ("secrets", "watch", ("tencrypt",)),
        ("nodes", "list", ()),
        ("servicecidrs", "list", ()),
        ("networks", "get", ("cluster",)),
        ("networkpolicies", "list", ()),
        ("networkpolicies", "watch", ()),
    }
    groups = {res: rule["apiGroups"] for rule in role["rules"] for res in rule["resources"]}
    assert groups["endpointslices"] == ["discovery.k8s.io"]
    assert groups["servicecidrs"] == ["networking.k8s.io"]
    assert groups["networkpolicies"] == ["networking.k8s.io"]
    assert groups["networks"] == ["config.openshift.io"]
    assert all(groups[r] == [""] for r in ("pods", "namespaces", "services", "secrets", "nodes"))
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs <= {"list", "watch", "get"}  # read-only


def test_agent_writes_only_its_key_report_configmaps_in_its_own_namespace():
    docs = k8s_docs()
    [role] = [
        d
        for d in docs
        if d["kind"] == "Role" and d["metadata"]["name"] == "tencrypt-agent-key-report"
    ]
    assert role["metadata"]["namespace"] == "tencrypt-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "update"]}
    ]
    [binding] = [
        d
        for d in docs
        if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == "tencrypt-agent-key-report"
    ]
    assert binding["metadata"]["namespace"] == "tencrypt-system"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tencrypt", "namespace": "tencrypt-system"}
    ]
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    agent = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_daemonset_agent_args_parse_and_its_state_dir_is_a_host_tmpfs_mount():
    import argparse

    from tencrypt.agent.cli import add_arguments

    [ds] = [d for d in k8s_docs() if d["kind"] == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    assert agent["command"] == ["tencrypt", "agent"] and spec["hostPID"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(kubelet_expands(agent))
    assert args.sandbox != "annotation"  # never trust a pod object for a PID on a cluster
    # proxies leave the agent's cgroup for their pods' and outlive it: an agent restart or
    # upgrade leaves them running (see the manifest's comment and scripts/k8s/README.md)
    assert args.on_exit == "keep" and args.proxy_cgroup == "sandbox"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in agent["volumeMounts"]}
    assert mounts[args.state_dir]["hostPath"]["path"].startswith("/run/")
    assert mounts[args.setup_state_dir]["hostPath"]["path"] == "/run/tencrypt"
    assert mounts["/host/sys/fs/cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"  # cgroups.py
    assert "tencrypt-nsenter.sh /usr/local/bin/" in (K8S / "Dockerfile").read_text()


def test_cli_refuses_to_run_without_a_node_name(monkeypatch, capsys):
    from tencrypt import cli

    monkeypatch.delenv("NODE_NAME", raising=False)
    assert cli.main(["agent"]) == 2
    assert "pass --node NAME or set NODE_NAME" in capsys.readouterr().err
    assert cli.main(["agent", "--node", "n1", "--setup-args", "--state-dir /x"]) == 2
    assert "as --setup-state-dir DIR, not in --setup-args" in capsys.readouterr().err
    # each pod gets its own membership file: one for all of them would be wrong
    assert cli.main(["agent", "--node", "n1", "--setup-args", "--members-file /m.json"]) == 2
    assert "hands every pod its own membership file" in capsys.readouterr().err
    # the launcher splits TENCRYPT_SETUP_ARGS on white space: such a directory cannot pass
    assert cli.main(["agent", "--node", "n1", "--state-dir", "/run/my agent"]) == 2
    assert "'/run/my agent': the launcher splits" in capsys.readouterr().err


def test_crictl_outputs_of_a_real_containerd_sandbox_recorded_here():
    """containerd 1.6.20 through the CRI (tests/unit/data/containerd-1.6/README.md): the
    parsers find the ready sandbox of the pod uid, the pause PID and the running container."""
    data = Path(__file__).parent / "data" / "containerd-1.6"
    inspectp = json.loads((data / "inspectp.json").read_text())
    uid, sid = inspectp["status"]["metadata"]["uid"], inspectp["status"]["id"]
    assert sandbox.parse_crictl_pods((data / "pods-ready.json").read_text()) == {uid: sid}
    assert (
        sandbox.parse_crictl_inspect_pid((data / "inspectp.json").read_text())
        == inspectp["info"]["pid"]
        > 1
    )
    [cid] = sandbox.parse_crictl_ps((data / "ps.json").read_text())
    app = json.loads((data / "inspect-app.json").read_text())
    assert app["status"]["id"] == cid
    assert (
        sandbox.parse_crictl_inspect_pid((data / "inspect-app.json").read_text())
        == app["info"]["pid"]
        > 1
    )
    assert sandbox.parse_cgroup_pod_uid((data / "cgroup-pause.txt").read_text()) == uid
