"""core.membership: the file format the agent and the lab hand each proxy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tencrypt.core.membership import (
    FORMAT,
    FORMAT_V1,
    Members,
    MembershipError,
    parse_members,
    render_members,
)


def test_parse_a_document():
    m = parse_members(
        '{"format": "tencrypt-members/1", "project": "shop", "generation": 3, '
        '"pods": ["10.128.0.5", "fd00::0005", "10.128.0.5"], '
        '"services": ["172.30.5.9"], "future": 1}'
    )
    assert m == Members("shop", 3, frozenset({"10.128.0.5", "fd00::5"}), frozenset({"172.30.5.9"}))
    assert m.addresses == {"10.128.0.5", "fd00::5", "172.30.5.9"}


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"format": "tencrypt-members/3", "project": "p", "generation": 1}', "format"),
        (f'{{"format": "{FORMAT}", "project": "", "generation": 1}}', "project"),
        (f'{{"format": "{FORMAT}", "project": "p", "generation": -1}}', "generation"),
        (f'{{"format": "{FORMAT}", "project": "p", "generation": true}}', "generation"),
        (f'{{"format": "{FORMAT}", "project": "p", "generation": 1, "pods": "10.0.0.1"}}', "list"),
        (f'{{"format": "{FORMAT}", "project": "p", "generation": 1, "pods": ["x"]}}', "not an IP"),
        (
            f'{{"format": "{FORMAT_V1}", "project": "p", "generation": 1, "services": [5]}}',
            "not an IP",
        ),
        (
            f'{{"format": "{FORMAT}", "project": "p", "generation": 1, "services": [5]}}',
            "must be a JSON object",
        ),
        (
            f'{{"format": "{FORMAT}", "project": "p", "generation": 1, "podCIDRs": ["10.0/x"]}}',
            "not a CIDR",
        ),
        (
            f'{{"format": "{FORMAT}", "project": "p", "generation": 1, "zone": 3}}',
            "zone",
        ),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_refused_with_a_reason(text, says):
    with pytest.raises(MembershipError, match=says):
        parse_members(text)


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(st.frozensets(ips, max_size=20), st.frozensets(ips, max_size=20), st.integers(0, 2**40))
def test_render_parse_round_trip(pods, services, generation):
    m = Members("shop", generation, pods, services)
    text = render_members(m)
    assert parse_members(text) == m
    assert render_members(parse_members(text)) == text
