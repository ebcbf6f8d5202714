"""The patched origin-pod entry point in a pod-like namespace: it patches, or it is the original.

    [ epNNN ]  eth0 10.128.0.5/23 --veth-- peer0 (same namespace, just to carry the link)
               default via 10.128.0.1; /etc/netns/epNNN/resolv.conf -> 172.30.0.10

With NET_ADMIN, NET_RAW and a project key the entry point runs `tencrypt setup` and supervises
`tencrypt run`; SIGTERM stops the proxy and undoes the setup. Without NET_ADMIN (dropped with
capsh, as a runtime that does not grant it) or without a key it execs the original pod
binary (also without NET_RAW, which the proxy's raw socket needs; a stand-in that records its PID and arguments and sleeps until signalled).
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

ENTRYPOINT = Path(__file__).resolve().parents[2] / "scripts" / "origin-pod" / "entrypoint.py"
RESOLV = (
    "nameserver 172.30.0.10\nsearch shop.svc.cluster.local svc.cluster.local "
    "cluster.local\noptions ndots:5\n"
)
ORIGINAL = """#!/bin/sh
echo "$$ $*" > {mark}
trap 'exit 0' TERM INT
while :; do sleep 60 & wait $!; done
"""


@pytest.fixture
def pod():
    with standalone_pod("ep", "10.128.0.5/23", "10.128.0.1", RESOLV) as name:
        yield name


@pytest.fixture
def started():
    procs = []

    def start(ns, argv, env, log):
        proc = netns.spawn(ns, argv, log=log, env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def links(ns):
    return netns.run(ns, ["ip", "-o", "link", "show"]).stdout


def resolv(ns):
    return (Path("/etc/netns") / ns / "resolv.conf").read_text()


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        return None


def key_file(tmp_path):
    path = tmp_path / "PROJECT_PSK"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def test_with_net_admin_and_a_key_it_patches_the_pod_and_undoes_on_sigterm(pod, started, tmp_path):
    log = tmp_path / "entrypoint.log"
    env = {
        "TENCRYPT_PSK_FILE": str(key_file(tmp_path)),
        "TENCRYPT_ORIGINAL_ENTRYPOINT": str(tmp_path / "never-run"),
    }
    proc = started(pod, [sys.executable, str(ENTRYPOINT)], env, log)
    netns.wait_for(
        lambda: "tencrypt: ready" in log.read_text(),
        timeout=60,
        what="the proxy started by the entry point",
    )
    assert " tenc0:" in links(pod)
    assert "nameserver 127.0.0.1" in resolv(pod).splitlines()
    pids = netns.run(pod, ["ip", "netns", "identify", str(proc.pid)]).stdout.split()
    assert pod in pids  # the entry point itself lives in the pod's namespace
    proxy_pids = set(netns.sh(["ip", "netns", "pids", pod]).stdout.split()) - {str(proc.pid)}
    assert proxy_pids, "no proxy process in the pod namespace"
    assert proc.poll() is None
    # the proxy dies: the setup is undone (no Service traffic into a dead tenc0), redone,
    # and a new proxy started
    for pid in proxy_pids:
        os.kill(int(pid), signal.SIGKILL)
    netns.wait_for(
        lambda: log.read_text().count("tencrypt: ready") == 2,
        timeout=60,
        what="the proxy restarted",
    )
    assert "pod UNENCRYPTED until the restart" in log.read_text()
    assert " tenc0:" in links(pod) and "nameserver 127.0.0.1" in resolv(pod).splitlines()
    assert stop(proc) == 0
    assert " tenc0:" not in links(pod)
    assert resolv(pod) == RESOLV
    assert netns.sh(["ip", "netns", "pids", pod]).stdout.split() == []
    assert "stopping: undoing setup" in log.read_text()


@pytest.mark.parametrize("case", ["no NET_ADMIN", "no NET_RAW", "no key"])
def test_otherwise_it_becomes_the_original_pod_binary(pod, started, tmp_path, case):
    mark, log = tmp_path / "original.ran", tmp_path / "entrypoint.log"
    original = tmp_path / "pod"
    original.write_text(ORIGINAL.format(mark=mark))
    original.chmod(0o755)
    env = {
        "TENCRYPT_ORIGINAL_ENTRYPOINT": str(original),
        "TENCRYPT_PSK_FILE": str(tmp_path / "absent" if case == "no key" else key_file(tmp_path)),
    }
    argv = [sys.executable, str(ENTRYPOINT), "--some", "arg"]
    if case != "no key":  # capsh drops it from the bounding set: root exec's without it
        cap = case.split()[1].lower()
        argv = ["capsh", f"--drop=cap_{cap}", "--", "-c", 'exec "$0" "$@"', *argv]
    proc = started(pod, argv, env, log)
    netns.wait_for(mark.exists, timeout=30, what="the original pod binary to run")
    netns.wait_for(lambda: mark.read_text().endswith("\n"), what="its mark written")
    pid, *args = mark.read_text().split()
    assert int(pid) == proc.pid  # exec'ed, not spawned: it *is* the original now
    assert args == ["--some", "arg"]
    status = Path(f"/proc/{proc.pid}/status").read_text()
    cap_eff = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16
    )
    assert bool(cap_eff >> 12 & 1) == (case != "no NET_ADMIN")  # as arranged
    assert bool(cap_eff >> 13 & 1) == (case != "no NET_RAW")
    assert " tenc0:" not in links(pod) and resolv(pod) == RESOLV
    assert {
        "no NET_ADMIN": "no NET_ADMIN: not",
        "no NET_RAW": "no NET_RAW: not",
        "no key": "no project key",
    }[case] in log.read_text()
    assert proc.poll() is None  # it idles ...
    assert stop(proc) == 0  # ... until signalled, then exits cleanly


def test_with_a_read_only_resolv_conf_it_says_why_and_becomes_the_original(pod, started, tmp_path):
    """containerd and CRI-O mount resolv.conf read-only into the infrastructure container: the
    image cannot patch the pod there (the agent can, from the node); it must say so, touch
    nothing, and go on as the original pod binary."""
    mark, log = tmp_path / "original.ran", tmp_path / "entrypoint.log"
    original = tmp_path / "pod"
    original.write_text(ORIGINAL.format(mark=mark))
    original.chmod(0o755)
    env = {
        "TENCRYPT_ORIGINAL_ENTRYPOINT": str(original),
        "TENCRYPT_PSK_FILE": str(key_file(tmp_path)),
    }
    read_only = 'mount --bind -o ro /etc/resolv.conf /etc/resolv.conf && exec "$0" "$@"'
    proc = started(
        pod,
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            read_only,
            sys.executable,
            str(ENTRYPOINT),
        ],
        env,
        log,
    )
    netns.wait_for(mark.exists, timeout=60, what="the original pod binary to run")
    text = log.read_text()
    assert "/etc/resolv.conf is read-only here" in text and "--resolv-conf-of" in text
    assert "this pod stays UNENCRYPTED" in text
    assert " tenc0:" not in links(pod) and resolv(pod) == RESOLV
    assert proc.poll() is None and stop(proc) == 0
