"""The agent's half of NetworkPolicy (issue #23) without root: ``Agent.policy_of`` (the pod's
document and its tunnel finding, reported once when it appears and once when it clears),
``Agent.version`` and ``fold`` feeding ``PolicyView``, ``push_members`` rewriting a pod's file
when only a policy changed; ``PodEvents`` (one Warning Event per finding, failures logged once
per kind, never raised); ``MembersFeed.write`` with a ``PodPolicy`` (format 2 only)."""

from __future__ import annotations

import datetime
import json
import logging
import types
from pathlib import Path

import pytest

from tencrypt.agent import events as events_module
from tencrypt.agent.agent import Agent
from tencrypt.agent.events import PodEvents
from tencrypt.agent.feed import MembersFeed, PodPolicy
from tencrypt.agent.members import ProjectMembers
from tencrypt.agent.netpol import World
from tencrypt.agent.podstate import AgentKind
from tencrypt.agent.reconcile import Phase, Sandbox, Want
from tencrypt.agent.resolver import Resolver
from tencrypt.agent.supervisor import Supervisor
from tencrypt.core.membership import parse_members
from tencrypt.core.netpolicy import FORMAT as NETPOL_FORMAT
from tencrypt.core.stats import Counter
from tencrypt.kube.objects import EventType
from tencrypt.kube.reflector import Changed, Listed
from tencrypt.nodesync.kubeobjects import stable_uid
from tests.kubefakes import builders as kubeobjects
from tests.unit.test_agent_members import Clock
from tests.unit.test_netpolicy import policy

ADDED, MODIFIED, DELETED = EventType.ADDED, EventType.MODIFIED, EventType.DELETED
PROJECT = "shop"
DENY_INGRESS = policy("default-deny-ingress", ns=PROJECT, policyTypes=["Ingress"])
DENY_EGRESS = policy("default-deny-egress", ns=PROJECT, policyTypes=["Egress"])
TUNNEL = policy(
    "tencrypt-tunnel",
    ns=PROJECT,
    policyTypes=["Ingress"],
    ingress=[{"from": [{"podSelector": {}}], "ports": [{"protocol": "UDP", "port": 1337}]}],
)
BLOCKED_TEXT = (
    "NetworkPolicies default-deny-ingress (ingress) drop the tencrypt tunnel (UDP 1337) between "
    "this pod and its project's pods: encrypted traffic cannot pass. Admit the tunnel port "
    "(scripts/k8s/networkpolicy-tunnel.yaml)"
)


def pod(name: str, ip: str | None, node: str = "n1", **labels: str) -> dict:
    obj = kubeobjects.build_pod(PROJECT, name, node, ip)
    obj["metadata"]["labels"].update(labels)
    return obj


DB, WEB = pod("db", "10.128.0.7", role="db"), pod("web", "10.128.1.9", node="n2")
DB_UID = DB["metadata"]["uid"]
NAMESPACE = kubeobjects.build_namespace(PROJECT)


def canonical(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def reduced(name: str, policies, pods=(DB, WEB)) -> str:
    return canonical(World.of(PROJECT, policies, pods, [NAMESPACE]).reduce(name))


class RecordedEvents:
    """Stands in for ``PodEvents``: what the agent asked to record."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str, str]] = []

    def warn(self, namespace: str, name: str, uid: str, reason: str, message: str) -> None:
        self.calls.append((namespace, name, uid, reason, message))


def new_agent(tmp_path: Path, events=None) -> Agent:
    sup = Supervisor(tmp_path / "state", Path("x"), Path("x"), [])
    sup.feed.clock = Clock()
    return Agent("n1", sup, Resolver("annotation", proc=tmp_path / "proc"), events=events)


def listed(agent: Agent, pods=(DB, WEB), policies=(), namespaces=(NAMESPACE,)) -> None:
    agent.fold(Listed(AgentKind.NAMESPACE, list(namespaces)))
    agent.fold(Listed(AgentKind.POD, list(pods)))
    agent.fold(Listed(AgentKind.SERVICE, []))
    agent.fold(Listed(AgentKind.ENDPOINT_SLICE, []))
    agent.fold(Listed(AgentKind.NETWORK_POLICY, list(policies)))


def running(agent: Agent, uid: str = DB_UID, name: str = "db", phase=Phase.READY) -> None:
    want = Want(uid, PROJECT, name, Sandbox(4000, 7), "k1")
    agent.reconciler.on_adopted(want, phase, 0.0)


# -- fold and version ---------------------------------------------------------------------------


def test_lists_of_every_kind_reach_the_views_that_keep_them(tmp_path):
    agent = new_agent(tmp_path)
    listed(agent, policies=[DENY_INGRESS])
    assert agent.listed == {
        AgentKind.NAMESPACE,
        AgentKind.POD,
        AgentKind.SERVICE,
        AgentKind.ENDPOINT_SLICE,
        AgentKind.NETWORK_POLICY,
    }
    assert list(agent.policies.policies[PROJECT]) == ["default-deny-ingress"]
    assert sorted(agent.policies.pods[PROJECT]) == ["db", "web"]
    assert agent.policies.labels[PROJECT] == {
        "kubernetes.io/metadata.name": PROJECT,
        "tencrypt.io/enabled": "true",
    }
    assert agent.members.of(PROJECT).pods == {"10.128.0.7", "10.128.1.9"}
    assert [p.name for p in agent.view.wanted()] == ["db"]  # the node view got pods too
    assert agent.stats.get(Counter.AGENT_BAD_OBJECT) == 0


def test_the_version_is_the_sum_of_both_views_and_events_move_the_right_one(tmp_path):
    agent = new_agent(tmp_path)
    listed(agent)
    members, policies = agent.members.version(PROJECT), agent.policies.version(PROJECT)
    assert (members, policies) == (1, 2)  # pods in both; the namespace's labels in one
    assert agent.version(PROJECT) == 3
    agent.fold(Changed(AgentKind.NETWORK_POLICY, ADDED, DENY_INGRESS))
    assert list(agent.policies.policies[PROJECT]) == ["default-deny-ingress"]
    assert agent.version(PROJECT) == 4 and agent.members.version(PROJECT) == members
    agent.fold(Changed(AgentKind.POD, MODIFIED, pod("web", "10.128.1.9", node="n2", tier="x")))
    assert agent.policies.pods[PROJECT]["web"].labels == {"app": "web", "tier": "x"}
    assert agent.version(PROJECT) == 5 and agent.members.version(PROJECT) == members
    agent.fold(Changed(AgentKind.NAMESPACE, MODIFIED, kubeobjects.build_namespace(PROJECT)))
    assert agent.version(PROJECT) == 5  # the same labels
    relabelled = kubeobjects.build_namespace(PROJECT)
    relabelled["metadata"]["labels"]["team"] = "blue"
    agent.fold(Changed(AgentKind.NAMESPACE, MODIFIED, relabelled))
    assert agent.policies.labels[PROJECT]["team"] == "blue" and agent.version(PROJECT) == 6
    agent.fold(Changed(AgentKind.POD, MODIFIED, pod("web", "10.128.1.10", node="n2", tier="x")))
    assert agent.members.version(PROJECT) == members + 1 and agent.version(PROJECT) == 8
    agent.fold(Changed(AgentKind.POD, DELETED, WEB))
    assert "web" not in agent.policies.pods[PROJECT] and agent.version(PROJECT) == 10
    agent.fold(Changed(AgentKind.NETWORK_POLICY, DELETED, DENY_INGRESS))
    assert PROJECT not in agent.policies.policies and agent.version(PROJECT) == 11
    assert agent.stats.get(Counter.AGENT_BAD_OBJECT) == 0  # no policy was read as a pod


# -- policy_of ----------------------------------------------------------------------------------


def test_without_policies_the_document_is_the_pods_and_nothing_is_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tencrypt.agent")
    events = RecordedEvents()
    agent = new_agent(tmp_path, events)
    listed(agent)
    got = agent.policy_of(PROJECT, "db", DB_UID)
    assert got == PodPolicy(reduced("db", []), ())
    assert json.loads(got.document)["ingress"]["isolated"] is False
    assert agent.blocked == {DB_UID: ()} and events.calls == [] and caplog.records == []


def test_a_blocked_tunnel_is_reported_once_when_it_appears_and_once_when_it_clears(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="tencrypt.agent")
    events = RecordedEvents()
    agent = new_agent(tmp_path, events)
    listed(agent, policies=[DENY_INGRESS])
    got = agent.policy_of(PROJECT, "db", DB_UID)
    assert got == PodPolicy(reduced("db", [DENY_INGRESS]), (("ingress", "default-deny-ingress"),))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"shop/db: {BLOCKED_TEXT}")
    ]
    assert events.calls == [(PROJECT, "db", DB_UID, "TencryptTunnelBlocked", BLOCKED_TEXT)]
    assert agent.policy_of(PROJECT, "db", DB_UID) == got  # the same finding: said once
    assert len(caplog.records) == 1 and len(events.calls) == 1
    agent.fold(Changed(AgentKind.NETWORK_POLICY, ADDED, TUNNEL))
    cleared = agent.policy_of(PROJECT, "db", DB_UID)
    assert cleared == PodPolicy(reduced("db", [DENY_INGRESS, TUNNEL]), ())
    assert [(r.levelno, r.getMessage()) for r in caplog.records[1:]] == [
        (logging.INFO, "shop/db: its NetworkPolicies admit the tunnel again")
    ]
    agent.policy_of(PROJECT, "db", DB_UID)
    assert len(caplog.records) == 2 and len(events.calls) == 1 and agent.blocked[DB_UID] == ()


def test_a_changed_finding_is_reported_again_naming_every_policy(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tencrypt.agent")
    events = RecordedEvents()
    agent = new_agent(tmp_path, events)
    listed(agent, policies=[DENY_INGRESS])
    agent.policy_of(PROJECT, "db", DB_UID)
    agent.fold(Changed(AgentKind.NETWORK_POLICY, ADDED, DENY_EGRESS))
    got = agent.policy_of(PROJECT, "db", DB_UID)
    assert got.tunnel_blocked == (
        ("egress", "default-deny-egress"),
        ("ingress", "default-deny-ingress"),
    )
    assert len(events.calls) == 2
    assert events.calls[1][4].startswith(
        "NetworkPolicies default-deny-egress (egress), default-deny-ingress (ingress) drop "
    )
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]


def test_findings_are_kept_per_pod(tmp_path):
    events = RecordedEvents()
    agent = new_agent(tmp_path, events)
    listed(agent, policies=[DENY_INGRESS])
    agent.policy_of(PROJECT, "db", DB_UID)
    agent.policy_of(PROJECT, "web", WEB["metadata"]["uid"])
    assert [c[1] for c in events.calls] == ["db", "web"]
    assert agent.blocked == {
        DB_UID: (("ingress", "default-deny-ingress"),),
        WEB["metadata"]["uid"]: (("ingress", "default-deny-ingress"),),
    }


def test_a_lone_pod_loses_no_peer_and_an_unknown_pod_gets_the_closed_document(tmp_path):
    agent = new_agent(tmp_path, RecordedEvents())
    listed(agent, pods=[DB], policies=[DENY_INGRESS])
    assert agent.policy_of(PROJECT, "db", DB_UID).tunnel_blocked == ()
    got = agent.policy_of(PROJECT, "ghost", "uid-ghost")
    closed = {"isolated": True, "policies": ["default-deny-ingress"], "rules": []}
    assert got.tunnel_blocked == () and json.loads(got.document) == {
        "format": NETPOL_FORMAT,
        "project": PROJECT,
        "pod": "ghost",
        "generation": 0,
        "ips": [],
        "ingress": closed,
        "egress": closed,
        "named_ports": {},
        "malformed": [],
    }


def test_without_an_events_writer_the_finding_is_still_logged(tmp_path, caplog):
    agent = new_agent(tmp_path)
    listed(agent, policies=[DENY_INGRESS])
    got = agent.policy_of(PROJECT, "db", DB_UID)
    assert got.tunnel_blocked == (("ingress", "default-deny-ingress"),)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"shop/db: {BLOCKED_TEXT}"
    ]


def test_findings_of_pods_without_a_proxy_any_more_are_forgotten(tmp_path):
    agent = new_agent(tmp_path, RecordedEvents())
    listed(agent, policies=[DENY_INGRESS])
    running(agent)
    agent.policy_of(PROJECT, "db", DB_UID)
    agent.policy_of(PROJECT, "web", "uid-web")
    agent.drop_unused_keys([])
    assert list(agent.blocked) == [DB_UID]
    agent.reconciler.on_stopped(DB_UID)
    agent.drop_unused_keys([])
    assert agent.blocked == {}


# -- push_members -------------------------------------------------------------------------------


def file_of(agent: Agent, uid: str = DB_UID) -> dict:
    return json.loads(agent.supervisor.feed.path(uid).read_text())


def test_a_policy_change_alone_rewrites_the_pods_file(tmp_path):
    agent = new_agent(tmp_path)
    listed(agent)
    running(agent)
    agent.push_members()
    feed = agent.supervisor.feed
    first = file_of(agent)
    assert feed.writes == 1 and first["format"] == "tencrypt-members/2"
    assert first["networkPolicy"] == json.loads(reduced("db", []))
    assert "tunnelBlocked" not in first
    agent.push_members()
    assert feed.writes == 1  # nothing changed: not written again
    agent.fold(Changed(AgentKind.NETWORK_POLICY, ADDED, DENY_INGRESS))
    agent.push_members()
    second = file_of(agent)
    assert feed.writes == 2 and second["generation"] == first["generation"] + 1
    assert second["pods"] == first["pods"]
    assert second["networkPolicy"] == json.loads(reduced("db", [DENY_INGRESS]))
    assert second["tunnelBlocked"] == [{"direction": "ingress", "policy": "default-deny-ingress"}]
    members = parse_members(feed.path(DB_UID).read_bytes())
    assert members.network_policy == reduced("db", [DENY_INGRESS])
    assert members.tunnel_blocked == (("ingress", "default-deny-ingress"),)


def test_a_change_that_leaves_the_pods_document_alone_writes_nothing(tmp_path):
    agent = new_agent(tmp_path)
    listed(agent, policies=[DENY_INGRESS])
    running(agent)
    agent.push_members()
    version = agent.version(PROJECT)
    # a label no rule reads: the project moved, the document of db did not
    agent.fold(Changed(AgentKind.POD, MODIFIED, pod("web", "10.128.1.9", node="n2", tier="x")))
    assert agent.version(PROJECT) == version + 1
    agent.push_members()
    assert agent.supervisor.feed.writes == 1
    assert agent.supervisor.feed.is_current(DB_UID, (PROJECT, version + 1))


def test_a_dead_proxys_file_waits_for_its_start(tmp_path):
    agent = new_agent(tmp_path)
    listed(agent, policies=[DENY_INGRESS])
    running(agent, phase=Phase.DEAD)
    agent.push_members()
    assert agent.supervisor.feed.writes == 0 and not agent.supervisor.feed.path(DB_UID).exists()


# -- PodEvents ----------------------------------------------------------------------------------


class FakeEventsApi:
    """``CoreV1Api.create_namespaced_event``, recording; ``fail``: raised instead."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.created: list[tuple[str, dict]] = []
        self.calls = 0
        self.fail = fail

    def create_namespaced_event(self, namespace: str, body: dict) -> None:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        self.created.append((namespace, body))


class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class FrozenDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 3, 4, 5, 6, 7, 891011, tzinfo=tz)


@pytest.fixture
def frozen(monkeypatch):
    clock = types.SimpleNamespace(datetime=FrozenDatetime, UTC=datetime.UTC)
    monkeypatch.setattr(events_module, "datetime", clock)


def test_an_event_names_the_pod_and_says_the_finding(frozen):
    api = FakeEventsApi()
    PodEvents(api, "n1").warn(PROJECT, "db", "uid-1", "TencryptTunnelBlocked", "dropped")
    assert api.created == [
        (
            PROJECT,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"db.tencrypt-{stable_uid('uid-1', 'TencryptTunnelBlocked', 'dropped')[:8]}",
                    "namespace": PROJECT,
                },
                "involvedObject": {
                    "kind": "Pod",
                    "namespace": PROJECT,
                    "name": "db",
                    "uid": "uid-1",
                },
                "reason": "TencryptTunnelBlocked",
                "message": "dropped",
                "type": "Warning",
                "source": {"component": "tencrypt-agent", "host": "n1"},
                "firstTimestamp": "2026-03-04T05:06:07Z",
                "lastTimestamp": "2026-03-04T05:06:07Z",
                "count": 1,
            },
        )
    ]


def test_one_event_per_pod_reason_and_message(frozen):
    api = FakeEventsApi()
    events = PodEvents(api, "n1")
    events.warn(PROJECT, "db", "uid-1", "R", "m1")
    events.warn(PROJECT, "db", "uid-1", "R", "m1")
    events.warn(PROJECT, "db", "uid-1", "R", "m2")  # a changed finding
    events.warn(PROJECT, "db", "uid-2", "R", "m1")  # another pod (a new one of that name)
    events.warn(PROJECT, "db", "uid-1", "S", "m1")
    assert [(b["involvedObject"]["uid"], b["reason"], b["message"]) for _, b in api.created] == [
        ("uid-1", "R", "m1"),
        ("uid-1", "R", "m2"),
        ("uid-2", "R", "m1"),
        ("uid-1", "S", "m1"),
    ]
    names = [b["metadata"]["name"] for _, b in api.created]
    assert len(set(names)) == 4 and events.writes == 4


def test_what_is_remembered_is_bounded(frozen, monkeypatch):
    monkeypatch.setattr(events_module, "MAX_REMEMBERED", 2)
    api = FakeEventsApi()
    events = PodEvents(api, "n1")
    for message in ("a", "b", "c", "c", "a"):
        events.warn(PROJECT, "db", "uid-1", "R", message)
    # "c" found the memory full: it was cleared, so "a" is said again (once, not forever)
    assert [b["message"] for _, b in api.created] == ["a", "b", "c", "a"]


def test_a_failed_write_is_logged_once_per_kind_never_raised_nor_retried(frozen, caplog):
    api = FakeEventsApi(ApiError(403))
    events = PodEvents(api, "n1")
    events.warn(PROJECT, "db", "uid-1", "R", "m1")
    events.warn(PROJECT, "db", "uid-1", "R", "m1")  # the same: not tried again
    events.warn(PROJECT, "web", "uid-2", "R", "m1")  # another, failing the same way
    assert api.calls == 2 and events.writes == 0
    api.fail = OSError("connection refused")
    events.warn(PROJECT, "db", "uid-3", "R", "m1")
    api.fail = ApiError(403)
    events.warn(PROJECT, "db", "uid-4", "R", "m1")
    assert [r.getMessage() for r in caplog.records] == [
        "cannot record Events (ApiError 403): the log says it instead",
        "cannot record Events (OSError): the log says it instead",
        "cannot record Events (ApiError 403): the log says it instead",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    api.fail = None
    events.warn(PROJECT, "db", "uid-5", "R", "m1")
    assert events.writes == 1 and len(api.created) == 1


# -- MembersFeed.write with a PodPolicy ---------------------------------------------------------

NETPOL = reduced("db", [DENY_INGRESS])
BLOCKED = (("ingress", "default-deny-ingress"),)


def members(version: int, table=()) -> ProjectMembers:
    return ProjectMembers(PROJECT, version, frozenset({"10.128.0.7"}), frozenset(), table)


def test_format_2_carries_the_policy_and_the_finding(tmp_path):
    feed = MembersFeed(tmp_path, clock=Clock())
    written = feed.write("u1", members(1), PodPolicy(NETPOL, BLOCKED))
    assert written is not None and written.network_policy == NETPOL
    assert written.tunnel_blocked == BLOCKED
    doc = json.loads(feed.path("u1").read_text())
    assert doc["format"] == "tencrypt-members/2"
    assert doc["networkPolicy"] == json.loads(NETPOL)
    assert doc["tunnelBlocked"] == [{"direction": "ingress", "policy": "default-deny-ingress"}]
    assert parse_members(feed.path("u1").read_text()) == written


def test_format_1_carries_neither(tmp_path):
    feed = MembersFeed(tmp_path, clock=Clock())
    written = feed.write("u1", members(1, table=None), PodPolicy(NETPOL, BLOCKED))
    assert written is not None
    assert (written.network_policy, written.tunnel_blocked) == (None, ())
    doc = json.loads(feed.path("u1").read_text())
    assert doc["format"] == "tencrypt-members/1"
    assert "networkPolicy" not in doc and "tunnelBlocked" not in doc


def test_no_policy_writes_no_policy_keys(tmp_path):
    feed = MembersFeed(tmp_path, clock=Clock())
    written = feed.write("u1", members(1))
    assert written is not None and written.network_policy is None
    doc = json.loads(feed.path("u1").read_text())
    assert "networkPolicy" not in doc and "tunnelBlocked" not in doc


def test_an_unchanged_policy_is_not_rewritten_a_changed_one_is(tmp_path):
    feed = MembersFeed(tmp_path, clock=Clock())
    first = feed.write("u1", members(1), PodPolicy(NETPOL, BLOCKED))
    assert first is not None
    assert feed.write("u1", members(2), PodPolicy(NETPOL, BLOCKED)) is None
    assert feed.writes == 1
    other = reduced("db", [DENY_INGRESS, TUNNEL])
    changed = feed.write("u1", members(3), PodPolicy(other, ()))
    assert changed is not None and feed.writes == 2
    assert changed.generation == first.generation + 1
    assert (changed.network_policy, changed.tunnel_blocked) == (other, ())
    assert "tunnelBlocked" not in json.loads(feed.path("u1").read_text())
    only_finding = feed.write("u1", members(4), PodPolicy(other, BLOCKED))
    assert only_finding is not None and feed.writes == 3
    gone = feed.write("u1", members(5))
    assert gone is not None and gone.network_policy is None and feed.writes == 4
    # the version is what says "unchanged": the caller moves it with every policy change
    assert feed.write("u1", members(5), PodPolicy(NETPOL, BLOCKED)) is None


def test_a_restarted_agent_keeps_a_file_whose_policy_is_already_right(tmp_path):
    held = MembersFeed(tmp_path, clock=Clock(5_000.0)).write(
        "u1", members(7), PodPolicy(NETPOL, BLOCKED)
    )
    assert held is not None
    again = MembersFeed(tmp_path, clock=Clock(9_000.0))
    assert again.write("u1", members(1), PodPolicy(NETPOL, BLOCKED)) is None
    assert again.writes == 0
    rewritten = again.write("u1", members(2), PodPolicy(NETPOL, ()))
    assert rewritten is not None and rewritten.generation == 9_000_000
