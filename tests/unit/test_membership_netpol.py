"""core/membership.py rule 4's ``networkPolicy`` (the pod's ``tencrypt-netpol/1`` document) and
``tunnelBlocked`` (the writer's report of the policies that drop the tunnel): round trip,
canonical text, a file whose policy does not parse refused whole, format 1 ignoring both."""

from __future__ import annotations

import json

import pytest

from tencrypt.core.membership import (
    FORMAT,
    FORMAT_V1,
    Members,
    MembershipError,
    parse_members,
    render_members,
)
from tencrypt.core.netpolicy import render_netpol
from tests.unit.test_policyflows import API_443, FRONT_6379, doc

POLICY = doc(ingress=[FRONT_6379], egress=[API_443])  # project "shop", pod "db"
CANONICAL = render_netpol(POLICY).rstrip("\n")
PODS = frozenset({"10.128.0.7", "10.128.0.9"})


def file_text(fmt: str = FORMAT, **extra: object) -> str:
    return json.dumps(
        {"format": fmt, "project": "shop", "generation": 4, "pods": sorted(PODS), **extra}
    )


def members(policy: str | None = CANONICAL, blocked=(), table=()) -> Members:
    return Members("shop", 4, PODS, frozenset(), table, (), (), None, policy, blocked)


def test_a_policy_and_a_finding_round_trip():
    m = members(blocked=(("egress", "db-out"), ("ingress", "db-in")))
    text = render_members(m)
    assert parse_members(text) == m
    doc_ = json.loads(text)
    assert doc_["networkPolicy"] == POLICY  # an object in the file, not a string in one
    assert doc_["tunnelBlocked"] == [
        {"direction": "egress", "policy": "db-out"},
        {"direction": "ingress", "policy": "db-in"},
    ]


def test_the_policy_is_kept_as_canonical_text_whatever_the_files_spelling():
    shuffled = dict(reversed(list(POLICY.items())))
    text = (
        '{"format": "tencrypt-members/2", "project": "shop", "generation": 4,\n'
        f' "networkPolicy":   {json.dumps(shuffled, indent=3)}}}'
    )
    m = parse_members(text)
    assert m.network_policy == CANONICAL
    assert m.network_policy == json.dumps(POLICY, sort_keys=True, separators=(",", ":"))
    assert render_members(m) == render_members(parse_members(render_members(m)))


def test_the_finding_is_sorted_and_deduplicated():
    blocked = [
        {"direction": "ingress", "policy": "b"},
        {"direction": "egress", "policy": "z"},
        {"direction": "ingress", "policy": "a"},
        {"direction": "ingress", "policy": "b", "note": "unknown keys are ignored"},
    ]
    m = parse_members(file_text(tunnelBlocked=blocked))
    assert m.tunnel_blocked == (("egress", "z"), ("ingress", "a"), ("ingress", "b"))


def test_absent_or_null_is_none_and_empty():
    for extra in ({}, {"networkPolicy": None}, {"tunnelBlocked": []}):
        m = parse_members(file_text(**extra))
        assert (m.network_policy, m.tunnel_blocked) == (None, ())
    text = render_members(members(policy=None))
    assert "networkPolicy" not in json.loads(text) and "tunnelBlocked" not in json.loads(text)


@pytest.mark.parametrize(
    "policy, says",
    [
        ("a policy", "'networkPolicy': not a JSON object"),
        ([POLICY], "'networkPolicy': not a JSON object"),
        (
            {**POLICY, "format": "tencrypt-netpol/2"},
            "'networkPolicy': format is 'tencrypt-netpol/2', expected 'tencrypt-netpol/1'",
        ),
        (
            {**POLICY, "generation": -1},
            "'networkPolicy': 'generation' must be a non-negative integer",
        ),
        (
            {k: v for k, v in POLICY.items() if k != "ingress"},
            "'networkPolicy': document: 'ingress' is missing",
        ),
        (
            {**POLICY, "ips": ["10.128.0.300"]},
            "'networkPolicy': ips: not an IP address: '10.128.0.300'",
        ),
        (
            {**POLICY, "project": "blog"},
            "'networkPolicy' is project 'blog''s, the file is 'shop''s",
        ),
    ],
)
def test_a_policy_that_does_not_parse_or_is_another_projects_refuses_the_file(policy, says):
    with pytest.raises(MembershipError, match=says):
        parse_members(file_text(networkPolicy=policy))


@pytest.mark.parametrize(
    "blocked, says",
    [
        ("ingress", "'tunnelBlocked' must be a list"),
        ({"direction": "ingress", "policy": "p"}, "'tunnelBlocked' must be a list"),
        (["ingress"], "'tunnelBlocked': not a direction and policy: 'ingress'"),
        ([{"direction": "both", "policy": "p"}], "not a direction and policy"),
        ([{"direction": "Ingress", "policy": "p"}], "not a direction and policy"),
        ([{"direction": "ingress"}], "not a direction and policy"),
        ([{"direction": "ingress", "policy": ""}], "not a direction and policy"),
        ([{"direction": "egress", "policy": 5}], "not a direction and policy"),
        ([{"direction": "egress", "policy": "ok"}, None], "not a direction and policy: None"),
    ],
)
def test_a_bad_finding_refuses_the_file(blocked, says):
    with pytest.raises(MembershipError, match=says):
        parse_members(file_text(networkPolicy=POLICY, tunnelBlocked=blocked))


def test_format_1_ignores_both_even_when_they_would_not_parse():
    m = parse_members(file_text(FORMAT_V1, networkPolicy="nonsense", tunnelBlocked="x"))
    assert (m.network_policy, m.tunnel_blocked) == (None, ())
    m = parse_members(file_text(FORMAT_V1, networkPolicy=POLICY, tunnelBlocked=[]))
    assert (m.network_policy, m.tunnel_blocked, m.service_table) == (None, (), None)


def test_format_1_is_written_without_them():
    text = render_members(members(blocked=(("ingress", "db-in"),), table=None))
    doc_ = json.loads(text)
    assert doc_["format"] == FORMAT_V1
    assert "networkPolicy" not in doc_ and "tunnelBlocked" not in doc_
