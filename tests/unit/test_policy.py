"""core.policy: the fail-closed verdict table, and a property over random event sequences:
no address that a trusted source called internal is ever given a clear verdict in strict mode,
and the changes the table reports keep routes and the firewall set in step with it."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.classify import (
    AddrClass,
    ClassTable,
    Domains,
    RouteAction,
    route_action,
)
from tencrypt.core.policy import INBOUND, TABLE, Guard, Verdict, decide, decide_inbound

INTERNAL, EXTERNAL = AddrClass.INTERNAL, AddrClass.EXTERNAL
CIDR = "172.30.0.0/16"
GUARD = Guard.of(CIDR, ("172.17.0.0/16", "fd00::/64"))


@pytest.mark.parametrize(
    "cls, guarded, looked, strict, verdict",
    [(INTERNAL, g, lk, s, Verdict.SEAL) for g, lk, s in itertools.product([0, 1], repeat=3)]
    + [(EXTERNAL, g, lk, s, Verdict.CLEAR) for g, lk, s in itertools.product([0, 1], repeat=3)]
    + [(None, False, lk, s, Verdict.CLEAR) for lk, s in itertools.product([0, 1], repeat=2)]
    + [(None, True, False, s, Verdict.HOLD) for s in (0, 1)]
    + [
        (None, True, True, True, Verdict.REFUSE),
        (None, True, True, False, Verdict.CLEAR),
    ],
)
def test_every_row_of_the_table(cls, guarded, looked, strict, verdict):
    assert (
        decide(cls, guarded=bool(guarded), looked_up=bool(looked), strict=bool(strict)) is verdict
    )


def test_the_table_is_complete():
    assert len(TABLE) == 3 * 2 * 2 * 2


@pytest.mark.parametrize(
    "cls, looked, verdict",
    [
        (INTERNAL, False, Verdict.REFUSE),  # the project's: plaintext refused at once
        (INTERNAL, True, Verdict.REFUSE),
        (EXTERNAL, False, Verdict.CLEAR),  # positively another project's: accepted
        (EXTERNAL, True, Verdict.CLEAR),
        (None, False, Verdict.HOLD),  # held while a reverse lookup names its project
        (None, True, Verdict.CLEAR),  # still unknown after it: accepted (the documented residual)
    ],
)
def test_every_row_of_the_inbound_table(cls, looked, verdict):
    """Standalone mode's inbound plaintext (linux/inbound.py), the table alone; it was held only
    through one daemon test (issue 22)."""
    assert decide_inbound(cls, looked_up=looked) is verdict
    assert INBOUND[cls, looked] is verdict


def test_the_inbound_table_is_complete_and_never_lets_the_project_in():
    assert set(INBOUND) == {(c, lk) for c in (INTERNAL, EXTERNAL, None) for lk in (False, True)}
    assert all(v is Verdict.REFUSE for (c, _), v in INBOUND.items() if c is INTERNAL)
    assert Verdict.SEAL not in INBOUND.values()  # inbound plaintext is never "sealed"


def test_guard_takes_cidrs_with_host_bits():
    """A configured range written with a host address (10.128.0.1/14) means its network."""
    guard = Guard.of("172.30.0.1/16", ("10.128.0.1/14",))
    assert "172.30.255.1" in guard and "10.131.0.1" in guard and "10.132.0.1" not in guard


def test_fallback_to_the_clear_only_without_strict():
    assert (
        decide(INTERNAL, guarded=True, looked_up=False, strict=False, fallback=True)
        is Verdict.CLEAR
    )
    assert (
        decide(INTERNAL, guarded=True, looked_up=False, strict=True, fallback=True) is Verdict.SEAL
    )
    assert (
        decide(EXTERNAL, guarded=True, looked_up=False, strict=False, fallback=True)
        is Verdict.CLEAR
    )


@pytest.mark.parametrize(
    "ip, inside",
    [
        ("172.30.0.1", True),
        ("172.17.255.255", True),
        ("172.18.0.1", False),
        ("fd00::5", True),
        ("fd01::5", False),
        ("10.0.0.1", False),
        ("not an ip", False),
    ],
)
def test_guard(ip, inside):
    assert (ip in GUARD) is inside


# -- the property --------------------------------------------------------------------------
POOL = ["172.30.0.10", "172.30.0.11", "172.17.0.12", "172.17.0.13", "fd00::12", "10.1.1.1"]
ips = st.sampled_from(POOL)
events = st.one_of(
    st.tuples(st.just("answer"), ips, st.sampled_from([INTERNAL, EXTERNAL]), st.integers(0, 200)),
    st.tuples(st.just("members"), st.frozensets(ips)),
    st.tuples(st.just("session"), ips, st.integers(1, 200)),
    st.tuples(st.just("adopt"), ips, st.integers(1, 200)),
    st.tuples(st.just("lookup_failed"), ips),
    st.tuples(st.just("tick"), st.integers(0, 150)),
)


class Model:
    """The rules of DESIGN §1a in their plainest form: internal-until per address."""

    def __init__(self, min_ttl: float) -> None:
        self.min_ttl = min_ttl
        self.members: frozenset[str] = frozenset()
        self.members_known = False  # once a membership is loaded, DNS counts for members only
        self.session: dict[str, float] = {}
        self.removable: dict[str, float] = {}  # DNS and adopted evidence: ends with membership
        self.adopted: dict[str, float] = {}  # adopted evidence alone

    def internal(self, ip: str, now: float) -> bool:
        return (
            ip in self.members or self.session.get(ip, 0) > now or self.removable.get(ip, 0) > now
        )


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=60), st.booleans())
def test_no_trusted_internal_address_ever_gets_a_clear_verdict(seq, looked_up):
    table = ClassTable(
        Domains.of("myproject.svc.cluster.local", "cluster.local"), min_ttl=5, max_ttl=100
    )
    model = Model(min_ttl=5)
    routes: dict[str, RouteAction] = {}  # what the Changes say the kernel should have
    firewall: set[str] = set()
    now = 0.0

    def apply(changes):
        for ch in changes:
            action = route_action(ch.ip, ch.new, CIDR)
            if action is RouteAction.NONE:
                routes.pop(ch.ip, None)
            else:
                routes[ch.ip] = action
            (firewall.add if ch.new is INTERNAL else firewall.discard)(ch.ip)

    for event in seq:
        kind = event[0]
        if kind == "answer":
            _, ip, cls, ttl = event
            apply(table.learn(ip, cls, ttl, now))
            if cls is INTERNAL and (not model.members_known or ip in model.members):
                until = now + min(max(ttl, 5), 100)
                model.removable[ip] = max(model.removable.get(ip, 0), until)
        elif kind == "members":
            for ip in model.members - event[1]:
                model.removable.pop(ip, None)
            if not model.members_known:  # DNS evidence from before counts for members only
                for ip in [ip for ip in model.removable if ip not in event[1]]:
                    model.removable[ip] = model.adopted.get(ip, 0.0)
            model.members, model.members_known = event[1], True
            apply(table.set_members(event[1], now))
        elif kind == "session":
            apply(table.note_session(event[1], now, event[2]))
            model.session[event[1]] = max(model.session.get(event[1], 0), now + event[2])
        elif kind == "adopt":
            apply(table.adopt([event[1]], now, event[2]))
            model.removable[event[1]] = max(model.removable.get(event[1], 0), now + event[2])
            model.adopted[event[1]] = max(model.adopted.get(event[1], 0), now + event[2])
        elif kind == "lookup_failed":
            table.note_unknown(event[1], now)
        else:
            now += event[1]
            apply(table.expire(now))
        for ip in POOL:
            cls = table.lookup(ip, now)
            verdict = decide(cls, guarded=ip in GUARD, looked_up=looked_up, strict=True)
            if model.internal(ip, now):
                assert cls is INTERNAL and verdict is Verdict.SEAL, (ip, now)
                assert ip in firewall, (ip, now)
                assert routes.get(ip) is not RouteAction.VIA_UPLINK, (ip, now)
            elif ip in GUARD and cls is None:
                assert verdict is not Verdict.CLEAR
            assert (cls is INTERNAL) == (ip in firewall), (ip, now)


def test_a_locked_inbound_gate_refuses_a_source_still_unknown_after_its_lookup():
    from tencrypt.core.policy import decide_inbound

    assert decide_inbound(None, looked_up=True) is Verdict.CLEAR  # standalone: accepted
    assert decide_inbound(None, looked_up=True, locked=True) is Verdict.REFUSE
    assert decide_inbound(None, looked_up=False, locked=True) is Verdict.HOLD
    assert decide_inbound(AddrClass.EXTERNAL, looked_up=True, locked=True) is Verdict.CLEAR
    assert decide_inbound(AddrClass.INTERNAL, looked_up=False, locked=True) is Verdict.REFUSE
