"""Proxies forked by the zygote (tencrypt/linux/zygote.py) seal a lab pair's traffic and stop on
SIGTERM as exec'd ones do.

    lab l<suffix> (one node):  nginx1 --veth-- br0 --veth-- nginx2
                               each pod: `tencrypt setup` (as the launcher runs it), then its
                               proxy forked by one zygote into the pod's namespace

The lab's own ``patch`` is not used: its launcher would exec a proxy of its own. Here, as the
agent does with ``--fork-proxies``: the membership file is written, then the zygote forks a
child into the pod's namespace that runs the launcher with ``--setup-only`` (``tencrypt
setup`` with that file) and becomes ``tencrypt run`` with the arguments ``patch`` would give. Afterwards: SIGTERM to each
proxy's process group ends it with its own shutdown (its log says so), and the launcher's
``--undo`` restores the pod.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tencrypt.lab import proxy as labproxy
from tencrypt.linux import netns
from tencrypt.linux.zygote import Zygote
from tests.netns.conftest import curl, metrics

MARKER = "tencrypt-zygote-marker-51c2e0"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture
def forked(lab, tmp_path):
    """nginx1 and nginx2 with proxies forked by one zygote: {pod name: (pid, log)}."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    zygote = Zygote(env=env, log=tmp_path / "zygote.log")
    started: dict[str, tuple[int, Path]] = {}
    try:
        for name in ("nginx2", "nginx1"):
            pod = lab.pod(name)
            members = labproxy.write_members_file(lab, pod)
            log = tmp_path / f"{name}.log"
            argv = ["--psk-file", str(lab.psk_file(pod.project)), "--metrics", labproxy.METRICS]
            argv += ["--members-file", str(members)]
            setup = ["bash", str(labproxy.launcher()), "--netns", pod.netns, "--setup-only"]
            pid = zygote.spawn(
                f"/run/netns/{pod.netns}",
                argv,
                log,
                env=labproxy.launcher_env(("--members-file", str(members))),
                before=setup,
            )
            started[name] = (pid, log)
            netns.wait_for(
                lambda log=log: labproxy.READY in log.read_text(errors="replace"),
                timeout=60,
                what=f"the forked proxy in {name} ({log})",
            )
        yield started
    finally:
        zygote.close()
        for pid, _ in started.values():
            if running(pid):
                os.killpg(pid, signal.SIGKILL)
        for name in started:
            pod = lab.pod(name)
            labproxy._undo(pod, check=False)
            labproxy.members_file(lab, pod).unlink(missing_ok=True)


def test_forked_proxies_seal_a_request_and_stop_on_sigterm(lab, forked, capture):
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")
    for name, (pid, _) in forked.items():
        # the proxy runs in the pod's namespace, in a session of its own
        ns = lab.pod(name).netns
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "tencrypt-run"
    node = lab.nodes["node1"]
    with capture(node.netns, node.bridge, "not port 53") as cap:
        proc = curl(lab, "nginx1", "http://nginx2:8080/", MARKER)
    assert proc.returncode == 0 and "Hello from nginx2" in proc.stdout, proc.stderr
    pods = {n1.ip, n1.vip, n2.ip, n2.vip}
    talk = [f for f in cap.frames() if f.src in pods and f.dst in pods]
    assert talk and all(f.proto == 17 and 1337 in (f.sport, f.dport) for f in talk)
    assert MARKER.encode() not in cap.data and b"Hello from nginx2" not in cap.data
    m = metrics(lab, "nginx1")
    assert m["tencrypt_packets_sealed_total"] > 0 and m["tencrypt_packets_opened_total"] > 0

    for name, (pid, log) in forked.items():
        os.killpg(pid, signal.SIGTERM)
        netns.wait_for(
            lambda pid=pid: not running(pid), timeout=30, what=f"the proxy in {name} to stop"
        )
        text = log.read_text(errors="replace")
        assert "shutting down" in text and "stopped; counters" in text, text[-2000:]
        assert "tencrypt zygote: the proxy failed" not in text
