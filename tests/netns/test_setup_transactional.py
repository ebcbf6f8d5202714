"""`tencrypt setup` refuses a bad input before it touches anything (issue 25).

    [ txNNN ]  eth0 10.128.0.5/23 --veth-- peer0 (same namespace, just to carry the link)
               default via 10.128.0.1; resolv.conf -> 172.30.0.10 (CoreDNS's Service IP)

- A refused input (a Service CIDR over the pod's own subnet, an MTU out of bounds, ...) changes
  nothing: links, routes of every table, rules, the nftables ruleset, resolv.conf and the state
  directory are as before, also in a namespace that is set up already.
The state directory is pytest's; every namespace is removed afterwards.
"""

from __future__ import annotations

import sys
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
