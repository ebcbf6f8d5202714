"""What one ``tencrypt bench`` invocation will measure, from its arguments: the ``Plan``, and
the nominal seconds of each step (for the progress line).

Rules:
- Systems run in a fixed order (``ORDER``): the peer tunnels between unpatched pods first, each
  ``--peer-binary`` after the Debian ones, Tencrypt last (it patches the pods), then Tencrypt
  with NetworkPolicies that isolate both pods both ways (``tencrypt-netpol``: the cost of
  per-flow policy enforcement, bench/attach.py ``bench_policies``).
- Every system's latency step: ping, back-to-back request/response, a new connection per
  request, then the sparse row (one 1-byte request every ``SPARSE_INTERVAL`` for
  ``sparse_seconds``).
- ``--quick``: one node, 1 and 10 clients, 3 s runs, fewer pings, shorter request/response,
  sparse and DNS measurements, no soak, results under ``quick.*`` so that a quick run never
  replaces the committed full run's ``latest.*``. Explicit ``--clients``/``--nodes`` still
  apply.
- ``--ip-family dual``: a dual-stack lab; each system with an IPv6 path (vanilla and Tencrypt:
  nginx2's IPv6 Service VIP; wireguard-go: inner IPv6 addresses on its tunnel; not OpenVPN) adds
  TCP over IPv6 at every client count after its IPv4 TCP runs. A full dual-stack run writes
  ``ipv6.*`` (never the IPv4 run's ``latest.*``), a quick one ``quick.*`` as ever. ``ipv4`` (the
  default) measures and writes what it did before families existed.
- Peer tunnels come from Debian packages (``peer_tools``: a Debian system needs its daemon and
  tools; a ``--peer-binary`` brings its daemon, and needs only the tools, e.g. ``wg``). A
  system whose package cannot be had (OpenVPN where it is not installed and apt-get cannot
  install it) is taken out of the plan with its ``--peer-binary`` labels (``skip_system``) and
  the run goes on without it; a system not in ``--systems`` is never installed or asked for.
- ``--rounds N`` (2 in a full run, 0 with ``--quick``): after a shape's main pass, N
  more rounds of the rows whose targets compare Tencrypt with the current wireguard-go —
  ping, the sparse row, and TCP with the tunnel's CPU at the targets' client counts
  (``ROUND_CLIENTS`` the plan has; not for vanilla, whose TCP no target reads) — for the
  systems those targets compare (``round_systems``: vanilla, the current wireguard-go,
  Tencrypt; no rounds without them), the systems alternating within each round, so that a
  drift of the machine's load between two systems' main passes does not decide those targets
  (bench/targets.py rules 1, 2 and 4).
- ``--idle-json PATH``: bench/idle.py's result, read at the end into the report (its row and
  targets); the file must exist when the bench starts, so that a long run does not end in a
  typo.
- Bad arguments are ``UsageError``s; nothing is downloaded or built (``--peer-binary`` names a
  binary that exists, asked only for its ``--version``).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bench import peers
from bench.report import OPENVPN, TENCRYPT, TENCRYPT_NETPOL, VANILLA, WIREGUARD
from tencrypt.benchcmd import DEFAULT_CLIENTS, DEFAULT_NODES
from tencrypt.errors import UsageError

ORDER = [VANILLA, WIREGUARD, OPENVPN, TENCRYPT, TENCRYPT_NETPOL]
DNS_SYSTEMS = (VANILLA, TENCRYPT)  # the peer tunnels leave the pods' DNS as it is
QUICK_DURATION, QUICK_CLIENTS = 3.0, [1, 10]
PING_INTERVAL = 0.05
SPARSE_INTERVAL = 0.02  # seconds between the sparse row's requests (issue 26's shape)
SPARSE_SECONDS, QUICK_SPARSE_SECONDS = 10.0, 3.0
ROUNDS = 2  # a full run's extra rounds of the rows judged against wireguard-go (--rounds)
ROUND_CLIENTS = (1, 10)  # TCP client counts the rounds repeat (bench/targets.py TCP_CLIENTS)
ATTACH_SECONDS = 4.0  # nominal, for the progress line
SOAK_RUNS = 6  # soak length in run durations
IP_FAMILIES = ("ipv4", "dual")  # --ip-family (an IPv6-only lab is not benchmarked yet)
IPV6_SYSTEMS = (VANILLA, WIREGUARD, TENCRYPT, TENCRYPT_NETPOL)  # with a path over inner IPv6


@dataclass(slots=True)
class Plan:
    systems: list[str]
    clients: list[int]
    nodes: list[int]
    duration: float
    udp_rate: str
    out: Path
    name: str
    quick: bool
    ping_count: int = 20
    rr_seconds: float = 3.0
    sparse_seconds: float = SPARSE_SECONDS
    dns_count: int = 2000  # lookups per DNS measurement, at most dns_seconds long
    dns_seconds: float = 5.0
    soak_seconds: float = 0.0
    # --peer-binary: label ("wireguard-go v0.0.20250522") -> (system, path of the binary)
    binaries: dict[str, tuple[str, str]] = field(default_factory=dict)
    ip_family: str = "ipv4"
    idle_json: Path | None = None  # bench/idle.py's result (--idle-json)
    rounds: int = 0  # extra rounds per shape (--rounds)

    def round_systems(self) -> list[str]:
        """The systems the rounds alternate: those the ping, sparse and TCP targets
        compare (vanilla, the current wireguard-go: the first ``--peer-binary
        wireguard-go``, and Tencrypt), in plan order; none without all three."""
        current = [s for s in self.systems if self.binaries.get(s, ("", ""))[0] == WIREGUARD]
        peer = current[:1]
        if VANILLA not in self.systems or TENCRYPT not in self.systems or not peer:
            return []
        return [s for s in self.systems if s in (VANILLA, TENCRYPT) or s in peer]

    @property
    def prefix(self) -> str:
        if self.quick:
            return "quick"
        return "ipv6" if self.dual else "latest"

    @property
    def dual(self) -> bool:
        return self.ip_family == "dual"

    def ipv6_runs(self, system: str) -> bool:
        """Whether ``system`` (a label of a --peer-binary too) adds TCP runs over IPv6."""
        return self.dual and self.binaries.get(system, (system, ""))[0] in IPV6_SYSTEMS


def _ints(text: str, what: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--{what}: expected comma-separated numbers, not {text!r}") from None
    if not values or values[0] < 1:
        raise UsageError(f"--{what}: expected positive numbers, not {text!r}")
    return values


def peer_binaries(specs: list[str]) -> dict[str, tuple[str, str]]:
    """``--peer-binary SYSTEM=PATH`` values as {label: (system, path)}; the label is the
    system and the binary's own ``--version``. Nothing is downloaded or built here."""
    out: dict[str, tuple[str, str]] = {}
    for spec in specs:
        system, sep, path = spec.partition("=")
        if not sep or system not in peers.BINARY_SYSTEMS or not path:
            raise UsageError(
                f"--peer-binary: SYSTEM=PATH with SYSTEM one of "
                f"{', '.join(peers.BINARY_SYSTEMS)}, not {spec!r}"
            )
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(f"--peer-binary: {path} is not an executable file")
        label = f"{system} {peers.binary_version(path) or os.path.basename(path)}"
        if label in out or label in ORDER:
            label = f"{label} ({path})"
        out[label] = (system, os.path.abspath(path))
    return out


def peer_tools(plan: Plan) -> dict[str, dict[str, str]]:
    """Per peer system the plan measures: the ``{binary: Debian package}`` it needs."""
    debian = [s for s in plan.systems if s in peers.TOOLS]
    needs = {s: dict(peers.TOOLS[s]) for s in debian}
    for system in sorted({system for system, _ in plan.binaries.values()} - set(debian)):
        # the --peer-binary is the daemon (named as its system); its tools still come from Debian
        needs[system] = {b: p for b, p in peers.TOOLS.get(system, {}).items() if b != system}
    return {s: tools for s, tools in needs.items() if tools}


def skip_system(plan: Plan, system: str) -> list[str]:
    """Take ``system`` (a Debian one) and its ``--peer-binary`` labels out of the plan; the
    names taken out, in plan order."""
    gone = [s for s in plan.systems if s == system or plan.binaries.get(s, ("", ""))[0] == system]
    plan.systems[:] = [s for s in plan.systems if s not in gone]
    return gone


def build_plan(args: argparse.Namespace) -> Plan:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(ORDER)
    if unknown or not systems:
        raise UsageError(f"--systems: unknown {sorted(unknown)} (choose from {', '.join(ORDER)})")
    nodes = _ints(args.nodes, "nodes")
    if set(nodes) - {1, 2}:
        raise UsageError("--nodes: 1, 2 or 1,2")
    if not args.duration > 0:
        raise UsageError("--duration must be positive")
    ip_family = getattr(args, "ip_family", None) or "ipv4"
    if ip_family not in IP_FAMILIES:
        raise UsageError(f"--ip-family: one of {', '.join(IP_FAMILIES)}, not {ip_family!r}")
    if not re.fullmatch(r"\d+(\.\d+)?[KMG]?", args.udp_rate):
        raise UsageError(
            f"--udp-rate: a rate as iperf3 takes it (e.g. 500M, 1G), not {args.udp_rate!r}"
        )
    rounds = getattr(args, "rounds", None)
    if rounds is not None and rounds < 0:
        raise UsageError(f"--rounds: 0 or more, not {rounds}")
    idle = getattr(args, "idle_json", None)
    if idle and not Path(idle).is_file():
        raise UsageError(f"--idle-json: {idle} is not a file (bench/idle.py writes it)")
    plan = Plan(
        systems=[s for s in ORDER if s in systems],
        clients=_ints(args.clients, "clients"),
        nodes=nodes,
        duration=args.duration,
        udp_rate=args.udp_rate,
        out=Path(args.out),
        name=args.name,
        quick=args.quick,
        binaries=peer_binaries(getattr(args, "peer_binary", None) or []),
        ip_family=ip_family,
        idle_json=Path(idle) if idle else None,
    )
    # each extra binary is one more system, measured after the Debian ones and before
    # Tencrypt (which patches the pods)
    ours = [plan.systems.index(s) for s in (TENCRYPT, TENCRYPT_NETPOL) if s in plan.systems]
    at = min(ours, default=len(plan.systems))
    plan.systems[at:at] = list(plan.binaries)
    if args.quick:
        plan.duration = min(plan.duration, QUICK_DURATION)
        plan.clients = QUICK_CLIENTS if args.clients == DEFAULT_CLIENTS else plan.clients
        plan.nodes = [1] if args.nodes == DEFAULT_NODES else plan.nodes
        plan.ping_count, plan.rr_seconds = 10, 1.0
        plan.sparse_seconds = QUICK_SPARSE_SECONDS
        plan.dns_count, plan.dns_seconds = 500, 2.0
    else:
        plan.soak_seconds = SOAK_RUNS * plan.duration
    default_rounds = 0 if args.quick else ROUNDS
    plan.rounds = default_rounds if rounds is None else rounds
    return plan


# --- progress ------------------------------------------------------------------------------


def system_steps(plan: Plan, system: str, first_shape: bool) -> list[float]:
    """Nominal seconds of each step of one system on one lab shape, in the order they run."""
    latency = plan.ping_count * PING_INTERVAL + 2 * plan.rr_seconds + plan.sparse_seconds + 2
    if system in DNS_SYSTEMS:
        paths = 2 if system == TENCRYPT else 1  # one probe, the paths in turns
        latency += min(plan.dns_seconds, paths * plan.dns_count / 5000)
    # attach (0-2 s seen on the 2-core VM, Tencrypt's patch the longest); then ping,
    # request/response (back to back, new connections, sparse), DNS
    steps = [ATTACH_SECONDS, latency]
    steps += [plan.duration + 2] * len(plan.clients)
    if plan.ipv6_runs(system):  # the same client counts over IPv6 (the first waits for a path)
        steps += [plan.duration + 2] * len(plan.clients)
    steps.append(plan.duration + 2)  # UDP
    if system == TENCRYPT and first_shape and plan.soak_seconds:
        steps.append(plan.soak_seconds + 2)
    return steps


def round_clients(plan: Plan) -> list[int]:
    """The TCP client counts a round repeats: the targets' that the plan runs."""
    return [c for c in ROUND_CLIENTS if c in plan.clients]


def round_steps(plan: Plan) -> list[float]:
    """Nominal seconds of one shape's rounds: per round and system, attach, ping, the sparse
    row and (not vanilla) TCP at ``round_clients``."""
    latency = ATTACH_SECONDS + plan.ping_count * PING_INTERVAL + plan.sparse_seconds + 2
    tcp = len(round_clients(plan)) * (plan.duration + 2)
    return [
        latency + (0 if system == VANILLA else tcp)
        for _ in range(plan.rounds)
        for system in plan.round_systems()
    ]


def estimates(plan: Plan) -> list[float]:
    return [
        seconds
        for index, _ in enumerate(plan.nodes)
        for seconds in [
            *(s for system in plan.systems for s in system_steps(plan, system, index == 0)),
            *round_steps(plan),
        ]
    ]
