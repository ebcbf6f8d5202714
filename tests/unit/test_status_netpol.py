"""What a proxy tells of NetworkPolicy (issue #23): ``observe.netpol_status`` (the /status
section), ``observe.render_netpol_metrics`` (/metrics), ``tencrypt status``'s printout of them
(the section, the agent's tunnel-blocked WARNING), and a peer whose initiations go unanswered
(``describe_peer``'s ``unanswered_for``, printed as "UNANSWERED for Ns")."""

from __future__ import annotations

import io
import json

from tencrypt.core import wire
from tencrypt.core.netpolicy import from_doc
from tencrypt.core.policyflows import PolicyFlows
from tencrypt.core.stats import Stats
from tencrypt.observe import netpol_status, render_netpol_metrics
from tencrypt.status import render
from tests.unit.linked import A, B, connect, ipv4, new_net
from tests.unit.test_policyflows import (
    API,
    API_443,
    DB,
    FRONT,
    FRONT_6379,
    OTHER,
    check,
    doc,
    flows,
    syn,
)

TUNNEL_WARNING = (
    "WARNING: NetworkPolicy {policy} ({direction}) drops the tunnel's UDP between this pod and "
    "its project's pods (the agent's report): admit the tunnel port "
    "(scripts/k8s/networkpolicy-tunnel.yaml)"
)


def printed(document: dict) -> list[str]:
    out = io.StringIO()
    render(document, out)
    return out.getvalue().splitlines()


# -- netpol_status ------------------------------------------------------------------------------


def test_no_policy_is_none():
    assert netpol_status(PolicyFlows(Stats())) is None


def test_the_status_says_isolation_flows_denials_and_the_agents_finding():
    table, _ = flows(ingress=[FRONT_6379])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert not check(table, "in", syn(OTHER, DB, 40001, 22))
    assert not check(table, "in", syn(OTHER, DB, 40002, 22))
    assert not check(table, "in", syn(API, DB, 40003, 22))
    table.tunnel_blocked = (("ingress", "db-in"),)
    status = netpol_status(table)
    assert status == {
        "pod": "db",
        "ingress": {"isolated": True, "policies": ["db-in"]},
        "egress": {"isolated": False, "policies": []},
        "malformed": [],
        "flows": 1,
        "blocked_flows": 0,
        "denied_by_peer": {OTHER: 2, API: 1},
        "tunnel_blocked": [{"direction": "ingress", "policy": "db-in"}],
    }
    assert json.loads(json.dumps(status)) == status


def test_the_status_counts_flows_a_new_policy_blocks_and_names_unreadable_policies():
    table, _ = flows(ingress=[FRONT_6379], egress=[API_443])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert check(table, "out", syn(DB, API, 50000, 443))
    stricter = doc(ingress=[], egress=[API_443])
    stricter["malformed"] = ["broken"]
    table.set_policy(from_doc(stricter), 2.0)
    status = netpol_status(table)
    assert status is not None
    assert (status["flows"], status["blocked_flows"], status["malformed"]) == (2, 1, ["broken"])
    assert status["egress"] == {"isolated": True, "policies": ["db-out"]}


# -- render_netpol_metrics ----------------------------------------------------------------------


def test_metrics_without_a_policy_are_the_help_and_type_lines_alone():
    lines = render_netpol_metrics(PolicyFlows(Stats())).splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["#", "HELP", "tencrypt_netpol_flows_allowed_total"],
        ["#", "TYPE", "tencrypt_netpol_flows_allowed_total"],
        ["#", "HELP", "tencrypt_netpol_packets_denied_total"],
        ["#", "TYPE", "tencrypt_netpol_packets_denied_total"],
        ["#", "HELP", "tencrypt_netpol_tunnel_blocked"],
        ["#", "TYPE", "tencrypt_netpol_tunnel_blocked"],
    ]
    assert lines[1::2] == [
        "# TYPE tencrypt_netpol_flows_allowed_total counter",
        "# TYPE tencrypt_netpol_packets_denied_total counter",
        "# TYPE tencrypt_netpol_tunnel_blocked gauge",
    ]


def test_metrics_count_allowed_flows_by_rule_denied_packets_and_the_finding():
    table, _ = flows(ingress=[FRONT_6379], egress=[API_443])
    assert check(table, "in", syn(FRONT, DB, 40000, 6379))
    assert check(table, "in", syn(FRONT, DB, 40001, 6379))
    assert check(table, "out", syn(DB, API, 50000, 443))
    assert not check(table, "in", syn(OTHER, DB, 40002, 6379))
    assert not check(table, "out", syn(DB, OTHER, 50001, 443))
    assert not check(table, "out", syn(DB, OTHER, 50002, 443))
    table.tunnel_blocked = (("egress", "db-out"), ("ingress", "db-in"))
    samples = [ln for ln in render_netpol_metrics(table).splitlines() if not ln.startswith("#")]
    assert samples == [
        'tencrypt_netpol_flows_allowed_total{direction="egress",policy="db-out",rule="0"} 1',
        'tencrypt_netpol_flows_allowed_total{direction="ingress",policy="db-in",rule="0"} 2',
        'tencrypt_netpol_packets_denied_total{direction="egress",policies="db-out"} 2',
        'tencrypt_netpol_packets_denied_total{direction="ingress",policies="db-in"} 1',
        'tencrypt_netpol_tunnel_blocked{direction="egress",policy="db-out"} 1',
        'tencrypt_netpol_tunnel_blocked{direction="ingress",policy="db-in"} 1',
    ]


def test_metric_labels_are_escaped():
    table = PolicyFlows(Stats())
    table.allowed[("ingress", 'a"b\\c\nd', "0")] = 1
    table.denied[("egress", 'x"y')] = 3
    table.tunnel_blocked = (("ingress", "p\\q"),)
    lines = [ln for ln in render_netpol_metrics(table).splitlines() if not ln.startswith("#")]
    assert lines[0] == (
        'tencrypt_netpol_flows_allowed_total{direction="ingress",policy="a\\"b\\\\c\\nd",'
        'rule="0"} 1'
    )
    assert lines[1] == 'tencrypt_netpol_packets_denied_total{direction="egress",policies="x\\"y"} 3'
    assert lines[2] == 'tencrypt_netpol_tunnel_blocked{direction="ingress",policy="p\\\\q"} 1'


# -- tencrypt status ----------------------------------------------------------------------------


def test_without_a_policy_the_printout_says_none_is_enforced():
    lines = printed({})
    assert "network policy: none enforced (no policy from the node agent)" in lines
    assert not any(line.startswith("WARNING") for line in lines)


def test_the_printout_says_isolation_unreadable_policies_and_denials_by_peer():
    section = {
        "pod": "db",
        "ingress": {"isolated": True, "policies": ["allow-frontend", "default-deny"]},
        "egress": {"isolated": False, "policies": []},
        "malformed": ["broken", "worse"],
        "flows": 3,
        "blocked_flows": 1,
        "denied_by_peer": {"10.128.0.8": 2, "10.128.0.9": 7},
        "tunnel_blocked": [],
    }
    lines = printed({"network_policy": section})
    start = lines.index(
        "network policy: ingress isolated by allow-frontend, default-deny; egress open; "
        "3 flows (1 blocked by a policy change)"
    )
    assert lines[start + 1 : start + 4] == [
        "  unreadable policies (deny): broken, worse",
        "  denied from/to 10.128.0.9: 7 packets",
        "  denied from/to 10.128.0.8: 2 packets",
    ]
    assert lines[start + 4].startswith("drops:")
    assert not any(line.startswith("WARNING") for line in lines)


def test_the_agents_tunnel_finding_is_a_warning_printed_first():
    section = {
        "ingress": {"isolated": True, "policies": ["default-deny"]},
        "egress": {"isolated": True, "policies": ["default-deny", "to-api"]},
        "tunnel_blocked": [
            {"direction": "ingress", "policy": "default-deny"},
            {"direction": "egress", "policy": "to-api"},
        ],
    }
    lines = printed({"network_policy": section, "pod_ip": "10.128.0.7"})
    assert lines[:3] == [
        TUNNEL_WARNING.format(policy="default-deny", direction="ingress"),
        TUNNEL_WARNING.format(policy="to-api", direction="egress"),
        "pod 10.128.0.7: 0 peers (0 up), 0 sessions, 0 handshakes pending, 0 packets queued",
    ]
    assert (
        "network policy: ingress isolated by default-deny; egress isolated by default-deny, "
        "to-api; 0 flows (0 blocked by a policy change)"
    ) in lines


def test_a_finding_row_missing_its_fields_still_prints():
    lines = printed({"network_policy": {"tunnel_blocked": [{}]}})
    assert lines[0] == TUNNEL_WARNING.format(policy="?", direction="?")
    assert "network policy: ingress open; egress open; 0 flows (0 blocked by a policy change)" in (
        lines
    )


def peer_line(unanswered: object) -> str:
    peer = {
        "pod_ip": "10.128.0.9",
        "endpoint": "10.128.0.9:1337",
        "addresses": ["10.128.0.9"],
        "handshake_pending": unanswered is not None,
        "queued": 3,
        "unanswered_for": unanswered,
    }
    [line] = [line for line in printed({"peers": [peer]}) if line.startswith("  peer ")]
    return line


def test_a_peer_unanswered_for_five_seconds_or_more_is_flagged():
    head = "  peer 10.128.0.9  endpoint 10.128.0.9:1337  addresses 10.128.0.9  "
    assert peer_line(None) == head + "down  queued 3"
    assert peer_line(0.0) == head + "handshaking  queued 3"
    assert peer_line(4.999) == head + "handshaking  queued 3"  # a retry or two is normal
    assert peer_line(5.0) == head + "handshaking  queued 3  UNANSWERED for 5s"
    assert peer_line(27.6) == head + "handshaking  queued 3  UNANSWERED for 28s"


# -- describe_peer's unanswered_for -------------------------------------------------------------


def peer_of(net, pod: str = A) -> dict:
    [peer] = net.pods[pod].status(net.now)["peers"]
    return peer


def test_unanswered_for_counts_from_the_first_initiation_across_retries():
    net = new_net()
    net.block = {wire.TYPE_RESPONSE}  # B answers, the answers are lost
    net.send(A, B, ipv4(A, B, b"hello"))
    net.pump()
    assert peer_of(net)["unanswered_for"] == 0.0
    net.advance(3.25)  # retried every rekey_timeout (1 s) meanwhile
    initiations = [d for d, src, _ in net.wire if src == A and d[0] == wire.TYPE_INITIATION]
    assert len(initiations) == 4
    assert peer_of(net)["unanswered_for"] == 3.25
    net.block = set()
    net.advance(1.0)  # the next retry is answered
    peer = peer_of(net)
    assert peer["unanswered_for"] is None and peer["up"] and not peer["handshake_pending"]


def test_a_peer_that_answered_or_was_never_asked_is_not_unanswered():
    net = new_net()
    connect(net)
    assert peer_of(net, A)["unanswered_for"] is None  # the initiator, answered
    assert peer_of(net, B)["unanswered_for"] is None  # the responder asked nothing


def test_the_unanswered_time_is_rounded_to_the_millisecond():
    net = new_net()
    net.block = {wire.TYPE_RESPONSE}
    net.send(A, B, ipv4(A, B, b"hello"))
    net.pump()
    status = net.pods[A].status(net.now + 0.123456)
    assert status["peers"][0]["unanswered_for"] == 0.123
