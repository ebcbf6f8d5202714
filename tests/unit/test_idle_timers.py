"""Issue 26, idle CPU zero: deadlines instead of ticks (control.py rule 4, linux/dns.py).

The pure part: every table says when it next has something to do (``next_expiry``), and
core/timers.py ``sleep_plan`` turns the earliest of them into a sleep. The shell's part: the
timer task of a proxy on in-memory ports (tests/unit/fakes.py) sleeps far while nothing is
due, and a deadline created while it sleeps (a handshake) wakes it so that the deadline is
kept; the DNS proxy's sweep is armed at the table's earliest expiry and moved earlier by a
sooner one. Clocks are fake or the deadlines are placed a few milliseconds ahead: nothing
asserts how long anything took."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time

import pytest

from tencrypt import control
from tencrypt.core.classify import AddrClass, ClassTable, Domains
from tencrypt.core.conntrack import ServiceFlows
from tencrypt.core.dnscache import AnswerCache
from tencrypt.core.flowstate import TCP_CLOSED, UDP_LIKE, FlowState, IdleFlows, earliest
from tencrypt.core.holdqueue import HoldQueue
from tencrypt.core.membership import Members
from tencrypt.core.nat import FlowTable
from tencrypt.core.policyflows import PolicyFlows
from tencrypt.core.session import Limits
from tencrypt.core.stats import Stats
from tencrypt.core.timers import STUCK, sleep_plan
from tencrypt.linux.dns import DnsConfig, DnsProxy
from tencrypt.linux.members import write_members
from tests.unit.fakes import Pod, Wire, until

A, B = "10.128.0.11", "10.128.0.12"


# ---- pure: the deadlines ------------------------------------------------------------------


def test_earliest_ignores_missing_deadlines():
    assert earliest() is None
    assert earliest(None, None) is None
    assert earliest(None, 5.0, 3.0, None) == 3.0


def test_sleep_plan_sleeps_until_the_earliest_deadline_and_says_when_it_is_deep():
    assert sleep_plan(100.0, 160.0, lead=2.0) == (60.0, True)  # far: a new deadline must wake
    assert sleep_plan(100.0, 101.5, lead=2.0) == (1.5, False)  # within lead: nobody needs to
    assert sleep_plan(100.0, None, lead=2.0) == (None, True)  # nothing due: until woken
    assert sleep_plan(100.0, 160.0, lead=2.0, cap=2.0) == (2.0, False)  # the lane's cap
    assert sleep_plan(100.0, None, lead=1.0, cap=2.0) == (2.0, True)
    assert sleep_plan(100.0, 100.5, lead=1.0, cap=2.0) == (0.5, False)


def test_sleep_plan_never_spins_on_a_deadline_left_in_the_past():
    delay, _ = sleep_plan(100.0, 99.0, lead=2.0)
    assert delay == STUCK > 0
    delay, _ = sleep_plan(100.0, 100.0, lead=2.0)
    assert delay == STUCK


def test_idle_flows_next_expiry_is_the_earliest_queue_front_plus_its_timeout():
    idle: IdleFlows[int, FlowState] = IdleFlows((3600.0, 10.0, 180.0, 30.0))
    assert idle.next_expiry() is None
    idle.insert(1, FlowState(100.0, UDP_LIKE))
    idle.insert(2, FlowState(150.0, TCP_CLOSED))
    assert idle.next_expiry() == 160.0  # the closed TCP flow, though it came later
    assert idle.reap(159.9) == []
    assert [k for k, _ in idle.reap(160.0)] == [2]
    assert idle.next_expiry() == 280.0
    idle.touch(1, idle.flows[1], UDP_LIKE, 200.0)
    assert idle.next_expiry() == 380.0


def test_the_flow_tables_say_when_expire_next_removes_something():
    stats = Stats()
    nat = FlowTable(("10.128.0.11",), ("172.30.0.0/16",), stats)
    services = ServiceFlows(stats, lambda bound: 0)
    policy = PolicyFlows(stats)
    for table in (nat, services, policy):
        assert table.next_expiry() is None
    flow = FlowState(50.0, UDP_LIKE)
    policy._idle.insert((1, 2), flow)  # one flow, as ``outbound`` keeps it
    assert policy.next_expiry() == 50.0 + policy._idle.timeouts[UDP_LIKE]
    assert policy.expire(policy.next_expiry() - 0.001) == 0
    assert policy.expire(policy.next_expiry()) == 1
    assert policy.next_expiry() is None


def test_a_hold_queue_names_its_earliest_finite_deadline():
    q: HoldQueue[str, bytes] = HoldQueue(4, 16)
    assert q.next_deadline() is None
    q.add("a", [b"x"])  # a HOLD: no deadline
    assert q.next_deadline() is None
    q.add("b", [b"x"], 12.0)
    q.add("c", [b"x"], 11.0)
    assert q.next_deadline() == 11.0
    assert [k for k, _ in q.expired(11.0)] == ["c"]
    assert q.next_deadline() == 12.0


def test_a_pod_with_a_wait_is_due_at_the_waits_deadline():
    pod = Pod(A)
    d = pod.proxy.dispatch
    assert d.next_expiry() is None
    d.holds.add("172.30.7.7", [b"x"], 103.0)
    d.give_up("10.0.0.9", 160.0)
    assert d.next_expiry() == 103.0
    assert d.overdue(103.0)
    assert d.next_expiry() == 160.0


def test_the_class_table_hears_of_a_sooner_expiry_only():
    table = ClassTable(Domains.of("shop.svc.cluster.local", "cluster.local"), min_ttl=1)
    heard: list[float] = []
    table.on_sooner = heard.append
    table.learn("172.30.0.5", AddrClass.INTERNAL, 60, 100.0)
    table.learn("172.30.0.6", AddrClass.INTERNAL, 90, 100.0)  # later: the sweep is armed
    table.learn("172.30.0.7", AddrClass.INTERNAL, 30, 100.0)  # sooner: re-arm
    assert heard == [160.0, 130.0]
    assert table.next_expiry() == 130.0
    changes = table.expire(130.0)
    assert [c.ip for c in changes] == ["172.30.0.7"]
    assert table.next_expiry() == 160.0


def test_the_answer_cache_names_its_earliest_entry():
    from dnslib import QTYPE, RR, DNSRecord
    from dnslib import A as ARecord

    from tencrypt.core.dnsmsg import parse_message

    cache = AnswerCache(16, max_ttl=86400)
    assert cache.next_expiry() is None
    for name, ttl in (("a.example", 60), ("b.example", 20)):
        query = DNSRecord.question(name)
        reply = query.reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=ARecord("192.0.2.1"), ttl=ttl))
        parsed = parse_message(query.pack())
        assert parsed is not None
        assert cache.store(parsed, reply.pack(), reply, 100.0)
    assert cache.next_expiry() == 120.0
    assert cache.expire(120.0) == 1
    assert cache.next_expiry() == 160.0


# ---- the proxy's timer task ---------------------------------------------------------------


def ipv4_udp(src: str, dst: str, payload: bytes = b"ping") -> bytes:
    udp = struct.pack("!HHHH", 40000, 7000, 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            0,
            0x4000,
            64,
            17,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + udp
    )


def members() -> Members:
    return Members("shop", 1, frozenset({A, B}), frozenset())


def test_an_idle_proxy_sleeps_until_its_file_safety_poll():
    pod = Pod(A, members=members())

    async def main() -> tuple[float | None, bool, bool]:
        task = asyncio.create_task(pod.proxy.timers())
        await until(lambda: pod.proxy.timers_at is not None)
        at, deep = pod.proxy.timers_at, pod.proxy._timers_deep
        watched = pod.proxy.watch is not None and pod.proxy.watch.active
        pod.proxy.stopping.set()
        await task
        return at, deep, watched

    at, deep, watched = asyncio.run(main())
    assert watched  # the members file's directory is watched with inotify
    assert at == pod.clock.now + control.SAFETY_POLL  # not SWEEP: no tick
    assert deep


def test_a_handshake_started_while_the_task_sleeps_deep_is_retried_on_time():
    """Rule 4b: the batch that starts a handshake wakes the deep-sleeping task; its next
    sleep ends by the initiation's retry time, and the retry is sent then."""
    limits = Limits(rekey_timeout=0.05, handshake_give_up=30.0)
    pod = Pod(A, members=members(), limits=limits)

    async def main() -> tuple[float | None, float | None, int, int]:
        task = asyncio.create_task(pod.proxy.timers())
        await until(lambda: pod.proxy._timers_deep)
        before = pod.proxy.timers_at
        pod.app_sends(ipv4_udp(A, B))  # no session: an initiation, retried at +rekey_timeout
        first = len(pod.udp.sent)
        due = pod.proxy.tunnel.next_timer()
        await until(lambda: pod.proxy.timers_at is not None and pod.proxy.timers_at <= due)
        armed = pod.proxy.timers_at
        pod.clock.now += limits.rekey_timeout  # the retry is due now
        await until(lambda: len(pod.udp.sent) > first)
        pod.proxy.stopping.set()
        await task
        return before, armed, first, len(pod.udp.sent)

    before, armed, first, after = asyncio.run(main())
    assert before is not None and before > pod.clock.now  # it slept far away
    assert armed is not None and armed <= 100.0 + limits.rekey_timeout
    assert first == 1 and after == 2  # the first initiation, then its retry


def test_without_the_batch_hook_the_deep_sleep_would_miss_the_handshake(monkeypatch):
    """The test above can fail: with ``deadlines_moved`` doing nothing the task stays armed
    far past the initiation's retry time."""
    limits = Limits(rekey_timeout=0.05, handshake_give_up=30.0)
    pod = Pod(A, members=members(), limits=limits)
    monkeypatch.setattr(pod.proxy, "deadlines_moved", lambda: None)

    async def main() -> tuple[float | None, float | None]:
        task = asyncio.create_task(pod.proxy.timers())
        await until(lambda: pod.proxy._timers_deep)
        pod.app_sends(ipv4_udp(A, B))
        for _ in range(5):
            await asyncio.sleep(0)
        armed, due = pod.proxy.timers_at, pod.proxy.tunnel.next_timer()
        pod.proxy.stopping.set()
        await task
        return armed, due

    armed, due = asyncio.run(main())
    assert armed is not None and due is not None and armed > due


def test_while_a_session_has_keys_the_sleep_is_capped_for_the_express_lane():
    """Rule 4c: the lane arms keepalive/stale deadlines without a hook, so while a keyed
    session exists the task sleeps at most min(keepalive, stale); once the sessions have
    expired it sleeps deep again."""
    a, b = Pod(A, members=members()), Pod(B, members=members())
    limits = a.proxy.tunnel.limits

    async def round_after(advance: float) -> tuple[float | None, float]:
        a.clock.now += advance
        a.proxy.timers_at = None
        a.proxy._wake_timers()
        await until(lambda: a.proxy.timers_at is not None)
        return a.proxy.timers_at, a.clock.now

    async def main() -> tuple[tuple[float | None, float], tuple[float | None, float]]:
        for pod in (a, b):
            pod.proxy._poll_members(pod.clock.now)  # as prepare() does at start
        wire = Wire(a, b)
        a.app_sends(ipv4_udp(A, B))
        wire.pump()
        assert a.proxy._keyed_sessions()  # the handshake completed: a keyed session
        for peer in a.proxy.tunnel.table.peers:  # as if its timers had fired, the lane idle
            peer.keepalive_due = peer.stale_due = None
        task = asyncio.create_task(a.proxy.timers())
        await until(lambda: a.proxy.timers_at is not None)
        keyed = await round_after(0.0)
        expired = await round_after(limits.reject_after_time + 1)
        a.proxy.stopping.set()
        await task
        return keyed, expired

    (armed, now), (later, then) = asyncio.run(main())
    assert armed is not None and armed <= now + min(limits.keepalive_timeout, limits.stale_timeout)
    assert not a.proxy._keyed_sessions()
    assert later is not None and later > then + min(limits.keepalive_timeout, limits.stale_timeout)


def test_without_file_events_the_safety_poll_still_loads_a_new_membership(monkeypatch):
    """A file system that reports nothing (inotify quiet): the change is seen at the safety
    poll, and not before it."""
    pod = Pod(A, members=members())
    monkeypatch.setattr(pod.proxy, "_on_file_event", lambda: None)  # events go nowhere

    async def main() -> tuple[int, int]:
        task = asyncio.create_task(pod.proxy.timers())
        await until(lambda: pod.proxy._timers_deep)
        write_members(
            pod.members_dir, Members("shop", 2, frozenset({A, B, "10.128.0.13"}), frozenset())
        )
        pod.proxy.timers_at = None
        pod.proxy._wake_timers()  # a round for another reason: not the poll's time yet
        await until(lambda: pod.proxy.timers_at is not None)
        early = pod.proxy.members.loaded.generation if pod.proxy.members.loaded else 0
        pod.clock.now += control.SAFETY_POLL
        pod.proxy._wake_timers()
        await until(lambda: pod.proxy.members.loaded.generation == 2)
        late = pod.proxy.members.loaded.generation
        pod.proxy.stopping.set()
        await task
        return early, late

    early, late = asyncio.run(main())
    assert (early, late) == (1, 2)


def test_a_file_event_wakes_the_task_and_loads_the_membership_at_once():
    pod = Pod(A, members=members())

    async def main() -> int:
        task = asyncio.create_task(pod.proxy.timers())
        await until(lambda: pod.proxy._timers_deep)
        write_members(pod.members_dir, Members("shop", 2, frozenset({A, B}), frozenset()))
        await until(lambda: pod.proxy.members.loaded.generation == 2)  # the clock stood still
        pod.proxy.stopping.set()
        await task
        return pod.proxy.members.loaded.generation

    assert asyncio.run(main()) == 2


def test_without_inotify_the_files_are_polled_every_second(monkeypatch):
    from tencrypt.linux import watch

    monkeypatch.setattr(watch, "_libc", lambda: None)
    pod = Pod(A, members=members())

    async def main() -> float | None:
        task = asyncio.create_task(pod.proxy.timers())
        await until(lambda: pod.proxy.timers_at is not None)
        at = pod.proxy.timers_at
        pod.proxy.stopping.set()
        await task
        return at

    assert asyncio.run(main()) == pod.clock.now + control.SWEEP


# ---- the DNS proxy's sweep ----------------------------------------------------------------


def dns_proxy() -> DnsProxy:
    config = DnsConfig(upstream=("127.0.0.1", 9), domain="shop.svc.cluster.local", min_ttl=1)
    return DnsProxy(config, Stats())


def test_the_dns_sweep_is_armed_at_the_earliest_expiry_and_reports_it():
    async def main() -> tuple[float, float, list[str], bool]:
        proxy = dns_proxy()
        changed: list[str] = []
        proxy.on_change = lambda changes: changed.extend(c.ip for c in changes)
        proxy.table.on_sooner = proxy._arm_sweep  # as start() does
        proxy._rearm_sweep()
        assert proxy._sweep is None  # nothing to expire: nothing armed
        now = time.monotonic()
        proxy._notify(proxy.table.learn("172.30.0.5", AddrClass.INTERNAL, 3600, now))
        far = proxy._sweep_at
        # evidence learnt 59.98 s ago with a 60 s TTL: due in 20 ms, sooner than the first
        proxy._notify(proxy.table.learn("172.30.0.6", AddrClass.INTERNAL, 60, now - 59.98))
        near = proxy._sweep_at
        await until(lambda: changed.count("172.30.0.6") == 2)
        rearmed = proxy._sweep is not None and proxy._sweep_at == far
        await proxy.close()
        return far, near, changed, rearmed

    far, near, changed, rearmed = asyncio.run(main())
    assert near < far
    assert changed.count("172.30.0.6") == 2  # learnt, then expired by the sweep
    assert "172.30.0.5" in changed and changed.count("172.30.0.5") == 1
    assert rearmed  # after the sweep: armed again at the remaining expiry


@pytest.mark.parametrize("name", ["SWEEP_INTERVAL", "_sweep_forever"])
def test_the_dns_proxy_has_no_periodic_sweep_left(name):
    from tencrypt.linux import dns

    assert not hasattr(dns, name) and not hasattr(DnsProxy, name)


def test_a_conflict_is_reported_with_its_answer_even_when_no_class_changed():
    """core/classify.py rule 5 with no tick left to notice it: an answer that contradicts
    live evidence (a tenant's alias for our Service IP) reaches ``on_change`` at once,
    where the shell pops and counts it, though no class changed."""
    proxy = dns_proxy()
    calls: list[list[object]] = []
    popped: list[object] = []

    def on_change(changes: list[object]) -> None:
        calls.append(changes)
        popped.extend(proxy.table.pop_conflicts())

    proxy.on_change = on_change
    now = time.monotonic()
    proxy._notify(proxy.table.learn("172.30.0.5", AddrClass.INTERNAL, 3600, now))
    assert len(calls) == 1
    changes = proxy.table.learn("172.30.0.5", AddrClass.EXTERNAL, 3600, now)
    assert changes == [] and proxy.table.has_conflicts()
    proxy._notify(changes)
    assert calls[-1] == [] and len(popped) == 1 and not proxy.table.has_conflicts()
    proxy._notify([])
    assert len(calls) == 2  # nothing new: not called again
