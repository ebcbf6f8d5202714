"""`tencrypt setup` in a real namespace: the designed state, idempotence, exact undo.

[ tsNNN ]  eth0 172.17.0.5/16 --veth-- peer (same namespace, just to carry the link)
           default via 172.17.0.1; /etc/netns/tsNNN/resolv.conf -> 172.30.0.2
"""

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tencrypt.linux import netns
from tests.netns.conftest import standalone_pod

TENCRYPT = str(Path(sys.executable).parent / "tencrypt")
LAUNCHER = Path(__file__).resolve().parents[2] / "scripts" / "tencrypt-nsenter.sh"
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
    assert (
        "172.17.0.0/16 dev eth0 table 1337 proto 137 scope link src 172.17.0.5" in after["routes"]
    )
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
    netns.run(
        pod,
        [
            sys.executable,
            "-c",
            "from tencrypt.linux import netlink as n;"
            "n.ensure_route('172.17.0.9', dev='tenc0');"
            "n.ensure_route('172.30.9.9', dev='eth0', gateway='172.17.0.1')",
        ],
    )
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
    proc = subprocess.run(
        ["bash", str(script), "--netns", "no-such-ns-xyz"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no network namespace named" in proc.stderr
    proc = subprocess.run(["bash", str(script), "notapid"], capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a PID" in proc.stderr


def container(pod, source, *, read_only):
    """A process of ``pod`` in a mount namespace of its own where ``source`` (a node file) is
    bind-mounted over /etc/resolv.conf, as a container runtime does: read-only for the pause
    container of containerd and CRI-O, writable for application containers."""
    ro = ["-o", "ro"] if read_only else []
    script = f"mount --bind {' '.join(ro)} {source} /etc/resolv.conf && exec sleep 300"
    proc = netns.spawn(pod, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    mountinfo = Path(f"/proc/{proc.pid}/mountinfo")
    netns.wait_for(
        lambda: (
            " /etc/resolv.conf " in mountinfo.read_text()
            and os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep")
        ),
        what="the container's resolv.conf mount",
    )
    return proc


def test_launcher_rewrites_the_node_file_behind_a_read_only_resolv_conf(pod, tmp_path):
    """containerd: the pause container (the launcher's PID) sees resolv.conf read-only; the node
    file behind it is rewritten in place, so the application containers see the change."""
    source = tmp_path / "sandboxes" / "0f3c9a7e" / "resolv.conf"
    source.parent.mkdir(parents=True)
    source.write_text(RESOLV)
    procs = [container(pod, source, read_only=True), container(pod, source, read_only=False)]
    pause, app = procs
    key = tmp_path / "psk"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    log = tmp_path / "launcher.log"
    try:
        # what the launcher did before: the pause container's view cannot be written
        seen = f"/proc/{pause.pid}/root/etc/resolv.conf"
        proc = tencrypt(pod, "setup", "--resolv-conf", seen, check=False)
        assert (
            proc.returncode == 2
            and "read-only" in proc.stderr
            and "--resolv-conf-of" in proc.stderr
        )
        assert "tenc0" not in netns.run(pod, ["ip", "link"]).stdout

        env = {**os.environ, "TENCRYPT_BIN": TENCRYPT}
        with open(log, "wb") as out:
            launcher = subprocess.Popen(
                ["bash", str(LAUNCHER), str(pause.pid), "--", "--psk-file", str(key)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(launcher)
        netns.wait_for(
            lambda: "tencrypt: ready" in log.read_text(),
            timeout=60,
            what=f"the proxy started by the launcher ({log})",
        )
        assert "read-only bind mount" in log.read_text()
        for view in (source, Path(seen), Path(f"/proc/{app.pid}/root/etc/resolv.conf")):
            lines = view.read_text().splitlines()
            assert "nameserver 127.0.0.1" in lines and "nameserver 172.30.0.2" not in lines, view
        assert source.stat().st_ino == os.stat(seen).st_ino  # in place: the mounts still hold it

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
        undo = subprocess.run(
            ["bash", str(LAUNCHER), str(pause.pid), "--undo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert undo.returncode == 0, undo.stderr
        assert source.read_text() == RESOLV
        assert Path(f"/proc/{app.pid}/root/etc/resolv.conf").read_text() == RESOLV
        assert "tenc0" not in netns.run(pod, ["ip", "link"]).stdout
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def snapshot6(ns):
    """Setup's IPv6 side: its routes (protocol 137 in every table), its rules and the links."""
    return {
        "routes": netns.run(
            ns, ["ip", "-6", "route", "show", "table", "all", "proto", "137"]
        ).stdout,
        "rules": netns.run(ns, ["ip", "-6", "rule"]).stdout,
        "main": netns.run(ns, ["ip", "-6", "route", "show", "proto", "static"]).stdout,
    }


def test_dual_stack_setup_routes_the_ipv6_service_cidr_and_undo_restores_it(pod):
    """A dual-stack pod (a global IPv6 address and an IPv6 default route on eth0, as a
    dual-stack CNI gives it): setup routes the IPv6 Service CIDR into tenc0 from the pod's
    IPv6 address, gives the marked sockets an IPv6 way out of eth0, and --undo removes it all."""
    netns.run(pod, ["ip", "-6", "addr", "add", "fd00:17::5/64", "dev", "eth0", "nodad"])
    netns.run(pod, ["ip", "-6", "route", "add", "default", "via", "fd00:17::1", "dev", "eth0"])
    before, before6 = snapshot(pod), snapshot6(pod)
    out = tencrypt(pod, "setup", "--service-cidr", "172.30.0.0/16,fd00:30::/108").stdout
    assert "pod 172.17.0.5 fd00:17::5" in out and "172.30.0.0/16, fd00:30::/108 -> tenc0" in out
    after6 = snapshot6(pod)
    # (listed by protocol 137, which `ip` then leaves out of each line)
    assert "fd00:30::/108 dev tenc0 src fd00:17::5" in after6["routes"]
    assert "default via fd00:17::1 dev eth0 table 1337 src fd00:17::5" in after6["routes"]
    assert "fd00:17::/64 dev eth0 table 1337 src fd00:17::5" in after6["routes"]
    assert "1000:\tfrom all fwmark 0x1337 lookup 1337" in after6["rules"]
    assert "1000:\tfrom all fwmark 0x11337 lookup 1337" in after6["rules"]
    marked = netns.run(pod, ["ip", "-6", "route", "get", "fd00:30::12", "mark", "0x1337"]).stdout
    plain = netns.run(pod, ["ip", "-6", "route", "get", "fd00:30::12"]).stdout
    assert "dev eth0" in marked and "dev tenc0" in plain and "src fd00:17::5" in plain
    # ICMPv6 neighbour discovery with project addresses is untouched by the firewall
    table = netns.run(pod, ["nft", "list", "table", "inet", "tencrypt"]).stdout
    assert "nd-neighbor-solicit" in table

    tencrypt(pod, "setup", "--service-cidr", "172.30.0.0/16,fd00:30::/108")  # idempotent
    assert snapshot6(pod) == after6

    tencrypt(pod, "setup", "--undo")
    assert snapshot(pod) == before and snapshot6(pod) == before6


@pytest.mark.parametrize(
    ("cidrs", "words"),
    [
        ("172.30.0.0/16,fd00:17::/64", "overlaps eth0's subnet fd00:17::/64"),
        ("172.30.0.0/16,fe80::/64", "overlaps fe80::/10"),
        ("172.30.0.0/16,fd00:30::/108,fd00:31::/108", "at most one range per family"),
        ("fd00:30::/108,172.30.0.0/16,10.0.0.0/8", "at most one range per family"),
    ],
)
def test_dual_stack_setup_refuses_a_bad_ipv6_service_cidr_and_touches_nothing(pod, cidrs, words):
    netns.run(pod, ["ip", "-6", "addr", "add", "fd00:17::5/64", "dev", "eth0", "nodad"])
    before, before6 = snapshot(pod), snapshot6(pod)
    done = tencrypt(pod, "setup", "--service-cidr", cidrs, check=False)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert snapshot(pod) == before and snapshot6(pod) == before6


RESOLV6 = (
    "nameserver fd00:30::2\nsearch myproject.svc.cluster.local svc.cluster.local cluster.local\n"
    "options ndots:5\n"
)


@pytest.fixture
def pod6():
    """An IPv6-only pod: eth0 fd00:17::5/64 (no IPv4), default via the link-local fe80::1, its
    resolv.conf naming the cluster DNS at fd00:30::2."""
    with standalone_pod("ts6", "fd00:17::5/64", "fe80::1", RESOLV6, mtu=1450) as name:
        yield name


def test_ipv6_only_setup_is_all_ipv6_and_undo_restores_it_exactly(pod6):
    """An IPv6-only pod (eth0 has no IPv4 address): its IPv6 address, gateway and DNS server
    are the primary ones, tenc0 leaves room for an outer IPv6 header (1450 - 80), the IPv6
    Service CIDR must be known (no default is assumed), and --undo restores exactly."""
    before, before6 = snapshot(pod6), snapshot6(pod6)
    refused = tencrypt(pod6, "setup", check=False)  # no IPv6 Service CIDR anywhere
    assert refused.returncode == 2, refused.stderr
    assert "no IPv6 Service CIDR known" in refused.stderr and "Traceback" not in refused.stderr
    assert snapshot(pod6) == before and snapshot6(pod6) == before6

    out = tencrypt(pod6, "setup", "--service-cidr", "fd00:30::/108").stdout
    assert "pod fd00:17::5 on eth0 via fe80::1; tenc0 mtu 1370; fd00:30::/108 -> tenc0" in out
    assert "DNS fd00:30::2 -> eth0" in out
    after, after6 = snapshot(pod6), snapshot6(pod6)
    assert "mtu 1370" in netns.run(pod6, ["ip", "link", "show", "tenc0"]).stdout
    # (listed by protocol 137, which `ip` then leaves out of each line)
    assert "fd00:30::/108 dev tenc0 src fd00:17::5" in after6["routes"]
    assert "fd00:30::2 via fe80::1 dev eth0 src fd00:17::5" in after6["routes"]
    assert "default via fe80::1 dev eth0 table 1337 src fd00:17::5" in after6["routes"]
    assert "fd00:17::/64 dev eth0 table 1337 src fd00:17::5" in after6["routes"]
    assert "1000:\tfrom all fwmark 0x1337 lookup 1337" in after6["rules"]
    assert "1000:\tfrom all fwmark 0x11337 lookup 1337" in after6["rules"]
    # nothing IPv4: no route of ours, no IPv4 rule
    assert after["routes"] == before["routes"] and after["rules"] == before["rules"]
    marked = netns.run(pod6, ["ip", "-6", "route", "get", "fd00:30::12", "mark", "0x1337"]).stdout
    plain = netns.run(pod6, ["ip", "-6", "route", "get", "fd00:30::12"]).stdout
    dns = netns.run(pod6, ["ip", "-6", "route", "get", "fd00:30::2"]).stdout
    assert "dev eth0" in marked and "dev tenc0" in plain and "src fd00:17::5" in plain
    assert "dev eth0" in dns
    lines = after["resolv"].splitlines()
    assert "nameserver 127.0.0.1" in lines and "nameserver fd00:30::2" not in lines
    table = netns.run(pod6, ["nft", "list", "table", "inet", "tencrypt"]).stdout
    assert "nd-neighbor-solicit" in table and "udp dport 1337 accept" in table

    tencrypt(pod6, "setup", "--service-cidr", "fd00:30::/108")  # idempotent
    assert snapshot(pod6) == after and snapshot6(pod6) == after6

    tencrypt(pod6, "setup", "--undo")
    assert snapshot(pod6) == before and snapshot6(pod6) == before6
    assert "nothing to undo" in tencrypt(pod6, "setup", "--undo").stdout
