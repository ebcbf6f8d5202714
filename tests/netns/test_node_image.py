"""The DaemonSet's node image, built here from scripts/k8s/Dockerfile and run as the DaemonSet
runs it: privileged, in the host's PID and network namespaces.

    scripts/k8s/build-image.sh --debootstrap --offline   (podman; a local Debian 12 base,
        |                                                  wheels made on this machine)
    localhost/tencrypt/tencrypt:test
        |-- node-sync --once --from-file (a kubectl JSON list) --dry-run: the rules it would load
        '-- agent (podman run --privileged --pid=host --network=host, /run/tencrypt and the
            agent's state as host directories, as daemonset.yaml mounts them)
                |  the real client -> FakeApiServer on 127.0.0.1 (a test double)
                v
            tencrypt-nsenter.sh and tencrypt *of the image* in the lab pods nginx1, nginx2

The first build takes minutes (debootstrap, apt and pip inside the build); later ones reuse
podman's cached base and layers. The checks: the image's proxies seal the pods' traffic on
the bridge, and a stopped container (SIGTERM, as at a rollout) unpatches every pod.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tencrypt.lab.proxy import METRICS, proxies_in
from tencrypt.linux import netns
from tencrypt.nodesync import nftrules
from tests.kubefakes import builders as kubeobjects
from tests.kubefakes.fakeapi import FakeApiServer
from tests.netns.test_agent import (
    has_tenc0,
    kill_proxies,
    pod_objects,
    resolv_files,
    sealed_curl,
    wait_patched,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/tencrypt/tencrypt:test"
BUILD_TIMEOUT = 1800  # debootstrap and two package installs on a cold machine
# what podman needs here (hybrid cgroups, no systemd, rlimits it may not raise): see
# scripts/k8s/build-image.sh
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


@pytest.fixture(scope="module")
def node_image():
    if not shutil.which("podman") or not shutil.which("debootstrap"):
        pytest.skip("podman and debootstrap are needed (scripts/install.sh installs them)")
    build = subprocess.run(
        ["bash", str(REPO / "scripts/k8s/build-image.sh"), "--debootstrap", "--offline", IMAGE],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    assert build.stdout.strip().splitlines()[-1] == IMAGE
    return IMAGE


def test_node_image_node_sync_renders_the_rules_of_a_recorded_cluster(node_image, tmp_path):
    cluster = tmp_path / "cluster.json"
    cluster.write_text(
        json.dumps(
            kubeobjects.build_list(
                [
                    kubeobjects.build_namespace("shop"),
                    kubeobjects.build_service("shop", "web", "172.30.12.34"),
                    kubeobjects.build_endpoint_slice("shop", "web", ["10.128.0.5", "10.128.1.7"]),
                ]
            )
        )
    )

    def dry_run(*backend):
        proc = subprocess.run(
            [
                *PODMAN,
                "run",
                "--rm",
                *LIMITS,
                "-v",
                f"{cluster}:/cluster.json:ro",
                node_image,
                "node-sync",
                "--once",
                "--from-file",
                "/cluster.json",
                "--dry-run",
                *backend,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    # the default (auto): the image ships nft, so the nft transaction
    program = nftrules.parse_listing(dry_run())
    assert nftrules.pairs(program) == {
        ("172.30.12.34", "10.128.0.5"),
        ("172.30.12.34", "10.128.1.7"),
    }
    out = dry_run("--backend", "iptables")
    dnat = sorted(line.split()[-1] for line in out.splitlines() if "DNAT" in line)
    assert dnat == ["10.128.0.5:1337"] * 2 + ["10.128.1.7:1337"] * 2  # udp and tcp each
    assert "-d 172.30.12.34/32 -p udp -m udp --dport 1337" in out


def test_node_image_agent_patches_and_seals_the_lab_pods_and_unpatches_on_stop(
    node_image, lab, capture, tmp_path
):
    api = FakeApiServer(pod_objects(lab))
    api.start()
    name = f"tencrypt-agent-{netns.unique_suffix()}"
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    setup_state, agent_state = tmp_path / "run-tencrypt", tmp_path / "agent-state"
    setup_state.mkdir()
    agent_state.mkdir(mode=0o700)  # hostPath DirectoryOrCreate in daemonset.yaml
    resolv = resolv_files(lab)
    run = [
        *PODMAN,
        "run",
        "-d",
        "--name",
        name,
        *LIMITS,
        "--privileged",
        "--pid=host",
        "--network=host",
        "-v",
        f"{kubeconfig}:/kubeconfig:ro",
        "-v",
        f"{setup_state}:/run/tencrypt",
        "-v",
        f"{agent_state}:/run/tencrypt-agent",
        node_image,
        "agent",
        "--node",
        "node1",
        "--kubeconfig",
        "/kubeconfig",
        "--sandbox",
        "annotation",
        "--state-dir",
        "/run/tencrypt-agent",
        "--proxy-metrics",
        METRICS,
        "--on-exit",
        "unpatch",
        "--log-level",
        "debug",
    ]

    class Logs:
        def text(self):
            logs = subprocess.run(
                [*PODMAN, "logs", name], capture_output=True, text=True, timeout=30
            )
            return logs.stdout + logs.stderr

    try:
        started = subprocess.run(run, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        enabled = [p.name for p in lab.pods.values() if p.project == "myproject"]
        wait_patched(lab, Logs(), *enabled)  # every pod of the labelled project, nginx3 too
        sealed_curl(lab, capture, "nginx1", "nginx2")
        for pod in ("nginx1", "nginx2"):  # the proxies are the image's, not this checkout's
            [pid] = proxies_in(lab.pod(pod).netns)
            assert os.stat(f"/proc/{pid}/root").st_ino != os.stat("/").st_ino
            assert Path(f"/proc/{pid}/root/opt/tencrypt/bin/tencrypt").exists()
        assert (agent_state / "keys" / "myproject.psk").stat().st_mode & 0o777 == 0o600
        stop = subprocess.run(
            [*PODMAN, "stop", "-t", "60", name], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stderr
        assert f"unpatching {len(enabled)} pods" in Logs().text()
        for pod in lab.pods.values():
            assert proxies_in(pod.netns) == [] and not has_tenc0(lab, pod.name)
            assert (Path("/etc/netns") / pod.netns / "resolv.conf").read_text() == resolv[pod.name]
        assert list(setup_state.iterdir()) == []
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
        api.stop()
        kill_proxies(lab)


RR_LOOP = r"""
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
longest = 0.0
last = start = time.monotonic()
while time.monotonic() - start < seconds:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            r.read()
        now = time.monotonic()
        longest, last, ok = max(longest, now - last), now, ok + 1
    except OSError:
        failed += 1
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "longest_gap": round(longest, 3)}))
"""


# the DaemonSet's agent (adopting its proxies) and the one before it (unpatching on the way out)
RESTART_MODES = {
    "keep": ("sandbox", "keep"),  # --proxy-cgroup, --on-exit of the agent that restarts
    "unpatch": ("agent", "unpatch"),
}


@pytest.mark.parametrize("mode", sorted(RESTART_MODES))
def test_node_image_agent_restart_during_a_stream_and_requests(
    node_image, lab, capture, tmp_path, mode
):
    """An agent container restarted (as a DaemonSet upgrade does), measured across the
    restart with an iperf3 stream and a request every 50 ms between two patched pods.
    ``keep`` (daemonset.yaml): the proxies left the container's cgroup for their pods', the
    runtime's kill of the container spares them, the next agent adopts them: the same
    processes, no second without data, no request lost. ``unpatch`` (the DaemonSet before):
    the old agent restores the pods, the new one patches them again; figures only, and the
    pods sealed again. The figures go to $TENCRYPT_RESTART_RECORD (bench/agent_restart.py)."""
    cgroup, on_exit = RESTART_MODES[mode]
    api = FakeApiServer(pod_objects(lab))
    api.start()
    names = [f"tencrypt-agent-{netns.unique_suffix()}" for _ in range(2)]
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    setup_state, agent_state = tmp_path / "run-tencrypt", tmp_path / "agent-state"
    setup_state.mkdir()
    agent_state.mkdir(mode=0o700)

    def run(name: str, on_exit: str) -> list[str]:
        return [
            *PODMAN, "run", "-d", "--name", name, *LIMITS, "--privileged", "--pid=host",
            "--network=host",
            "-v", f"{kubeconfig}:/kubeconfig:ro",
            "-v", f"{setup_state}:/run/tencrypt",
            "-v", f"{agent_state}:/run/tencrypt-agent",
            "-v", "/sys/fs/cgroup:/host/sys/fs/cgroup",  # as daemonset.yaml mounts it
            node_image, "agent", "--node", "node1", "--kubeconfig", "/kubeconfig",
            "--sandbox", "annotation", "--state-dir", "/run/tencrypt-agent",
            "--proxy-metrics", METRICS, "--proxy-cgroup", cgroup, "--on-exit", on_exit,
            "--log-level", "debug",
        ]  # fmt: skip

    def logs(name: str) -> str:
        out = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr

    class Logs:
        def __init__(self, name: str) -> None:
            self.name = name

        def text(self) -> str:
            return logs(self.name)

    enabled = [p.name for p in lab.pods.values() if p.project == "myproject"]
    server = client = rr = None
    try:
        assert (
            subprocess.run(run(names[0], on_exit), capture_output=True, timeout=120).returncode == 0
        )
        wait_patched(lab, Logs(names[0]), *enabled)
        if mode == "keep":
            netns.wait_for(
                lambda: logs(names[0]).count("the proxy runs in its pod's cgroups") == len(enabled),
                timeout=30,
                what="every proxy in its pod's cgroups",
            )
        before = {p: proxies_in(lab.pod(p).netns) for p in enabled}
        a, b = lab.pod("nginx1"), lab.pod("nginx2")
        server = netns.spawn(b.netns, ["iperf3", "-s", "-1", "-p", "5201"])
        time.sleep(0.5)
        client = subprocess.Popen(
            ["ip", "netns", "exec", a.netns, "iperf3", "-c", b.ip, "-p", "5201", "-t", "16",
             "-i", "1", "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        rr = subprocess.Popen(
            ["ip", "netns", "exec", a.netns, sys.executable, "-c", RR_LOOP,
             f"http://{b.vip}:8080/", "16"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(4)
        # the restart: SIGTERM to the old container (its runtime then kills its cgroup), a new one
        stopped = time.monotonic()
        stop = subprocess.run(
            [*PODMAN, "stop", "-t", "60", names[0]], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stderr
        assert (
            subprocess.run(run(names[1], "unpatch"), capture_output=True, timeout=120).returncode
            == 0
        )
        if mode == "keep":
            assert "left running for the next agent (--on-exit keep)" in logs(names[0])
            netns.wait_for(
                lambda: (
                    logs(names[1]).count("adopted the proxy a previous agent started")
                    == len(enabled)
                ),
                timeout=60,
                what="the new agent to adopt every proxy",
            )
        else:
            wait_patched(lab, Logs(names[1]), *enabled)
        back = time.monotonic() - stopped
        out, err = client.communicate(timeout=60)
        try:
            stream = json.loads(out)
            intervals = [i["sum"]["bytes"] for i in stream.get("intervals", [])]
        except ValueError:
            stream, intervals = {"error": err.strip() or "no output"}, []
        loop = json.loads(rr.communicate(timeout=60)[0])
        figures = {
            "mode": mode,
            "agent_back_s": round(back, 1),
            "iperf3_exit": client.returncode,
            "iperf3_error": stream.get("error"),
            "seconds_without_data": sum(1 for n in intervals if n == 0),
            "smallest_interval_bytes": min(intervals, default=0),
            "intervals": len(intervals),
            "requests_ok": loop["ok"],
            "requests_failed": loop["failed"],
            "longest_gap_s": loop["longest_gap"],
            "same_proxy_processes": {p: proxies_in(lab.pod(p).netns) for p in enabled} == before,
        }
        print(f"agent restart: {json.dumps(figures)}")
        record = os.environ.get("TENCRYPT_RESTART_RECORD")
        if record:
            with open(record, "a") as f:
                f.write(json.dumps(figures) + "\n")
        if mode == "keep":  # the DaemonSet's promise: nothing of the restart reaches the pods
            assert figures["same_proxy_processes"]
            assert client.returncode == 0 and figures["seconds_without_data"] == 0, figures
            assert loop["failed"] == 0 and loop["ok"] > 100, figures
        sealed_curl(lab, capture, "nginx1", "nginx2")  # sealed after the restart, either way
        stop = subprocess.run(
            [*PODMAN, "stop", "-t", "60", names[1]], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0 and f"unpatching {len(enabled)} pods" in logs(names[1])
        for pod in lab.pods.values():
            assert proxies_in(pod.netns) == [] and not has_tenc0(lab, pod.name)
    finally:
        for proc in (client, rr, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for name in names:
            subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
        api.stop()
        kill_proxies(lab)
