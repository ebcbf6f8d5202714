"""`tencrypt setup` in a real namespace: the designed state, idempotence, exact undo.

    [ tsNNN ]  eth0 172.17.0.5/16 --veth-- peer (same namespace, just to carry the link)
               default via 172.17.0.1; /etc/netns/tsNNN/resolv.conf -> 172.30.0.2
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tencrypt.linux import netns
from tests.netns.conftest import standalone_pod

TENCRYPT = str(Path(sys.executable).parent / "tencrypt")
RESOLV = "nameserver 172.30.0.2\nsearch myproject.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"


@pytest.fixture
def pod():
    with standalone_pod("ts", "172.17.0.5/16", "172.17.0.1", RESOLV, mtu=1450) as name:
        yield name


def snapshot(ns):
    return {
        # IPv4 only: setup touches nothing else, and IPv6 link-local routes appear on their own
        # time after a link comes up (DAD), which would make the snapshot race with the kernel
        "routes": netns.run(ns, ["ip", "-4", "route", "show", "table", "all"]).stdout,
        "rules": netns.run(ns, ["ip", "rule"]).stdout,
        "links": netns.run(ns, ["ip", "-d", "link", "show"]).stdout,
        "resolv": netns.run(ns, ["cat", "/etc/resolv.conf"]).stdout,
    }


def tencrypt(ns, *args, check=True):
    return netns.run(ns, [TENCRYPT, *args], check=check)


def test_setup_builds_the_designed_state_and_undo_restores_it_exactly(pod):
    before = snapshot(pod)
    tencrypt(pod, "setup")
    after = snapshot(pod)
    link = netns.run(pod, ["ip", "-d", "link", "show", "tenc0"]).stdout
    assert "mtu 1390" in link and "tun type tun" in link and "pi off" in link
    assert "172.30.0.0/16 dev tenc0 proto 137 src 172.17.0.5" in after["routes"]
    assert "172.30.0.2 via 172.17.0.1 dev eth0 proto 137 src 172.17.0.5" in after["routes"]
    assert "default via 172.17.0.1 dev eth0 table 1337 proto 137 src 172.17.0.5" in after["routes"]
    assert "172.17.0.0/16 dev eth0 table 1337 proto 137 scope link src 172.17.0.5" in after["routes"]
    assert "1000:\tfrom all fwmark 0x1337 lookup 1337" in after["rules"]
    lines = after["resolv"].splitlines()
    assert "nameserver 127.0.0.1" in lines and "nameserver 172.30.0.2" not in lines
    assert "search myproject.svc.cluster.local svc.cluster.local cluster.local" in lines
    assert "options ndots:5" in lines
    # the proxy's marked socket leaves by eth0, application traffic to a VIP by tenc0
    marked = netns.run(pod, ["ip", "route", "get", "172.30.0.12", "mark", "0x1337"]).stdout
    plain = netns.run(pod, ["ip", "route", "get", "172.30.0.12"]).stdout
    assert "dev eth0" in marked and "dev tenc0" in plain

    tencrypt(pod, "setup")  # idempotent: same state again
    assert snapshot(pod) == after

    tencrypt(pod, "setup", "--undo")
    assert snapshot(pod) == before
    assert "nothing to undo" in tencrypt(pod, "setup", "--undo").stdout


def test_undo_after_extra_runtime_routes_removes_them_too(pod):
    before = snapshot(pod)
    tencrypt(pod, "setup")
    netns.run(pod, [sys.executable, "-c",
                    "from tencrypt.linux import netlink as n;"
                    "n.ensure_route('172.17.0.9', dev='tenc0');"
                    "n.ensure_route('172.30.9.9', dev='eth0', gateway='172.17.0.1')"])
    assert "172.30.9.9 via 172.17.0.1" in netns.run(pod, ["ip", "route"]).stdout
    tencrypt(pod, "setup", "--undo")
    assert snapshot(pod) == before


def test_setup_refuses_clearly_without_a_search_domain(pod):
    (Path("/etc/netns") / pod / "resolv.conf").write_text("nameserver 172.30.0.2\n")
    proc = tencrypt(pod, "setup", check=False)
    assert proc.returncode == 2
    assert "no `search` line" in proc.stderr and "--domain" in proc.stderr
    assert "tenc0" not in netns.run(pod, ["ip", "link"]).stdout


def test_launcher_rejects_bad_targets_with_a_message():
    script = Path(__file__).resolve().parents[2] / "scripts" / "tencrypt-nsenter.sh"
    proc = subprocess.run(["bash", str(script), "--netns", "no-such-ns-xyz"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no network namespace named" in proc.stderr
    proc = subprocess.run(["bash", str(script), "notapid"], capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a PID" in proc.stderr
