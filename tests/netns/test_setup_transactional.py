"""`tencrypt setup` cannot half-apply, and `--undo` puts back what it replaced (issue 25).

    [ txNNN ]  eth0 10.128.0.5/23 --veth-- peer0 (same namespace, just to carry the link)
               default via 10.128.0.1; resolv.conf -> 172.30.0.10 (CoreDNS's Service IP)

- A refused input (a Service CIDR over the pod's own subnet, an MTU out of bounds, ...) changes
  nothing: links, routes of every table, rules, the nftables ruleset, resolv.conf and the state
  directory are as before, also in a namespace that is set up already.
- A step that fails for real half-way (nft refusing a leftover table's set of another type;
  resolv.conf on a full file system) is rolled back: the namespace is as before, and no
  setup.json claims a setup.
- Routes that setup replaces (an SDN's own Service CIDR route, a /32 to the DNS server) and a
  rule that was there before come back with `--undo`, exactly.
The state directory is pytest's; every namespace and mount is removed afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tencrypt.linux import netns
from tests.netns.conftest import standalone_pod
from tests.netns.test_setup import snapshot as ip_snapshot

TENCRYPT = str(Path(sys.executable).parent / "tencrypt")
RESOLV = "nameserver 172.30.0.10\nsearch shop.svc.cluster.local svc.cluster.local\n"


@pytest.fixture
def pod():
    with standalone_pod("tx", "10.128.0.5/23", "10.128.0.1", RESOLV) as name:
        yield name


def snapshot(ns: str) -> dict[str, str]:
    return {**ip_snapshot(ns), "nft": netns.run(ns, ["nft", "list", "ruleset"]).stdout}


def tencrypt(ns: str, state: Path, *args: str, check: bool = True):
    return netns.run(ns, [TENCRYPT, *args, "--state-dir", str(state)], check=check)


REFUSED = [
    (("--service-cidr", "10.128.0.0/23"), "--service-cidr 10.128.0.0/23 overlaps eth0's subnet"),
    (("--service-cidr", "10.128.0.0/24"), "--service-cidr 10.128.0.0/24 overlaps eth0's subnet"),
    (("--service-cidr", "0.0.0.0/0"), "--service-cidr 0.0.0.0/0 overlaps 0.0.0.0/8"),
    (("--service-cidr", "172.30.0.1/16"), "--service-cidr '172.30.0.1/16': not a network"),
    (("--pod-cidr", "172.30.0.0/14"), "--service-cidr 172.30.0.0/16 overlaps the pod network"),
    (("--gateway", "172.30.0.1"), "--service-cidr 172.30.0.0/16 contains the gateway"),
    (("--dns", "127.0.0.1"), "--dns 127.0.0.1: a loopback"),
    (("--pod-ip", "10.128.0.300"), "--pod-ip '10.128.0.300': not an IPv4 address"),
    (("--mtu", "50"), "--mtu 50: tenc0's MTU must be from 576"),
    (("--mtu", "1441"), "--mtu 1441: tenc0's MTU must be from 576 (the datagram every IPv4"),
]


def assert_refused(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_every_refusal_leaves_the_namespace_untouched(pod, tmp_path):
    state = tmp_path / "state"
    before = snapshot(pod)
    for flags, expected in REFUSED:
        assert_refused(tencrypt(pod, state, "setup", *flags, check=False), expected)
        assert snapshot(pod) == before, flags
        assert not any(state.glob("netns-*")), flags

    # a namespace set up already: a refused setup leaves that setup and its state as they were
    tencrypt(pod, state, "setup")
    done = snapshot(pod)
    (recorded,) = state.glob("netns-*/setup.json")
    text = recorded.read_text()
    for flags, expected in REFUSED:
        assert_refused(tencrypt(pod, state, "setup", *flags, check=False), expected)
        assert snapshot(pod) == done, flags
        assert recorded.read_text() == text, flags
    assert "namespace restored" in tencrypt(pod, state, "setup", "--undo").stdout
    assert snapshot(pod) == before


def test_a_firewall_step_that_fails_midway_is_rolled_back(pod, tmp_path):
    """A leftover table whose set ``project4`` holds IPv6 addresses: nft refuses the rules
    (tenc0, the routes and the rules are in place by then) and the table stays as it was."""
    state = tmp_path / "state"
    netns.run(
        pod, ["nft", "add table inet tencrypt; add set inet tencrypt project4 { type ipv6_addr; }"]
    )
    before = snapshot(pod)
    proc = tencrypt(pod, state, "setup", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "installing the firewall table inet tencrypt failed: " in line
    assert "datatype mismatch" in line
    assert line.endswith("every change undone, the namespace is as it was")
    assert snapshot(pod) == before
    assert not any(state.glob("netns-*"))  # no setup.json claims a setup
    assert "nothing to undo" in tencrypt(pod, state, "setup", "--undo").stdout


@contextmanager
def full_file_system(directory: Path):
    """A tmpfs of one page at ``directory``, unmounted afterwards."""
    directory.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tencrypt-test", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_resolv_conf_that_cannot_be_rewritten_rolls_everything_back(pod, tmp_path):
    """The last step fails for real: resolv.conf fills its file system's one page, and its
    rewrite (a line longer) needs a second one. Every earlier step is undone, and the file's
    own half-written first page is put back too."""
    state = tmp_path / "state"
    before = snapshot(pod)
    with full_file_system(tmp_path / "etc") as etc:
        resolv = etc / "resolv.conf"
        original = RESOLV + "".join(
            f"# padding line {i:04d} of a long resolv.conf\n" for i in range(95)
        )
        assert 3900 < len(original) <= 4096
        resolv.write_text(original)
        proc = tencrypt(pod, state, "setup", "--resolv-conf", str(resolv), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert f"rewriting {resolv} failed: No space left on device; every change undone" in line
        assert resolv.read_text() == original
        assert snapshot(pod) == before
        assert not any(state.glob("netns-*"))  # no setup.json claims a setup


def test_undo_puts_back_the_routes_and_rule_setup_found(pod, tmp_path):
    """An SDN that routes the Service CIDR by eth0 itself (openshift-sdn did), a /32 to the
    DNS server, a rule of the proxy's mark that someone else added: setup replaces the routes
    (and keeps the rule); `--undo` after two setups (the second changes nothing recorded) puts
    all of it back exactly."""
    state = tmp_path / "state"
    for cmd in (
        ["ip", "route", "add", "172.30.0.0/16", "dev", "eth0"],
        [
            "ip",
            "route",
            "add",
            "172.30.0.10",
            "via",
            "10.128.0.1",
            "dev",
            "eth0",
            "proto",
            "static",
        ],
        ["ip", "route", "add", "172.30.0.10", "via", "10.128.0.1", "dev", "eth0", "metric", "50"],
        ["ip", "rule", "add", "fwmark", "0x1337", "lookup", "1337", "pref", "1000"],
    ):
        netns.run(pod, cmd)
    before = snapshot(pod)
    tencrypt(pod, state, "setup")
    routes = netns.run(pod, ["ip", "-4", "route"]).stdout
    assert "172.30.0.0/16 dev tenc0 proto 137 src 10.128.0.5" in routes
    assert "172.30.0.0/16 dev eth0" not in routes
    assert "172.30.0.10 via 10.128.0.1 dev eth0 proto 137 src 10.128.0.5" in routes
    assert "172.30.0.10 via 10.128.0.1 dev eth0 metric 50" in routes  # another metric: kept
    tencrypt(pod, state, "setup")
    assert "namespace restored" in tencrypt(pod, state, "setup", "--undo").stdout
    assert snapshot(pod) == before


def test_a_failed_setup_over_an_earlier_one_leaves_that_one_and_its_state(pod, tmp_path):
    """Set up, then a second setup with another Service CIDR fails at the firewall: the new
    route goes, the earlier setup's routes, rules and tenc0 stay, and so does its setup.json."""
    state = tmp_path / "state"
    before = snapshot(pod)
    tencrypt(pod, state, "setup")
    (recorded,) = state.glob("netns-*/setup.json")
    text = recorded.read_text()
    netns.run(pod, ["nft", "delete table inet tencrypt"])
    netns.run(
        pod, ["nft", "add table inet tencrypt; add set inet tencrypt project4 { type ipv6_addr; }"]
    )
    broken = snapshot(pod)
    proc = tencrypt(pod, state, "setup", "--service-cidr", "172.31.0.0/16", check=False)
    assert proc.returncode == 1 and "every change undone" in proc.stderr, proc.stderr
    assert snapshot(pod) == broken
    assert "172.31.0.0/16" not in broken["routes"]
    assert recorded.read_text() == text
    assert "namespace restored" in tencrypt(pod, state, "setup", "--undo").stdout
    assert snapshot(pod) == before
