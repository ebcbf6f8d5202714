"""`tencrypt key rotate` against the API server double, with the real kubernetes client and
simulated agents that load each new ring after a lag (core/rotation.py, tencrypt/keyrotate.py).

    Rotator --HTTP--> WritableApiServer: Secret shop/tencrypt, ConfigMaps tencrypt-keys-<node>
                          ^
    FakeAgents (run inside the injected sleep): read the Secret, "load" it on each node after
    its lag, write that node's report"""

from __future__ import annotations

import base64
import io
import os

import pytest
from kubernetes import client, config

from tencrypt.core.psk import KeySet, fingerprint, ring_label
from tencrypt.core.rotation import (
    PHASE_ANNOTATION,
    PHASE_AT_ANNOTATION,
    REPORT_KEY,
    REPORT_LABEL,
    REPORT_PREFIX,
    NodeReport,
    Phase,
    apply_phase,
    plan,
    progress,
    render_report,
    secret_data,
    secret_keys,
)
from tencrypt.errors import UsageError
from tencrypt.keyrotate import RotationError, Rotator
from tests.kubefakes import builders as kubeobjects
from tests.kubefakes.writable import WritableApiServer

NS, AGENTS = "shop", "tencrypt-system"
K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)


def secret(keys: KeySet, **annotations: str) -> dict:
    return {
        "kind": "Secret",
        "apiVersion": "v1",
        "type": "Opaque",
        "metadata": {"name": "tencrypt", "namespace": NS, "annotations": annotations},
        "data": secret_data(keys),
    }


def report(node: str, pods: int, loaded: dict[str, int]) -> dict:
    return {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {
            "name": REPORT_PREFIX + node,
            "namespace": AGENTS,
            "labels": dict([REPORT_LABEL]),
        },
        "data": {REPORT_KEY: render_report(NodeReport(node, 0.0, {NS: (pods, loaded)}))},
    }


class FakeAgents:
    """Nodes that load the Secret's ring ``lag`` polls after it changes (None: never)."""

    def __init__(self, api: WritableApiServer, lags: dict[str, int | None], pods: int = 2):
        self.api, self.lags, self.pods = api, lags, pods
        self.now = 1_700_000_000.0
        self.loaded: dict[str, str] = {}
        self.seen: dict[str, tuple[str, int]] = {}  # node -> (ring it saw, polls since)
        self.step()

    def ring(self) -> str:
        keys = secret_keys(self.api.get("Secret", NS, "tencrypt")["data"])
        return ring_label(keys.fingerprints())

    def step(self) -> None:
        ring = self.ring()
        for node, lag in self.lags.items():
            seen, polls = self.seen.get(node, (None, 0))
            polls = 0 if seen != ring else polls + 1
            self.seen[node] = (ring, polls)
            if node not in self.loaded or (lag is not None and polls >= lag):
                self.loaded[node] = ring if node not in self.loaded or lag is not None else ""
            self.api.put(report(node, self.pods, {self.loaded[node]: self.pods}))

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.step()

    def clock(self) -> float:
        return self.now


@pytest.fixture
def api():
    server = WritableApiServer(secret_names=("tencrypt",))
    server.start()
    yield server
    server.stop()


def rotator(
    api: WritableApiServer, agents: FakeAgents, tmp_path, **kw
) -> tuple[Rotator, io.StringIO]:
    out = io.StringIO()
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    keys = iter([K2, K3])
    r = Rotator(
        core,
        NS,
        AGENTS,
        out,
        clock=agents.clock,
        sleep=agents.sleep,
        new_key=lambda: next(keys),
        **{"grace": 300.0, "timeout": 60.0, **kw},
    )
    return r, out


def test_a_full_rotation_waits_for_every_node_between_phases(api, tmp_path):
    api.put(secret(KeySet(K1)))
    agents = FakeAgents(api, {"node-1": 0, "node-2": 3, "node-3": 1})
    history: list[tuple[float, str, dict[str, str]]] = []

    def on_write(kind, ns, name):
        if kind == "Secret":  # every node had loaded the ring this write replaces
            history.append((agents.now, agents.ring(), dict(agents.loaded)))

    api.on_write = on_write
    r, out = rotator(api, agents, tmp_path)
    final = r.run()
    assert final == KeySet(K2)
    rings = [
        ring_label(KeySet(K1, next=K2).fingerprints()),
        ring_label(KeySet(K2, previous=K1).fingerprints()),
        ring_label(KeySet(K2).fingerprints()),
    ]
    assert [ring for _, ring, _ in history] == rings
    before = [ring_label(KeySet(K1).fingerprints())] + rings[:2]
    for (_, _, loaded), old in zip(history, before, strict=True):
        assert set(loaded.values()) == {old}, "a phase started before every node caught up"
    assert agents.loaded == dict.fromkeys(agents.lags, rings[-1])
    assert history[2][0] - history[1][0] >= 300.0  # the grace after promote
    stored = api.get("Secret", NS, "tencrypt")
    assert set(stored["data"]) == {"PROJECT_PSK"}
    assert stored["metadata"]["annotations"][PHASE_ANNOTATION] == "drop-previous"
    text = out.getvalue()
    assert "phases: add-next -> promote -> drop-previous" in text
    assert "waiting for node-2: 0/2 pods" in text and "grace: 300 s" in text
    assert f"done: {NS} runs on current {fingerprint(K2)}" in text
    for key in (K1, K2):
        assert base64.b64encode(key).decode()[:10] not in text


def test_a_node_that_never_catches_up_stops_the_rotation_at_a_valid_phase(api, tmp_path):
    api.put(secret(KeySet(K1)))
    agents = FakeAgents(api, {"node-1": 0, "node-2": None})
    r, _ = rotator(api, agents, tmp_path, timeout=30.0)
    with pytest.raises(RotationError, match="node-2: 0/2 pods") as info:
        r.run()
    assert "strict mode never falls back to plaintext" in str(info.value)
    assert secret_keys(api.get("Secret", NS, "tencrypt")["data"]) == KeySet(K1, next=K2)
    assert [w[3] for w in api.writes if w[0] == "Secret"] == ["update"]


def test_a_node_behind_the_secret_stops_the_run_before_any_change(api, tmp_path):
    """A node still on K1 while the Secret already stages K2 (a run interrupted, a node that
    was down): promoting now would leave it two phases behind, so nothing is written."""
    api.put(secret(KeySet(K1, next=K2)))
    agents = FakeAgents(api, {"node-1": 0})
    api.put(report("node-2", 2, {ring_label(KeySet(K1).fingerprints()): 2}))
    r, out = rotator(api, agents, tmp_path, timeout=10.0)
    with pytest.raises(RotationError, match="node-2: 0/2 pods"):
        r.run()
    assert [w for w in api.writes if w[0] == "Secret"] == []
    assert "before any change" in out.getvalue()


def test_resume_after_promote_honours_the_grace_from_the_annotation(api, tmp_path):
    agents_start = 1_700_000_000.0
    api.put(
        secret(
            KeySet(K2, previous=K1),
            **{PHASE_ANNOTATION: "promote", PHASE_AT_ANNOTATION: f"{agents_start - 100:.0f}"},
        )
    )
    agents = FakeAgents(api, {"node-1": 0})
    r, out = rotator(api, agents, tmp_path)
    assert r.run(Phase.DROP_PREVIOUS) == KeySet(K2)
    assert agents.now - agents_start >= 200.0 and "grace: 200 s" in out.getvalue()


def test_a_phase_that_cannot_run_is_refused_before_any_write(api, tmp_path):
    api.put(secret(KeySet(K1)))
    agents = FakeAgents(api, {"node-1": 0})
    r, _ = rotator(api, agents, tmp_path)
    with pytest.raises(UsageError, match="no next key to promote"):
        r.run(Phase.PROMOTE)
    assert api.writes == [] or all(w[0] != "Secret" for w in api.writes)


def test_a_concurrent_change_is_a_conflict_never_overwritten(api, tmp_path):
    api.put(secret(KeySet(K1)))
    agents = FakeAgents(api, {"node-1": 0})
    r, _ = rotator(api, agents, tmp_path)
    keys, stale = r.read()
    api.put(secret(KeySet(K3)))  # someone else rewrote the Secret meanwhile
    with pytest.raises(RotationError, match="HTTP 409.*nothing was overwritten"):
        r.write(Phase.ADD_NEXT, keys, stale)
    assert secret_keys(api.get("Secret", NS, "tencrypt")["data"]) == KeySet(K3)


def test_without_any_agent_report_nothing_is_changed(api, tmp_path):
    api.put(secret(KeySet(K1)))
    agents = FakeAgents(api, {})
    r, _ = rotator(api, agents, tmp_path)
    with pytest.raises(RotationError, match="no agent key reports in tencrypt-system"):
        r.run()
    assert api.writes == []


def test_missing_rights_are_explained(api, tmp_path):
    api.put(secret(KeySet(K1)))
    agents = FakeAgents(api, {"node-1": 0})
    api.forbid.add(("update", "Secret"))
    r, _ = rotator(api, agents, tmp_path)
    with pytest.raises(RotationError, match="HTTP 403.*get and update on Secret shop/tencrypt"):
        r.run()
    api.forbid.clear()
    r.namespace = "other"
    with pytest.raises(RotationError, match="HTTP 404.*no Secret tencrypt in other"):
        r.run()


# ---- the pure rules ---------------------------------------------------------------------------


def test_phases_and_plans():
    assert apply_phase(KeySet(K1), Phase.ADD_NEXT, K2) == KeySet(K1, next=K2)
    assert apply_phase(KeySet(K1, next=K2), Phase.PROMOTE) == KeySet(K2, previous=K1)
    assert apply_phase(KeySet(K2, previous=K1), Phase.DROP_PREVIOUS) == KeySet(K2)
    for keys, phase, why in (
        (KeySet(K1, next=K2), Phase.ADD_NEXT, "staged already"),
        (KeySet(K2, previous=K1), Phase.ADD_NEXT, "drop-previous first"),
        (KeySet(K1), Phase.DROP_PREVIOUS, "no previous"),
        (KeySet(K1), Phase.ADD_NEXT, "needs a new key"),
    ):
        with pytest.raises(UsageError, match=why):
            apply_phase(keys, phase, None if why == "needs a new key" else K3)
    full = [Phase.ADD_NEXT, Phase.PROMOTE, Phase.DROP_PREVIOUS]
    assert plan(KeySet(K1)) == full
    assert plan(KeySet(K1, next=K2)) == full[1:]
    assert plan(KeySet(K2, previous=K1)) == [Phase.DROP_PREVIOUS]
    assert plan(KeySet(K1, K2, K3)) == [Phase.DROP_PREVIOUS, Phase.PROMOTE, Phase.DROP_PREVIOUS]


def test_secret_data_round_trips_and_bad_data_is_named_not_echoed():
    keys = KeySet(K1, next=K2, previous=K3)
    data = secret_data(keys)
    assert set(data) == {"PROJECT_PSK", "PROJECT_PSK_NEXT", "PROJECT_PSK_PREVIOUS"}
    assert base64.b64decode(data["PROJECT_PSK"]) == base64.b64encode(K1) + b"\n"
    assert secret_keys(data) == keys
    bad = {**data, "PROJECT_PSK_NEXT": base64.b64encode(b"short").decode()}
    with pytest.raises(UsageError, match="PROJECT_PSK_NEXT") as info:
        secret_keys(bad)
    assert data["PROJECT_PSK"][:10] not in str(info.value)
    with pytest.raises(UsageError, match="has no PROJECT_PSK"):
        secret_keys({"PROJECT_PSK_NEXT": data["PROJECT_PSK_NEXT"]})
    with pytest.raises(UsageError, match="same key"):
        secret_keys(
            {"PROJECT_PSK": data["PROJECT_PSK"], "PROJECT_PSK_PREVIOUS": data["PROJECT_PSK"]}
        )
    with pytest.raises(UsageError, match="not valid Secret data"):
        secret_keys({"PROJECT_PSK": "%%%"})


def test_progress_counts_pods_and_names_the_laggards():
    want = KeySet(K1, next=K2)
    label = ring_label(want.fingerprints())
    old = ring_label(KeySet(K1).fingerprints())
    reports = [
        ("a", render_report(NodeReport("n1", 0, {NS: (3, {label: 3})}))),
        ("b", render_report(NodeReport("n2", 0, {NS: (2, {label: 1, old: 1}), "other": (5, {})}))),
        ("c", render_report(NodeReport("n3", 0, {"other": (1, {})}))),
        ("d", "{broken"),
    ]
    got = progress(reports, NS, want)
    assert (got.pods, got.ready, got.done) == (5, 4, False)
    assert got.lagging == [f"n2: 1/2 pods (1 on {old})", "d: report unreadable"]
    assert progress(reports[:1] + reports[2:3], NS, want).done


# ---- the manifests --------------------------------------------------------------------------


def test_the_cronjob_may_update_only_secrets_named_tencrypt_and_runs_a_valid_command():
    import argparse
    from pathlib import Path

    yaml = pytest.importorskip("yaml")
    from tencrypt.keyrotate import add_arguments, worst_case_seconds

    k8s = Path(__file__).resolve().parents[2] / "scripts" / "k8s"
    docs = [
        d
        for d in yaml.safe_load_all((k8s / "optional" / "key-rotation-cronjob.yaml").read_text())
        if d
    ]
    assert "optional" not in (k8s / "kustomization.yaml").read_text()  # never by default
    rules = [
        (d["kind"], d["metadata"].get("namespace"), r)
        for d in docs
        if d["kind"] in ("ClusterRole", "Role")
        for r in d["rules"]
    ]
    assert rules == [
        (
            "ClusterRole",
            None,
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": ["tencrypt"],
                "verbs": ["get", "update"],
            },
        ),
        (
            "ClusterRole",
            None,
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list"]},
        ),
        (
            "Role",
            "tencrypt-system",
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]},
        ),
    ]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings} == {
        ("tencrypt-system", "tencrypt-key-rotator-reports"),
        ("shop", "tencrypt-key-rotator"),
    }
    # cluster-wide, the rotator may list namespaces and nothing else: Secrets per project only
    [cluster] = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert cluster["roleRef"]["name"] == "tencrypt-key-rotator-namespaces"
    [job] = [d for d in docs if d["kind"] == "CronJob"]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["serviceAccountName"] == "tencrypt-key-rotator"
    assert container["command"] == ["tencrypt", "key", "rotate"]
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="c")
    add_arguments(sub.add_parser("key"))
    args = parser.parse_args(["key", "rotate", *container["args"]])
    assert args.all_namespaces and args.all and args.grace > 180
    # Kubernetes must not kill a run that still waits within its own limits
    deadline = job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert deadline > worst_case_seconds(args.timeout, args.grace) == 3900


def test_the_command_line_runs_a_phase_with_a_kubeconfig(api, tmp_path, capsys):
    from tencrypt.cli import main

    api.put(secret(KeySet(K2, previous=K1)))

    def agent_loads(kind, ns, name):  # an agent whose proxy loads each ring at once
        if kind == "Secret":
            keys = secret_keys(api.get("Secret", NS, "tencrypt")["data"])
            api.put(report("node-1", 1, {ring_label(keys.fingerprints()): 1}))

    agent_loads("Secret", NS, "tencrypt")
    api.on_write = agent_loads
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    assert (
        main(
            [
                "key",
                "rotate",
                "-n",
                NS,
                "--phase",
                "drop-previous",
                "--grace",
                "0",
                "--kubeconfig",
                str(kubeconfig),
            ]
        )
        == 0
    )
    assert f"done: {NS} runs on current {fingerprint(K2)}" in capsys.readouterr().out
    assert secret_keys(api.get("Secret", NS, "tencrypt")["data"]) == KeySet(K2)
    with pytest.raises(SystemExit) as refused:  # the parser refuses it: a usage error
        main(["key", "rotate", "-n", NS, "--grace", "-1"])
    assert refused.value.code == 2


# ---- every enabled project at once (--all-namespaces, --selector) ---------------------------


def project_secret(namespace: str, keys: KeySet) -> dict:
    doc = secret(keys)
    doc["metadata"]["namespace"] = namespace
    return doc


def agents_load_at_once(api: WritableApiServer, namespaces: list[str]) -> None:
    """One node whose agent reports every project's current ring as soon as it is written."""

    def publish(*_: object) -> None:
        rings = {}
        for ns in namespaces:
            keys = secret_keys(api.get("Secret", ns, "tencrypt")["data"])
            rings[ns] = (1, {ring_label(keys.fingerprints()): 1})
        doc = report("node-1", 1, {})
        doc["data"][REPORT_KEY] = render_report(NodeReport("node-1", 0.0, rings))
        api.put(doc)

    publish()
    api.on_write = lambda kind, ns, name: publish() if kind == "Secret" else None


def test_every_enabled_project_is_rotated_side_by_side_and_one_failure_is_named(api, tmp_path):
    from tencrypt.keyrotate import SharedReports, rotate_many

    projects = ["blog", "shop", "wiki"]
    for ns in projects:
        api.put(project_secret(ns, KeySet(K1)))
    agents_load_at_once(api, projects)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    out, made = io.StringIO(), []

    def make(namespace: str, stream, shared: SharedReports) -> Rotator:
        made.append(shared)
        return Rotator(
            core, namespace, AGENTS, stream, grace=0.0, timeout=30.0, poll=0.0, shared=shared
        )

    assert rotate_many(make, [*projects, "ghost"], None, out, poll=0.0) == 3  # ghost: no Secret
    text = out.getvalue()
    for ns in projects:  # each finished, on its own fresh key
        keys = secret_keys(api.get("Secret", ns, "tencrypt")["data"])
        assert keys.current != K1 and keys.next is None and keys.previous is None
        assert f"[{ns}] done: {ns} runs on current" in text
    assert (
        len({secret_keys(api.get("Secret", ns, "tencrypt")["data"]).current for ns in projects})
        == 3
    )
    assert "[ghost] stopped: cannot read Secret ghost/tencrypt: HTTP 404" in text
    assert text.splitlines()[-1] == "rotated 3 of 4 projects"
    assert all(line.startswith("[") for line in text.splitlines()[:-1])  # never a mixed line
    assert len(set(map(id, made))) == 1  # one poll of the agents' reports for all of them


def test_the_command_line_finds_the_enabled_projects_that_the_selector_matches(
    api, tmp_path, capsys
):
    from tencrypt.cli import main

    for ns, labels in (
        ("shop", {"tencrypt.io/enabled": "true", "tier": "gold"}),
        ("blog", {"tencrypt.io/enabled": "true", "tier": "silver"}),
        ("wiki", {"tier": "gold"}),  # not enabled: never touched
    ):
        namespace = kubeobjects.build_namespace(ns, enabled=False)
        namespace["metadata"]["labels"].update(labels)
        api.put(namespace)
        api.put(project_secret(ns, KeySet(K1)))
    agents_load_at_once(api, ["shop", "blog", "wiki"])
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    argv = ["key", "rotate", "--kubeconfig", kubeconfig, "--phase", "add-next"]
    assert main([*argv, "-l", "tier=gold"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "1 enabled projects: shop"
    assert secret_keys(api.get("Secret", "shop", "tencrypt")["data"]).next is not None
    assert secret_keys(api.get("Secret", "blog", "tencrypt")["data"]).next is None
    assert secret_keys(api.get("Secret", "wiki", "tencrypt")["data"]) == KeySet(K1)
    assert main([*argv, "-A"]) == 3  # shop is past add-next now: that one is refused
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "2 enabled projects: blog, shop"
    assert secret_keys(api.get("Secret", "blog", "tencrypt")["data"]).next is not None
    assert "[shop] stopped:" in out and out.splitlines()[-1] == "rotated 1 of 2 projects"


@pytest.mark.parametrize(
    ("selector", "labels", "match"),
    [
        ("tier=gold", {"tier": "gold"}, True),
        ("tier==gold", {"tier": "gold"}, True),
        ("tier!=gold", {"tier": "gold"}, False),
        ("tier!=gold", {}, True),
        ("tier", {"tier": ""}, True),
        ("!tier", {"tier": "x"}, False),
        ("a=1, b", {"a": "1", "b": "2"}, True),
        ("a=1,b", {"a": "1"}, False),
    ],
)
def test_equality_selectors(selector, labels, match):
    from tencrypt.keyrotate import parse_selector

    assert parse_selector(selector).matches(labels) is match


@pytest.mark.parametrize("selector", ["tier in (a,b)", "", "a=1,", "=x", "!"])
def test_selectors_we_cannot_match_are_refused(selector):
    from tencrypt.keyrotate import parse_selector

    with pytest.raises(UsageError):
        parse_selector(selector)
