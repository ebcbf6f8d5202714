"""A peer tunnel the machine does not have (OpenVPN here): the bench says so, tries apt-get, and
when that fails measures the other systems without it; a system not asked for is never
installed. Also the bench's flags, declared in tencrypt/benchcmd.py.

No packages are installed: ``shutil.which`` and ``subprocess.run`` of bench/peers.py are fakes.
"""

from __future__ import annotations

import subprocess

import pytest

from bench import harness, peers, plan
from bench.progress import Progress
from bench.report import OPENVPN, TENCRYPT, VANILLA, WIREGUARD, Run
from tencrypt import benchcmd, cli

CURRENT = "wireguard-go v0.0.20250522"


def bench_plan(*argv: str) -> plan.Plan:
    return harness.build_plan(cli.parse_args(["bench", *argv]))


def with_binary(p: plan.Plan, label: str, system: str) -> plan.Plan:
    """``p`` as if ``--peer-binary system=…`` had been given (no binary is asked for its
    version here)."""
    p.binaries[label] = (system, f"/opt/{system}")
    at = p.systems.index(TENCRYPT) if TENCRYPT in p.systems else len(p.systems)
    p.systems.insert(at, label)
    return p


class FakeMachine:
    """The binaries on PATH, and every apt-get the bench runs (each one fails)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, have: set[str]) -> None:
        self.have, self.argvs = have, []
        monkeypatch.setattr(peers.shutil, "which", lambda b: f"/usr/bin/{b}" if b in have else None)
        monkeypatch.setattr(peers.subprocess, "run", self.run)

    def run(self, argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        self.argvs.append(argv)
        if argv[0] == "dpkg-query":
            return subprocess.CompletedProcess(argv, 0, "1.0", "")
        return subprocess.CompletedProcess(argv, 100, "", "E: Temporary failure resolving x\n")


def test_peer_tools_are_what_the_plan_measures_needs() -> None:
    p = bench_plan("--systems", "vanilla,wireguard-go,openvpn,tencrypt")
    assert plan.peer_tools(p) == {
        WIREGUARD: {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"},
        OPENVPN: {"openvpn": "openvpn"},
    }
    # a --peer-binary brings its daemon: its system needs only the tools
    p = with_binary(bench_plan("--systems", "vanilla,tencrypt"), CURRENT, WIREGUARD)
    assert plan.peer_tools(p) == {WIREGUARD: {"wg": "wireguard-tools"}}
    p = with_binary(bench_plan("--systems", "vanilla,tencrypt"), "openvpn 2.6.3", OPENVPN)
    assert plan.peer_tools(p) == {}  # OpenVPN has no tools beside its daemon
    assert plan.peer_tools(bench_plan("--systems", "vanilla,tencrypt")) == {}


def test_skip_system_takes_out_the_system_and_its_peer_binaries() -> None:
    p = with_binary(bench_plan(), "openvpn 2.6.3", OPENVPN)
    assert plan.skip_system(p, OPENVPN) == [OPENVPN, "openvpn 2.6.3"]
    assert OPENVPN not in p.systems and "openvpn 2.6.3" not in p.systems
    assert plan.skip_system(p, OPENVPN) == []
    assert p.systems == [VANILLA, WIREGUARD, TENCRYPT, "tencrypt-netpol"]


def test_openvpn_not_installed_is_said_skipped_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = FakeMachine(monkeypatch, {"wireguard-go", "wg"})
    p = with_binary(bench_plan("--quick"), CURRENT, WIREGUARD)
    run = Run(date="d", cores=2)
    harness._install(p, run, Progress([]))
    assert p.systems == [VANILLA, WIREGUARD, CURRENT, TENCRYPT, "tencrypt-netpol"]
    installs = [a for a in machine.argvs if a[0] == "apt-get" and "install" in a]
    assert installs == [
        ["apt-get", *peers.APT_NETWORK, "install", "-y", "-q", "--no-install-recommends", "openvpn"]
    ]  # once, nothing else asked for
    assert run.skipped == [
        "openvpn: not measured: openvpn is not installed on this machine (no `openvpn` on "
        "PATH) and apt-get could not install openvpn: apt-get install openvpn failed (100): "
        "E: Temporary failure resolving x"
    ]
    assert run.errors == []  # the bench did what it could: not a failed run
    err = capsys.readouterr().err
    assert "bench: openvpn is not installed on this machine (no `openvpn` on PATH)" in err
    assert "; the other systems go on without it" in err
    assert OPENVPN not in run.versions and run.versions[CURRENT].endswith("/wireguard-go)")
    md = harness.report.render_markdown(run)
    assert "## Systems not measured\n\n- openvpn: not measured: openvpn is not installed" in md


def test_systems_without_openvpn_never_ask_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = FakeMachine(monkeypatch, {"wireguard-go", "wg"})
    p = with_binary(
        bench_plan("--quick", "--systems", "vanilla,wireguard-go,tencrypt"), CURRENT, WIREGUARD
    )
    run = Run(date="d", cores=2)
    harness._install(p, run, Progress([]))
    assert [a for a in machine.argvs if a[0] == "apt-get"] == []
    assert p.systems == [VANILLA, WIREGUARD, CURRENT, TENCRYPT]
    assert (run.skipped, run.errors) == ([], [])
    assert run.versions[WIREGUARD] == "1.0"


def test_a_peer_binary_without_its_debian_tools_is_skipped_with_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeMachine(monkeypatch, set())  # neither wireguard-go nor wg
    p = with_binary(bench_plan("--quick", "--systems", "vanilla,tencrypt"), CURRENT, WIREGUARD)
    run = Run(date="d", cores=2)
    harness._install(p, run, Progress([]))
    assert p.systems == [VANILLA, TENCRYPT]
    assert run.skipped[0].startswith(
        f"{CURRENT}: not measured: wireguard-go's tools are not installed on this machine (no "
        "`wg` on PATH) and apt-get could not install wireguard-tools: apt-get install"
    )


# --- flags ---------------------------------------------------------------------------------


def test_the_bench_flags_are_declared_beside_their_handler() -> None:
    args = cli.parse_args(["bench"])
    assert (args.systems, args.clients, args.nodes) == (
        benchcmd.DEFAULT_SYSTEMS,
        plan.DEFAULT_CLIENTS,
        plan.DEFAULT_NODES,
    )
    assert (args.quick, args.peer_binary, args.idle_json, args.ip_family) == (
        False,
        [],
        None,
        "ipv4",
    )
    args = cli.parse_args(
        ["bench", "--quick", "--peer-binary", "wireguard-go=/x", "--idle-json", "/tmp/i.json"]
    )
    assert (args.quick, args.peer_binary, args.idle_json) == (
        True,
        ["wireguard-go=/x"],
        "/tmp/i.json",
    )
    assert args.handler == "tencrypt.benchcmd:main"


def test_the_default_systems_are_every_system_the_plan_knows() -> None:
    assert benchcmd.DEFAULT_SYSTEMS.split(",") and set(benchcmd.DEFAULT_SYSTEMS.split(",")) == set(
        plan.ORDER
    )
