"""The node daemons' probes and metrics endpoints (issue 25, items 1 and 5): node-sync and the
agent serve /metrics, /healthz and /readyz; the DaemonSet exposes both ports and points its
liveness and readiness probes at them; the agent's rules (agent/health.py) hold."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tencrypt.agent.health import COUNTERS, Health, readiness, render
from tencrypt.core.stats import Counter, Stats
from tencrypt.linux import probes

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[2] / "scripts" / "k8s"
HOST_IP = "10.0.0.7"  # what the kubelet puts in $(HOST_IP): status.hostIP


def kubelet_expands(container: dict[str, Any]) -> list[str]:
    """The container's args as the kubelet runs them: ``$(VAR)`` of a declared env var
    expanded (only status.hostIP is used)."""
    declared = {e["name"] for e in container.get("env", [])}
    values = {"HOST_IP": HOST_IP}

    def expand(arg: str) -> str:
        def one(m: re.Match[str]) -> str:
            assert m.group(1) in declared, f"$({m.group(1)}) is not in the container's env"
            return values[m.group(1)]

        return re.sub(r"\$\(([A-Z_]+)\)", one, arg)

    return [expand(a) for a in container["args"]]


def containers() -> dict[str, dict[str, Any]]:
    ds = next(
        d
        for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text())
        if d["kind"] == "DaemonSet"
    )
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("name", ["node-sync", "agent"])
def test_each_container_serves_its_probes_on_the_port_it_declares(name: str) -> None:
    from tencrypt.agent.cli import add_arguments as agent_arguments
    from tencrypt.nodesync.cli import add_arguments as sync_arguments

    container = containers()[name]
    parser = argparse.ArgumentParser(exit_on_error=False)
    (agent_arguments if name == "agent" else sync_arguments)(parser)
    args = parser.parse_args(kubelet_expands(container))
    host, _, port = args.metrics.rpartition(":")
    assert host == HOST_IP  # the node's address, not every interface of the node
    [declared] = container["ports"]
    assert declared["containerPort"] == int(port) and declared["protocol"] == "TCP"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, declared["name"])
    # a stuck agent is restarted only after its own staleness rule could have said so
    live = containers()["agent"]["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_server_answers_metrics_probes_and_404_and_survives_a_failing_probe() -> None:
    stop = threading.Event()
    state = {"ready": False}

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = probes.serve(
        "127.0.0.1:0",
        lambda: "# TYPE x gauge\nx 1\n",
        stop,
        {
            "/healthz": lambda: (True, "ok"),
            "/readyz": lambda: (state["ready"], "still listing"),
            "/broken": broken,
        },
    )
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert get(f"{url}/metrics") == (200, "# TYPE x gauge\nx 1\n")
        assert get(f"{url}/healthz") == (200, "ok\n")
        assert get(f"{url}/readyz") == (503, "still listing\n")
        state["ready"] = True
        assert get(f"{url}/readyz?verbose") == (200, "ok\n")
        assert get(f"{url}/broken") == (503, "the probe itself failed: boom\n")
        code, body = get(f"{url}/nope")
        assert code == 404 and "/healthz" in body and "/readyz" in body
    finally:
        stop.set()


def test_an_address_in_use_is_one_usage_error() -> None:
    from tencrypt.errors import UsageError

    stop = threading.Event()
    first = probes.serve("127.0.0.1:0", str, stop)
    try:
        with pytest.raises(UsageError, match="cannot serve metrics on 127.0.0.1:"):
            probes.serve(f"127.0.0.1:{first.server_address[1]}", str, stop)
    finally:
        stop.set()


def test_liveness_fails_only_when_the_loop_stops_turning() -> None:
    now = [1000.0]
    health = Health(clock=lambda: now[0], wall=lambda: 5.0, stale_after=120.0)
    assert health.live() == (True, "ok")  # just started: the loop gets its time
    now[0] += 121
    ok, reason = health.live()
    assert not ok and "121 s" in reason  # never beat at all
    health.beat()
    assert health.live() == (True, "ok")
    now[0] += 120
    assert health.live() == (True, "ok")
    now[0] += 1
    assert health.live()[0] is False


def test_readiness_says_what_is_missing_in_order() -> None:
    assert readiness(False, False, 0) == (
        False,
        "not every kind of object has been listed from the API yet",
    )
    assert readiness(True, False, 0)[1].startswith("the cluster's Service and pod ranges")
    assert readiness(True, True, 0)[1].startswith("no pass has reconciled")
    assert readiness(True, True, 1) == (True, "ok")


def test_the_agents_metrics_count_every_phase_and_counter_from_zero() -> None:
    health = Health(clock=lambda: 0.0, wall=lambda: 1700000000.25)
    health.passed()
    stats = Stats()
    stats.inc(Counter.AGENT_PROXY_STARTS, 3)
    text = render(["ready", "ready", "starting"], stats, True, health, 2)
    lines = text.splitlines()
    assert 'tencrypt_agent_proxies{phase="ready"} 2' in lines
    assert 'tencrypt_agent_proxies{phase="starting"} 1' in lines
    assert 'tencrypt_agent_proxies{phase="dead"} 0' in lines
    assert "tencrypt_agent_ready 1" in lines
    assert "tencrypt_agent_passes_total 1" in lines
    assert "tencrypt_agent_last_pass_timestamp_seconds 1700000000.25" in lines
    assert "tencrypt_agent_project_keys 2" in lines
    assert "tencrypt_agent_proxy_starts_total 3" in lines
    for counter in COUNTERS:  # every agent counter is there before it first counts
        assert any(line.startswith(f"tencrypt_{counter}_total ") for line in lines)
    assert set(COUNTERS) == {c for c in Counter if c.startswith("agent_")}
    assert any(line.startswith("process_resident_memory_bytes ") for line in lines)
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    helped = [line.split()[2] for line in lines if line.startswith("# HELP")]
    assert families == helped and len(set(families)) == len(families)
    promtool = shutil.which("promtool")
    if promtool:  # CI has it (scripts/install.sh); the agent's exposition passes its check
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0 and not check.stdout + check.stderr, check
