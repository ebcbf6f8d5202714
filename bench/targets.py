"""The targets of issue 26 (with issue 16's that still apply: memory, soak, DNS; and, in a
dual-stack run, issue 24's IPv6 ones), judged on one run's figures: met, not met, or not
measured.

Rules:
- Every target is judged on figures of the same run and the same lab shape; a target whose
  figures are missing (the current wireguard-go not given with ``--peer-binary``, a shape or a
  client count not in the run, a measurement that failed, no ``--idle-json``) is *not
  measured*, never met.
- "The current wireguard-go" is the first ``--peer-binary wireguard-go=PATH`` system of the run
  (``Run.peer_labels``), named by its ``--version``: every comparison of issue 26 is with it.
- Each verdict's text carries the figures and their ratio: for a comparison Tencrypt's figure
  over the other's, for an absolute bound the figure over the bound.
- Pure: a ``Run`` in, ``Verdict``s out.

Issue 26's, per lab shape (one node; two nodes over VXLAN), against the current wireguard-go:
 1. single-stream TCP and TCP at 10 clients: Tencrypt ≥ 1.5 × its throughput. With rounds
    (bench/plan.py ``--rounds``: the systems alternating, tests ``tcp_round_R``), the main
    pass and every round in which both were measured: the median throughput of each over
    the rounds, compared; the text gives every round's figures;
 2. CPU per Gbit/s of both proxies at the same two client counts: ≤ 0.5 × its (both ends).
    With rounds, as rule 1: the median over the main pass and every round of each one's
    figure (the rounds' TCP runs count their tunnel's CPU too), compared;
 3. UDP offered at 1 Gbit/s: Tencrypt's loss ≤ its (a run offering another rate: not measured);
 4. added latency over vanilla, medians: the sparse request/response (one 1-byte TCP request
    every 20 ms), ping, and the back-to-back request/response: Tencrypt's ≤ what it adds.
    With rounds (bench/plan.py ``--rounds``: the systems alternating, tests
    ``sparse_rr_round_R`` / ``ping_round_R``), the sparse and ping targets take the main pass as
    round 0 and every round in which vanilla, Tencrypt and the peer were all measured: per
    round the added latency of each over that round's vanilla, then the median over the
    rounds of each, compared; the text gives every round's figures;
 5. the proxy's RSS when ready, before any traffic, ≤ 35 MB (issue 16's bound, kept);
issue 16's that still apply, per lab shape:
 6. the proxy's VmHWM after the 20-client TCP run ≤ 60 MB (largest of the two proxies);
 7. DNS: the median lookup of a cached name through the proxy ≤ the median straight to the
    cluster DNS, both measured in the Tencrypt stage by one probe that asks them in turns;
 8. (first shape of a full run) the proxy's RSS flat over the soak;
issue 26's idle proxies on one node (bench/idle.py's row, ``--idle-json``; bench/idlerow.py):
 9. per proxy (median): private (unshared) memory ≤ 10 MB, RSS ≤ 35 MB;
10. idle CPU zero: no proxy (nor their warm parent) above one clock tick over the idle window
    (``/proc`` counts CPU in 10 ms ticks, each to whoever was on CPU at the timer interrupt: one
    tick may land on a proxy that did nothing else; over a 30 s window it is 0.033 % of a
    core). A proxy that wakes on a timer (every second, say) takes more ticks than that: a
    hundred such proxies are a visible share of a node's CPU, so that is not zero.

Issue 24's, per lab shape, only in a dual-stack run (``Run.dual``; an IPv4 run's report is as it
was), on the TCP runs over IPv6 that follow each system's IPv4 ones:
11. single-stream TCP and TCP at 10 clients over IPv6: Tencrypt's ≥ 0.9 × its IPv4 figure of the
    same run ("within 10 %"; faster over IPv6 is met too);
12. the same two over IPv6: Tencrypt ≥ 1.5 × the current wireguard-go over IPv6 (inner IPv6 in
    both tunnels, the outer IPv4 in both).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench import idlerow
from bench.report import TENCRYPT, VANILLA, WIREGUARD, Run, fmt, fmt_delta
from bench.report import shape_name as shape

MET, NOT_MET, NOT_MEASURED, REPORTED = "met", "not met", "not measured", "reported"
TCP_VS_CURRENT = 1.5  # × the current wireguard-go release
CPU_VS_CURRENT = 0.5  # × the current wireguard-go's cores per Gbit/s
UDP_RATE_GBPS = 1.0  # the rate the UDP loss target is set at
TCP_CLIENTS = (1, 10)
IDLE_RSS_MB = 35.0
PEAK_RSS_MB = 60.0
PEAK_CLIENTS = 20
FLAT_MB = 5.0  # "flat": the soak's last window may exceed its first by at most this (or 5 %)
SHAPES = (1, 2)
IPV6_VS_IPV4 = 0.9  # issue 24: Tencrypt's IPv6 TCP within 10 % of its IPv4 TCP
IDLE_PRIVATE_MB = 10.0  # per idle proxy
CLOCK_TICK_S = 0.01  # /proc/PID/stat's resolution (USER_HZ 100)
NO_IDLE = "no --idle-json (bench/idle.py's result) in this run"
NO_CURRENT = "no --peer-binary wireguard-go=PATH in this run"


@dataclass(slots=True, frozen=True)
class Verdict:
    status: str  # MET, NOT_MET, NOT_MEASURED, or REPORTED (a figure the issue asks for, no bound)
    text: str

    def line(self) -> str:
        mark = {
            MET: "met",
            NOT_MET: "**not met**",
            NOT_MEASURED: "*not measured*",
            REPORTED: "reported",
        }
        return f"- {mark[self.status]}: {self.text}"


def current_wireguard(run: Run) -> str | None:
    """The label of the current wireguard-go (the first --peer-binary of that system)."""
    return next((label for label, s in run.peer_labels.items() if s == WIREGUARD), None)


def _clients(n: int) -> str:
    return f"{n} client{'s' if n > 1 else ''}"


def _times(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _missing(run: Run, nodes: int, *systems: str) -> str:
    if not any(m.nodes == nodes for m in run.measurements):
        return "this lab shape is not in the run"
    return f"no figure for {' / '.join(systems)}"


def judge_tcp(
    run: Run, nodes: int, clients: int, peer: str | None, bound: float, family: int = 4
) -> Verdict:
    """Tencrypt's TCP throughput ≥ ``bound`` × ``peer``'s (None: the peer was not run), both
    over IP ``family``."""
    what = f"{shape(nodes)}, TCP{' over IPv6' if family == 6 else ''} {_clients(clients)}"
    if peer is None:
        return Verdict(NOT_MEASURED, f"{what} vs the current wireguard-go: {NO_CURRENT}")
    tenc = run.get(nodes, TENCRYPT, "tcp", clients, "throughput", family)
    other = run.get(nodes, peer, "tcp", clients, "throughput", family)
    name = "the Debian wireguard-go" if peer == WIREGUARD else peer
    if tenc is None or not other:
        return Verdict(NOT_MEASURED, f"{what} vs {name}: {_missing(run, nodes, TENCRYPT, peer)}")
    how = ""
    if family == 4:  # rule 1: every round in which both were measured
        tenc, other, how = tcp_rounds(run, nodes, clients, "throughput", peer, (tenc, other))
        how = how and f" ({how} Gbit/s)"
    r = tenc / other
    return Verdict(
        MET if r >= bound else NOT_MET,
        f"{what}{how}: Tencrypt {fmt(tenc)} vs {name} {fmt(other)} Gbit/s = {_times(r)} "
        f"(target ≥ {bound:g}×)",
    )


def tcp_rounds(
    run: Run, nodes: int, clients: int, metric: str, peer: str, main: tuple[float, float]
) -> tuple[float, float, str]:
    """Rules 1 and 2: Tencrypt's and ``peer``'s ``metric`` of the TCP runs at ``clients``, the
    main pass's (``main``) and every round's in which both were measured: their medians, and
    the text listing them ("" and ``main`` itself without rounds)."""
    rows = [main, *(p for p in run.rounds(nodes, "tcp", clients, metric, (TENCRYPT, peer)) if p[1])]
    if len(rows) == 1:
        return main[0], main[1], ""
    tenc, other = medians(rows)
    each = ", ".join(f"{fmt(t)} vs {fmt(o)}" for t, o in rows)
    return tenc, other, f"median of {len(rows)} rounds, the systems alternating: {each}"


def medians(rows: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """Column by column, the median over the rounds of each system's figure."""
    return tuple(statistics.median(column) for column in zip(*rows, strict=True))


def judge_family(run: Run, nodes: int, clients: int) -> Verdict:
    """Tencrypt's TCP throughput over IPv6 ≥ 0.9 × its IPv4 one, same run and shape."""
    what = f"{shape(nodes)}, TCP {_clients(clients)}, Tencrypt over IPv6 vs over IPv4"
    v6 = run.get(nodes, TENCRYPT, "tcp", clients, "throughput", 6)
    v4 = run.get(nodes, TENCRYPT, "tcp", clients, "throughput", 4)
    if v6 is None or not v4:
        missing = _missing(run, nodes, f"{TENCRYPT} over {'IPv4' if v6 is not None else 'IPv6'}")
        return Verdict(NOT_MEASURED, f"{what}: {missing}")
    r = v6 / v4
    return Verdict(
        MET if r >= IPV6_VS_IPV4 else NOT_MET,
        f"{what}: {fmt(v6)} vs {fmt(v4)} Gbit/s = {_times(r)} (target ≥ {IPV6_VS_IPV4:g}×: "
        "within 10 %)",
    )


def judge_ipv6(run: Run) -> list[Verdict]:
    """Issue 24's targets, for each lab shape (none in an IPv4 run)."""
    if not run.dual:
        return []
    current = current_wireguard(run)
    out: list[Verdict] = []
    for nodes in SHAPES:
        out += [judge_family(run, nodes, clients) for clients in TCP_CLIENTS]
        out += [
            judge_tcp(run, nodes, clients, current, TCP_VS_CURRENT, 6) for clients in TCP_CLIENTS
        ]
    return out


def judge_added(run: Run, nodes: int, test: str, peer: str | None) -> Verdict:
    """What Tencrypt adds to a latency median over vanilla ≤ what ``peer`` adds."""
    metric, unit, name = {
        "sparse_rr": ("p50_us", "µs", "added sparse request/response median"),
        "rr": ("p50_us", "µs", "added TCP request/response median"),
        "ping": ("p50_ms", "ms", "added ping median"),
    }[test]
    what = f"{shape(nodes)}, {name}"
    if peer is None:
        return Verdict(NOT_MEASURED, f"{what} vs the current wireguard-go: {NO_CURRENT}")
    plain = run.get(nodes, VANILLA, test, 1, metric)
    tenc = run.get(nodes, TENCRYPT, test, 1, metric)
    other = run.get(nodes, peer, test, 1, metric)
    if plain is None or tenc is None or other is None:
        missing = _missing(run, nodes, VANILLA, TENCRYPT, peer)
        return Verdict(NOT_MEASURED, f"{what} vs {peer}: {missing}")
    extra = run.rounds(nodes, test, 1, metric, (VANILLA, TENCRYPT, peer))  # rule 4
    rounds = [(tenc - plain, other - plain)] + [(t - p, o - p) for p, t, o in extra]
    if len(rounds) > 1:
        ours, theirs = medians(rounds)
        each = ", ".join(f"{fmt_delta(o)} vs {fmt_delta(t)}" for o, t in rounds)
        how = f"median of {len(rounds)} rounds, the systems alternating ({each} {unit})"
    else:
        (ours, theirs), how = rounds[0], f"{fmt(plain)} {unit}"
    r = ours / theirs if theirs > 0 else None
    return Verdict(
        MET if ours <= theirs else NOT_MET,
        f"{what} over vanilla ({how}): Tencrypt {fmt_delta(ours)} {unit} vs "
        f"{peer} {fmt_delta(theirs)} {unit} = {_times(r)} (target ≤ 1×: no more than it adds)",
    )


def judge_memory(run: Run, nodes: int) -> list[Verdict]:
    """The proxy's RSS when ready ≤ 35 MB; its VmHWM after the 20-client run ≤ 60 MB."""
    out = []
    ready = run.get(nodes, TENCRYPT, "memory", 0, "ready_mb")
    what = f"{shape(nodes)}, proxy RSS when ready, before any traffic"
    if ready is None:
        out.append(Verdict(NOT_MEASURED, f"{what}: {_missing(run, nodes, TENCRYPT)}"))
    else:
        out.append(_at_most(what, ready, IDLE_RSS_MB))
    peak = run.get(nodes, TENCRYPT, "tcp", PEAK_CLIENTS, "hwm_mb")
    what = f"{shape(nodes)}, proxy peak RSS (VmHWM) after the {PEAK_CLIENTS}-client TCP run"
    if peak is None:
        seen = [
            (m.clients, m.value)
            for m in run.measurements
            if (m.nodes, m.system, m.test, m.metric) == (nodes, TENCRYPT, "tcp", "hwm_mb")
        ]
        why = _missing(run, nodes, TENCRYPT) if not seen else f"no {PEAK_CLIENTS}-client run"
        if seen:
            n, mb = max(seen)
            why += f" (after the {n}-client run: {mb:.1f} MB)"
        out.append(Verdict(NOT_MEASURED, f"{what}: {why}"))
    else:
        out.append(_at_most(what, peak, PEAK_RSS_MB))
    return out


def _at_most(what: str, mb: float, bound: float) -> Verdict:
    """A memory figure against its bound."""
    return Verdict(
        MET if mb <= bound else NOT_MET,
        f"{what}: {mb:.1f} MB = {_times(mb / bound)} the target (≤ {bound:g} MB)",
    )


def judge_dns(run: Run, nodes: int) -> Verdict:
    """The median lookup through the proxy ≤ the median straight to the cluster DNS."""
    what = f"{shape(nodes)}, DNS median lookup of a cached name"
    proxy = run.get(nodes, TENCRYPT, "dns", 1, "p50_us")
    direct = run.get(nodes, TENCRYPT, "dns_direct", 1, "p50_us")
    if proxy is None or direct is None:
        return Verdict(NOT_MEASURED, f"{what}: {_missing(run, nodes, 'tencrypt DNS')}")
    return Verdict(
        MET if proxy <= direct else NOT_MET,
        f"{what}: through the proxy {fmt(proxy)} µs vs straight to the cluster DNS "
        f"{fmt(direct)} µs = {_times(proxy / direct if direct else None)} (target ≤ 1×)",
    )


def judge_cpu(run: Run, nodes: int, clients: int, peer: str | None) -> Verdict:
    """Cores per Gbit/s of both proxies ≤ 0.5 × ``peer``'s, at ``clients`` TCP clients."""
    what = f"{shape(nodes)}, CPU per Gbit/s, TCP {_clients(clients)} (both ends)"
    if peer is None:
        return Verdict(NOT_MEASURED, f"{what} vs the current wireguard-go: {NO_CURRENT}")
    metric = "cpu_per_gbps_both"
    tenc = run.get(nodes, TENCRYPT, "tcp", clients, metric)
    other = run.get(nodes, peer, "tcp", clients, metric)
    if tenc is None or not other:
        return Verdict(NOT_MEASURED, f"{what} vs {peer}: {_missing(run, nodes, TENCRYPT, peer)}")
    tenc, other, how = tcp_rounds(run, nodes, clients, metric, peer, (tenc, other))  # rule 2
    how = how and f" ({how})"
    r = tenc / other
    return Verdict(
        MET if r <= CPU_VS_CURRENT else NOT_MET,
        f"{what}{how}: Tencrypt {fmt(tenc)} vs {peer} {fmt(other)} cores per Gbit/s = "
        f"{_times(r)} (target ≤ {CPU_VS_CURRENT:g}×)",
    )


def judge_udp(run: Run, nodes: int, peer: str | None) -> Verdict:
    """Tencrypt's UDP loss at 1 Gbit/s offered ≤ ``peer``'s."""
    what = f"{shape(nodes)}, UDP loss at {UDP_RATE_GBPS:g} Gbit/s offered"
    if peer is None:
        return Verdict(NOT_MEASURED, f"{what} vs the current wireguard-go: {NO_CURRENT}")
    tenc = run.get(nodes, TENCRYPT, "udp", 1, "loss_pct")
    other = run.get(nodes, peer, "udp", 1, "loss_pct")
    if tenc is None or other is None:
        return Verdict(NOT_MEASURED, f"{what} vs {peer}: {_missing(run, nodes, TENCRYPT, peer)}")
    offered = run.get(nodes, TENCRYPT, "udp", 1, "offered")
    if offered is None or abs(offered - UDP_RATE_GBPS) > 1e-9:
        return Verdict(
            NOT_MEASURED,
            f"{what} vs {peer}: this run offered {fmt(offered)} Gbit/s (--udp-rate): Tencrypt "
            f"lost {fmt(tenc)} %, {peer} {fmt(other)} %",
        )
    return Verdict(
        MET if tenc <= other else NOT_MET,
        f"{what}: Tencrypt lost {fmt(tenc)} % vs {peer} {fmt(other)} % = "
        f"{_times(tenc / other if other else None)} (target ≤ 1×)",
    )


def judge_idle(run: Run) -> list[Verdict]:
    """The idle proxies' row: private memory and RSS per proxy, and their CPU."""
    got = idlerow.of(run)
    names = (
        "idle proxies, private (unshared) memory per proxy",
        "idle proxies, RSS per proxy",
        "idle proxies, CPU",
    )
    if got is None:
        return [Verdict(NOT_MEASURED, f"{name}: {NO_IDLE}") for name in names]
    n = int(got["proxies"])
    private = _at_most(f"{n} {names[0]} (median)", got["private_mb"], IDLE_PRIVATE_MB)
    if "paid_per_pod_mb" in got:
        private = Verdict(
            private.status,
            f"{private.text}; what the node pays per pod, a warm parent's shared out: "
            f"{got['paid_per_pod_mb']:.1f} MB",
        )
    rss = _at_most(f"{n} {names[1]} (median)", got["rss_mb"], IDLE_RSS_MB)
    cpu_max, window = got["cpu_pct_max"], got.get("seconds", 0.0)
    parent = got.get("parent_cpu_pct", 0.0)
    forked = f", their warm parent {parent:.3f} %" if got.get("parent_private_mb") else ""
    if window <= 0:
        return [private, rss, Verdict(NOT_MEASURED, f"{n} {names[2]}: no idle window")]
    bound = 100 * CLOCK_TICK_S / window  # one tick over the window (target 10)
    cpu = Verdict(
        MET if max(cpu_max, parent) <= bound + 1e-9 else NOT_MET,
        f"{n} {names[2]} over {window:.0f} s: the busiest proxy {cpu_max:.3f} % of one core "
        f"(all {n}: {got['total_cpu_pct']:.3f} %{forked}) = "
        f"{_times(max(cpu_max, parent) / bound)} the target (zero: ≤ {bound:.3g} % each)",
    )
    return [private, rss, cpu]


def judge_soak(run: Run, nodes: int) -> Verdict | None:
    first = run.get(nodes, TENCRYPT, "soak", 0, "first_mb")
    last = run.get(nodes, TENCRYPT, "soak", 0, "last_mb")
    secs = run.get(nodes, TENCRYPT, "soak", 0, "seconds")
    if first is None or last is None or secs is None:
        return None
    return Verdict(
        MET if last <= first + max(FLAT_MB, 0.05 * first) else NOT_MET,
        f"{shape(nodes)}, proxy RSS over a {secs:.0f} s soak: {first:.1f} -> {last:.1f} MB "
        f"(flat: growth ≤ {FLAT_MB:g} MB or 5 %)",
    )


def judge(run: Run) -> list[Verdict]:
    """Every target of issue 26 (and issue 16's kept), for each lab shape, then the idle
    proxies', in the order of the module's list."""
    current = current_wireguard(run)
    out: list[Verdict] = []
    for nodes in SHAPES:
        out += [judge_tcp(run, nodes, c, current, TCP_VS_CURRENT) for c in TCP_CLIENTS]
        out += [judge_cpu(run, nodes, c, current) for c in TCP_CLIENTS]
        out.append(judge_udp(run, nodes, current))
        out += [judge_added(run, nodes, test, current) for test in ("sparse_rr", "ping", "rr")]
        out += judge_memory(run, nodes)
        out.append(judge_dns(run, nodes))
        soak = judge_soak(run, nodes)
        if soak:
            out.append(soak)
    return out + judge_idle(run)


def _count(verdicts: list[Verdict], reported: bool | None = None) -> str:
    """``reported``: say how many figures have no bound (None: when there are any)."""
    counts = {
        s: sum(v.status == s for v in verdicts) for s in (MET, NOT_MET, NOT_MEASURED, REPORTED)
    }
    text = f"{counts[MET]} met, {counts[NOT_MET]} not met, {counts[NOT_MEASURED]} not measured"
    if reported is None:
        reported = counts[REPORTED] > 0
    return text + (f" ({counts[REPORTED]} figures reported without a bound)" if reported else "")


def render(run: Run) -> list[str]:
    """The markdown section: a count, then one line per target (and, in a dual-stack run, the
    same for issue 24's IPv6 targets)."""
    verdicts = judge(run)
    current = current_wireguard(run)
    against = f"`{current}`" if current else "not given (no --peer-binary wireguard-go=PATH)"
    lines = [
        "## Targets (issue 26, and issue 16's memory, soak and DNS)",
        "",
        f"{_count(verdicts)}. The current wireguard-go: {against}.",
        "",
        *(v.line() for v in verdicts),
        "",
    ]
    ipv6 = judge_ipv6(run)
    if ipv6:
        lines += [
            "## Targets over IPv6 (issue 24)",
            "",
            f"{_count(ipv6, reported=False)}. TCP over IPv6 between the same pods after each system's IPv4 runs: "
            "Tencrypt and vanilla to nginx2's IPv6 Service VIP, wireguard-go between inner "
            "IPv6 addresses of its tunnel; both tunnels' outer packets stay IPv4.",
            "",
            *(v.line() for v in ipv6),
            "",
        ]
    return lines
