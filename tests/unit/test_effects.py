"""core.effects (what routes and firewall elements are wanted) and linux.effects (the one task
that applies them), with a kernel that is a dict: no root, no netlink."""

from __future__ import annotations

import asyncio

from tencrypt.core.classify import AddrClass, Change, RouteAction
from tencrypt.core.effects import Desired, Plan
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.stats import Stats
from tencrypt.linux import effects as effects_mod
from tencrypt.linux.effects import EffectApplier
from tests.unit.fakes import FakeKernel

INTERNAL, EXTERNAL = AddrClass.INTERNAL, AddrClass.EXTERNAL
TUN, UPLINK = RouteAction.VIA_TUN, RouteAction.VIA_UPLINK
POD = PodConfig(
    pod_ip="10.128.0.4",
    dev="eth0",
    gateway="10.128.0.1",
    dns="172.30.0.2",
    domain="myproject.svc.cluster.local",
    search=("myproject.svc.cluster.local",),
    cluster_domain="cluster.local",
)


def desired():
    return Desired(POD.service_cidr, POD.own_addresses)


def test_changes_want_routes_and_elements():
    d = desired()
    d.on_changes(
        [
            Change("10.128.0.5", None, INTERNAL),
            Change("172.30.2.20", None, EXTERNAL),
            Change("172.30.2.21", None, INTERNAL),
            Change("172.30.0.2", None, EXTERNAL),
            Change("10.128.0.4", None, INTERNAL),
            Change("fd00::5", None, INTERNAL),
        ]
    )
    plan = d.plan()
    assert dict(plan.routes) == {"10.128.0.5": TUN, "172.30.2.20": UPLINK}
    # 10.128.0.4 is the pod's own address: never a route of ours, never an element
    assert set(plan.add) == {"10.128.0.5", "172.30.2.21", "fd00::5"}
    assert plan.unroutes == () and plan.delete == ()
    assert not d.routed("10.128.0.5") and d.routed("172.30.2.21")


def test_plan_is_the_difference_and_outcomes_close_it():
    d = desired()
    d.on_changes([Change("10.128.0.5", None, INTERNAL)])
    d.route_done("10.128.0.5", TUN)
    d.elements_done(["10.128.0.5"], [])
    assert not d.plan() and d.routed("10.128.0.5")
    d.on_changes([Change("10.128.0.5", INTERNAL, None)])
    assert d.plan() == Plan((), ("10.128.0.5",), (), ("10.128.0.5",))
    d.route_done("10.128.0.5", None)
    d.elements_done([], ["10.128.0.5"])
    assert not d.plan()


def test_a_route_never_ours_is_never_removed():
    d = desired()
    d.on_changes([Change("10.128.0.99", INTERNAL, None)])  # never applied by us
    assert not d.plan()


def run_round(applier):
    asyncio.run(applier.round())


def test_applier_applies_a_round_and_counts():
    kernel, stats, d = FakeKernel(), Stats(), desired()
    applied = []
    ap = EffectApplier(d, stats, kernel, on_applied=lambda: applied.append(1))
    d.on_changes([Change("10.128.0.5", None, INTERNAL), Change("172.30.2.20", None, EXTERNAL)])
    run_round(ap)
    assert kernel.routes == {"10.128.0.5": TUN, "172.30.2.20": UPLINK}
    assert kernel.fw == {"10.128.0.5"}
    assert not d.plan() and applied == [1]
    assert stats.get("routes_added") == 2 and stats.get("firewall_elements_added") == 1
    assert ap.firewall_counters == {"refused_out_ipv4": 3}
    ap.close()
    assert kernel.routes == {}


def test_the_firewall_counters_are_read_at_start_then_only_when_a_scrape_finds_them_stale():
    """Rule 4: no timer reads them; a scrape (want_counters) does, at most once per interval."""
    kernel, d = FakeKernel(), desired()
    reads = []
    kernel.counters = lambda: reads.append(1) or {"refused_out_ipv4": len(reads)}
    ap = EffectApplier(d, Stats(), kernel)
    run_round(ap)  # start: the baseline
    run_round(ap)  # nothing asked: no nft
    assert reads == [1] and ap.firewall_counters == {"refused_out_ipv4": 1}
    ap.want_counters()  # a scrape right after the read: still fresh
    run_round(ap)
    assert reads == [1]
    ap._last_counters -= effects_mod.COUNTER_INTERVAL  # the last read is stale now
    ap.want_counters()
    assert ap._wake.is_set()  # the task is woken for it
    run_round(ap)
    assert reads == [1, 1] and ap.firewall_counters == {"refused_out_ipv4": 2}


def test_the_task_idles_without_rounds_and_ends_when_stopped():
    """Idle, no round runs until a wake; a stop ends the wait (no timer to notice it)."""
    kernel, d = FakeKernel(), desired()
    ap = EffectApplier(d, Stats(), kernel)
    rounds = []

    async def main():
        real = ap.round

        async def counted():
            rounds.append(1)
            await real()

        ap.round = counted
        stopping = asyncio.Event()
        task = asyncio.create_task(ap.run(stopping))
        for _ in range(20):  # the loop turns: nothing wakes the idle task
            await asyncio.sleep(0)
        idle_rounds = len(rounds)
        d.on_changes([Change("10.128.0.5", None, INTERNAL)])
        ap.wake()
        for _ in range(50):
            await asyncio.sleep(0)
            if kernel.routes:
                break
        stopping.set()
        await asyncio.wait_for(task, 5)  # ends without a wake
        return idle_rounds

    assert asyncio.run(main()) == 1  # the first round, then none until the wake
    assert kernel.routes == {"10.128.0.5": TUN} and len(rounds) == 2


def test_refusals_are_counted_and_retried_and_a_refused_transaction_resyncs():
    kernel, stats = FakeKernel(refuse_routes={"10.128.0.5"}, refuse_changes=1), Stats()
    d = desired()
    ap = EffectApplier(d, stats, kernel)
    d.on_changes([Change("10.128.0.5", None, INTERNAL), Change("10.128.0.6", None, INTERNAL)])
    run_round(ap)
    assert stats.get("effect_errors") == 2  # the route and the transaction
    assert kernel.routes == {"10.128.0.6": TUN} and kernel.fw == set()
    assert not d.routed("10.128.0.5")
    kernel.refuse_routes.clear()
    run_round(ap)  # the next round retries what is left
    assert kernel.routes == {"10.128.0.5": TUN, "10.128.0.6": TUN}
    assert kernel.fw == {"10.128.0.5", "10.128.0.6"} and not d.plan()
    # someone deleted an element behind our back: the delete is refused, the sets re-read
    kernel.fw.discard("10.128.0.6")
    d.on_changes([Change("10.128.0.6", INTERNAL, None), Change("10.128.0.5", INTERNAL, None)])
    run_round(ap)
    assert stats.get("effect_errors") == 3 and d.applied_elements == {"10.128.0.5"}
    run_round(ap)
    assert kernel.fw == set() and not d.plan()
