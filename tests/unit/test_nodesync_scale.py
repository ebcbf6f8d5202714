"""node-sync at cluster scale, without root: the nft program of a cluster state, the diff of
two states into one transaction (exhaustively on small states, and with Hypothesis: applying
diff(A→B) to A's ruleset gives B's), the iptables backend's partial restores against a
model of ``iptables-restore --noflush``, metrics and ``--once --dry-run``."""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.stats import Stats
from tencrypt.kube.objects import EventType
from tencrypt.kube.reflector import Changed, Listed
from tencrypt.nodesync import nftrules, rules, watch
from tencrypt.nodesync.cluster import Kind, ServiceBackends
from tencrypt.nodesync.metrics import SyncMetrics
from tencrypt.nodesync.nftrules import EMPTY, Op, Verb, apply_ops, diff, program_of
from tests.unit.test_purity import FORBIDDEN, imported_roots

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "nodesync-cluster.json"

# -- the states: a few Services, VIPs and endpoints ----------------------------------------

NAMES = ("a", "b")
VIPS = ("172.30.0.1", "172.30.0.2")
ENDPOINTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
SUBSETS = [
    tuple(c) for n in range(len(ENDPOINTS) + 1) for c in itertools.combinations(ENDPOINTS, n)
]


def small_states():
    """Every state of two Services in one namespace: each absent, or on one VIP (never both
    on the same one, as the API server guarantees) with any subset of three endpoints."""
    choices = [None, *itertools.product(VIPS, SUBSETS)]
    for a, b in itertools.product(choices, repeat=2):
        if a and b and a[0] == b[0]:
            continue
        yield [
            ServiceBackends("shop", n, c[0], c[1]) for n, c in zip(NAMES, (a, b), strict=True) if c
        ]


STATES = list(small_states())


def test_the_exhaustive_state_space_is_what_it_claims():
    assert len(SUBSETS) == 8 and len(STATES) == 1 + 2 * 16 + 16 * 8  # 161 states


def test_diff_turns_every_small_state_into_every_other():
    """161 × 161 pairs: diff(A→B) applied to A's program is B's program, by the model that
    refuses what the kernel refuses; A→A is no transaction at all."""
    programs = [program_of(s) for s in STATES]
    for pa in programs:
        assert diff(pa, pa) == []
        for pb in programs:
            assert apply_ops(pa, diff(pa, pb)) == pb


SERVICES = st.dictionaries(
    st.tuples(st.sampled_from(["shop", "blog"]), st.sampled_from("abcdefgh")),
    st.tuples(st.integers(1, 12), st.lists(st.integers(1, 9), max_size=5, unique=True)),
    max_size=12,
)


def state_of(drawn) -> list[ServiceBackends]:
    seen, out = set(), []
    for (ns, name), (vip, eps) in sorted(drawn.items()):
        if vip in seen:
            continue
        seen.add(vip)
        out.append(
            ServiceBackends(ns, name, f"172.30.1.{vip}", tuple(f"10.1.0.{e}" for e in sorted(eps)))
        )
    return out


@settings(max_examples=400, deadline=None)
@given(SERVICES, SERVICES)
def test_any_diff_applied_to_a_gives_b(a, b):
    pa, pb = program_of(state_of(a)), program_of(state_of(b))
    ops = diff(pa, pb)
    assert apply_ops(pa, ops) == pb
    # only what differs is named: no command for an element or endpoint that stays
    named = {op.element for op in ops} | {op.slot for op in ops}
    assert not named & (
        {k for k in pa.elements if pb.elements.get(k) == pa.elements[k]}
        | {s for s in pa.endpoints if pb.endpoints.get(s) == pa.endpoints[s]}
    )


def test_the_model_refuses_a_table_left_half_done():
    p = program_of([ServiceBackends("shop", "a", "172.30.0.1", ("10.0.0.1", "10.0.0.2"))])
    for half in (
        [Op(Verb.DELETE_ENDPOINT, slot=("172.30.0.1", 1))],  # the VIP still says 2
        [Op(Verb.DELETE_ELEMENT, element=("172.30.0.1", "udp", 1337))],  # tcp left
        [Op(Verb.ADD_ENDPOINT, slot=("172.30.0.1", 2), address="10.0.0.3")],
    ):
        with pytest.raises(nftrules.ModelError):
            apply_ops(p, half)


def test_the_model_refuses_what_the_kernel_refuses():
    p = program_of([ServiceBackends("shop", "a", "172.30.0.1", ("10.0.0.1",))])
    assert p.picks == {1}
    for bad in (
        [Op(Verb.DELETE_CHAIN, n=1)],  # still the target of the VIP's elements
        [Op(Verb.ADD_CHAIN, n=1)],
        [Op(Verb.ADD_ENDPOINT, slot=("172.30.0.1", 0), address="10.0.0.2")],
        [Op(Verb.DELETE_ENDPOINT, slot=("172.30.0.1", 1))],
        [Op(Verb.DELETE_ELEMENT, element=("172.30.0.9", "udp", 1337))],
        [Op(Verb.ADD_ELEMENT, element=("172.30.0.9", "udp", 1337), n=2)],
    ):
        with pytest.raises(nftrules.ModelError):
            apply_ops(p, bad)


def test_one_endpoint_change_is_a_few_lines_whatever_the_cluster_size():
    big = [
        ServiceBackends(
            "shop",
            f"s{i}",
            f"172.30.{i // 250}.{i % 250 + 1}",
            (f"10.128.{i // 250}.{i % 250 + 1}", f"10.129.{i // 250}.{i % 250 + 1}"),
        )
        for i in range(5000)
    ]
    moved = list(big)
    moved[1234] = ServiceBackends("shop", "s1234", big[1234].vip, ("10.130.0.1",))
    text = nftrules.render(diff(program_of(big), program_of(moved)))
    vip = big[1234].vip
    assert text == (
        f"delete element inet tencrypt vips4 {{ {vip} . udp . 1337, {vip} . tcp . 1337 }}\n"
        f"delete element inet tencrypt endpoints4 {{ {vip} . 0, {vip} . 1 }}\n"
        "add chain inet tencrypt pick-1\n"  # the first Service with one endpoint
        "add rule inet tencrypt pick-1 dnat ip to ip daddr . numgen random mod 1 map "
        "@endpoints4\n"
        f"add element inet tencrypt endpoints4 {{ {vip} . 0 : 10.130.0.1 }}\n"
        f"add element inet tencrypt vips4 {{ {vip} . udp . 1337 : goto pick-1, "
        f"{vip} . tcp . 1337 : goto pick-1 }}\n"
    )
    same_count = list(big)
    same_count[7] = ServiceBackends("shop", "s7", big[7].vip, (big[7].endpoints[0], "10.9.9.9"))
    assert nftrules.render(diff(program_of(big), program_of(same_count))) == (
        f"delete element inet tencrypt endpoints4 {{ {big[7].vip} . 1 }}\n"
        f"add element inet tencrypt endpoints4 {{ {big[7].vip} . 1 : 10.9.9.9 }}\n"
    )


def test_rules_balance_as_kube_proxy_does_and_keep_the_port():
    assert nftrules.pick_rule(3) == (
        "dnat ip to ip daddr . numgen random mod 3 map @endpoints4"
    )  # index < 3: 1/3 each


def test_full_text_is_one_table_of_its_own_hooked_before_kube_proxy_and_parses_back():
    state = [
        ServiceBackends("shop", "web", "172.30.0.9", ("10.0.0.1", "10.0.0.2")),
        ServiceBackends("shop", "db", "172.30.0.10", ("10.0.0.4",)),
        ServiceBackends("shop", "idle", "172.30.0.11", ()),
    ]
    program = program_of(state, port=4242)
    text = nftrules.full_text(program)
    assert text.startswith("add table inet tencrypt\ndelete table inet tencrypt\n")
    assert "priority -110;" in text and "nat" in text and "KUBE" not in text
    assert "172.30.0.11" not in text  # no endpoints: no element
    assert nftrules.parse_listing(text) == program
    assert nftrules.pairs(program) == {
        ("172.30.0.9", "10.0.0.1"),
        ("172.30.0.9", "10.0.0.2"),
        ("172.30.0.10", "10.0.0.4"),
    }
    assert nftrules.full_text(program) == text  # byte-identical for the same state


def test_nft_accepts_the_texts_where_it_can_be_asked():
    """``nft -c`` (check only, nothing committed) on a full table and on a diff's commands
    added to it, where nft runs (root)."""
    a = program_of([ServiceBackends("shop", "web", "172.30.0.9", ("10.0.0.1", "10.0.0.2"))])
    b = program_of(
        [
            ServiceBackends("shop", "web", "172.30.0.9", ("10.0.0.3",)),
            ServiceBackends("shop", "db", "172.30.0.10", ("10.0.0.4",)),
        ]
    )
    text = nftrules.full_text(a) + nftrules.render(diff(a, b))
    try:
        proc = subprocess.run(
            ["nft", "-c", "-f", "-"], input=text, text=True, capture_output=True, timeout=30
        )
    except FileNotFoundError:
        pytest.skip("no nft here")
    if "Operation not permitted" in proc.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN")
    assert proc.returncode == 0, proc.stderr


# -- the iptables backend's partial restores, against a model of iptables-restore ---------


def restore(chains: dict[str, list[str]], text: str) -> dict[str, list[str]]:
    """``iptables-restore --noflush`` of ``text`` on the nat chains ``chains`` (a model:
    declaring a chain creates or flushes it; -A appends, -I inserts, -X deletes an empty,
    unreferenced chain)."""
    chains = {k: list(v) for k, v in chains.items()}
    for line in text.splitlines():
        if line.startswith(":"):
            chains[line[1:].split()[0]] = []
        elif line.startswith(("-A ", "-I ")):
            chain, rest = line[3:].split(" ", 1)
            target = rest.rsplit("-j ", 1)[1].split()[0]
            assert target in chains or target == "DNAT", f"jump to a missing chain: {line}"
            chains.setdefault(chain, [])
            if line.startswith("-A "):
                chains[chain].append(rest)
            else:
                chains[chain].insert(0, rest.split(" ", 1)[1])
        elif line.startswith("-X "):
            name = line[3:]
            assert not chains[name], f"{name} is not empty"
            assert not any(r.endswith(f"-j {name}") for rs in chains.values() for r in rs)
            del chains[name]
    return chains


def owned(chains):
    return {k: v for k, v in chains.items() if rules.is_owned(k)}


def full(state, existing=None):
    base = existing or {"PREROUTING": [], "OUTPUT": []}
    return restore(base, rules.build_restore(state, ""))


@settings(max_examples=300, deadline=None)
@given(SERVICES, SERVICES)
def test_iptables_partial_restore_gives_what_a_full_one_gives(a, b):
    sa, sb = state_of(a), state_of(b)
    after = restore(full(sa), rules.build_partial(sa, sb))
    assert owned(after) == owned(full(sb))
    text = rules.build_partial(sa, sb)
    if text:  # only the dispatch and the chains of changed VIPs are named
        named = {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}
        before = {(s.namespace, s.name, s.vip): s.endpoints for s in sa}
        unchanged = [s for s in sb if before.get((s.namespace, s.name, s.vip)) == s.endpoints]
        assert not named & {
            rules.chain_name(rules.SVC_PREFIX, s.namespace, s.name, s.vip) for s in unchanged
        }
    assert (text == "") == (
        {(s.namespace, s.name, s.vip): s.endpoints for s in sa}
        == {(s.namespace, s.name, s.vip): s.endpoints for s in sb}
    )


def test_iptables_partial_restore_exhaustively_on_small_states():
    fulls = [full(s) for s in STATES]
    for sa, fa in zip(STATES[::4], fulls[::4], strict=True):
        for sb, fb in zip(STATES, fulls, strict=True):
            assert owned(restore(fa, rules.build_partial(sa, sb))) == owned(fb)


# -- the syncer: full, then partial; metrics --------------------------------------------------


class Recorder:
    name = "recording"

    def __init__(self):
        self.calls = []

    def apply(self, backends, full=False, touched=None):
        self.calls.append(("full" if full else "partial", len(backends)))
        self.touched = touched

    @property
    def size(self):
        return 7


def fold_fixture(syncer: watch.Syncer) -> dict:
    """The fixture cluster listed into ``syncer``, kind by kind, as a watch's first list does;
    the fixture's document is returned."""
    doc = json.loads(FIXTURE.read_text())
    for kind in syncer.kinds:
        syncer.fold(Listed(kind, [o for o in doc["items"] if o["kind"] == kind.value]))
    return doc


def test_the_syncer_syncs_in_full_first_and_on_resync_partially_in_between():
    clock = iter(float(i) for i in range(100))
    applier = Recorder()
    syncer = watch.Syncer(
        applier,
        Stats(),
        (Kind.NAMESPACE, Kind.SERVICE, Kind.ENDPOINT_SLICE),
        clock=lambda: next(clock),
        wall=lambda: 1234.5,
    )
    doc = fold_fixture(syncer)
    assert syncer.sync()
    web = next(o for o in doc["items"] if o["kind"] == "Service" and o["metadata"]["name"] == "web")
    syncer.fold(Changed(Kind.SERVICE, EventType.DELETED, web))
    assert syncer.sync() and syncer.sync(force=True)
    assert applier.calls == [("full", 4), ("partial", 3), ("full", 3)]
    text = syncer.metrics.render()
    assert (
        'tencrypt_nodesync_sync_duration_seconds_count{backend="recording",mode="full"} 2' in text
    )
    assert 'mode="partial",le="1.0"} 1' in text
    assert 'tencrypt_nodesync_programmed_elements{backend="recording"} 7' in text
    assert "tencrypt_nodesync_last_success_timestamp_seconds 1234.5" in text


def test_metrics_count_failures_and_bucket_durations():
    m = SyncMetrics("nft")
    m.observe("partial", 0.003, 10, 1.0)
    m.observe("partial", 400.0, 10, 2.0)
    m.failed()
    text = m.render()
    assert 'mode="partial",le="0.001"} 0' in text and 'mode="partial",le="0.005"} 1' in text
    assert 'mode="partial",le="300.0"} 1' in text and 'mode="partial",le="+Inf"} 2' in text
    assert "tencrypt_nodesync_sync_failures_total 1" in text


def test_once_dry_run_prints_the_nft_transaction(capsys):
    from tencrypt.nodesync.cli import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert (
        main(
            parser.parse_args(
                ["--once", "--dry-run", "--backend", "nft", "--from-file", str(FIXTURE)]
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("add table inet tencrypt\n")
    assert nftrules.pairs(nftrules.parse_listing(out)) == {
        ("172.30.77.7", "10.128.0.12"),
        ("172.30.8.8", "10.128.0.17"),
        ("172.30.8.8", "10.128.0.18"),
        ("172.30.12.34", "10.128.0.11"),
        ("172.30.12.34", "10.128.0.12"),
    }


def test_pure_modules_do_no_io():
    from tencrypt.nodesync import metrics

    for module in (nftrules, metrics):
        assert not imported_roots(Path(module.__file__)) & FORBIDDEN, module.__name__


def test_empty_program_has_nothing():
    assert EMPTY.size == 0 and nftrules.pairs(EMPTY) == set()


def test_metrics_are_served_over_http_until_stopped():
    import threading
    import urllib.request

    from tencrypt.linux import probes

    m, stop = SyncMetrics("nft"), threading.Event()
    server = probes.serve("127.0.0.1:0", m.render, stop, {"/readyz": m.ready})
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert get("/readyz") == (503, "no sync has programmed the node yet\n")
        m.observe("full", 0.2, 42, 99.0)
        code, body = get("/metrics")
        assert code == 200
        assert 'tencrypt_nodesync_programmed_elements{backend="nft"} 42' in body
        assert get("/readyz") == (200, "ok\n")
        m.failed()  # the forwarding may now be stale: not ready until a sync succeeds
        assert get("/readyz")[0] == 503 and "last sync failed" in get("/readyz")[1]
        m.observe("partial", 0.01, 43, 100.0)
        assert get("/readyz") == (200, "ok\n")
        assert get("/nope")[0] == 404
    finally:
        stop.set()


def test_a_failed_sync_is_counted_and_the_next_one_is_full():
    class Flaky(Recorder):
        def apply(self, backends, full=False, touched=None):
            super().apply(backends, full, touched)
            if len(self.calls) == 2:
                raise RuntimeError("nft: Could not process rule")

    applier = Flaky()
    syncer = watch.Syncer(applier, Stats(), (Kind.NAMESPACE, Kind.SERVICE, Kind.ENDPOINT_SLICE))
    doc = fold_fixture(syncer)
    assert syncer.sync()
    web = next(o for o in doc["items"] if o["kind"] == "Service" and o["metadata"]["name"] == "web")
    syncer.fold(Changed(Kind.SERVICE, EventType.DELETED, web))
    with pytest.raises(RuntimeError):
        syncer.sync()
    assert syncer.sync()  # retried, in full: what the node holds is not known any more
    assert applier.calls == [("full", 4), ("partial", 3), ("full", 3)]
    assert "tencrypt_nodesync_sync_failures_total 1" in syncer.metrics.render()
