"""``tencrypt agent --fork-proxies`` on the one-node lab: the proxies are forked by its zygote.

The same world as tests/netns/test_agent.py (its lab, API double and helpers: nginx1 and
nginx2 of myproject enabled, cakephp of project2 not), with one agent started with
``--fork-proxies --on-exit keep``. Checked: each enabled pod's proxy is the zygote's child
(``tencrypt-run``) in the pod's namespace, recorded by the agent, and seals a request; a
killed proxy is forked again; the agent stops (its zygote exits with it), the proxies run on
and a second agent (``--fork-proxies --on-exit unpatch``) adopts them from the records
without starting new ones; its stop (SIGTERM to each proxy's process group, then the
launcher's ``--undo``) leaves no proxy, no tenc0 and the original resolv.conf.

``lab.proxy.proxies_in`` finds proxies by their command line (``tencrypt … run``), which a
forked proxy does not have (it is the zygote's: ``python -m tencrypt.zygotecmd``); this file
finds them through the agent's records and the namespace's processes instead.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tencrypt.linux import netns
from tests.kubefakes.writable import WritableApiServer
from tests.netns.test_agent import (  # noqa: F401 - lab: that file's lab fixture
    AgentProcess,
    World,
    has_tenc0,
    lab,
    pod_objects,
    pod_uid,
    resolv_files,
    sealed_curl,
    wait_patched,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture(scope="module")
def forking(lab, tmp_path_factory):  # noqa: F811 - the imported fixture
    api = WritableApiServer(pod_objects(lab))
    api.start()
    world = World(lab, api, tmp_path_factory.mktemp("zagent"))
    start_forking_agent(world, "keep")
    try:
        yield world
    finally:
        for agent in world.agents:
            agent.stop()
        api.stop()
        for pod in lab.pods.values():  # whatever a failed test left running in the pods
            for pid in netns_pids(pod.netns):
                if comm(pid) == "tencrypt-run":
                    os.kill(pid, signal.SIGKILL)


def start_forking_agent(world, on_exit: str) -> AgentProcess:
    n = len(world.agents)
    agent = AgentProcess(world.api, world.tmp, on_exit, f"agent{n}.log", "annotation")
    agent.argv.append("--fork-proxies")
    world.agents.append(agent)
    agent.start()
    return agent


def netns_pids(ns: str) -> list[int]:
    out = netns.sh(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def recorded_pid(world, pod: str) -> int | None:
    path = world.agent.state / "pods" / pod_uid(world.lab, pod) / "record.json"
    try:
        return int(json.loads(path.read_text())["proxy_pid"])
    except (OSError, ValueError, KeyError):
        return None


def forked_proxy(world, pod: str, adopted: bool = False) -> int:
    """The pod's proxy as the agent recorded it, checked to be the zygote's child (unless
    ``adopted``: its zygote exits with the agent that started it)."""
    pid = recorded_pid(world, pod)
    assert pid is not None
    ns = world.lab.pod(pod).netns
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns.NETNS_DIR / ns).st_ino
    assert comm(pid) == "tencrypt-run" and os.getpgid(pid) == pid
    stat = Path(f"/proc/{pid}/stat").read_text()
    parent = int(stat[stat.rindex(")") + 2 :].split()[1])
    forked_by = b"tencrypt.zygotecmd" in Path(f"/proc/{parent}/cmdline").read_bytes()
    assert forked_by or adopted  # adopted: its zygote is gone, or going (not waited for)
    assert [p for p in netns_pids(ns) if comm(p) == "tencrypt-run"] == [pid]
    return pid


def test_forked_proxies_are_recorded_and_seal(forking, capture):
    the_lab, agent = forking.lab, forking.agent
    wait_patched(the_lab, agent, "nginx1", "nginx2")
    for pod in ("nginx1", "nginx2"):
        forked_proxy(forking, pod)
    sealed_curl(the_lab, capture, "nginx1", "nginx2")
    assert not has_tenc0(the_lab, "cakephp")
    assert not [p for p in netns_pids(the_lab.pod("cakephp").netns) if comm(p) == "tencrypt-run"]


def test_a_killed_forked_proxy_is_forked_again(forking, capture):
    the_lab, agent = forking.lab, forking.agent
    wait_patched(the_lab, agent, "nginx1", "nginx2")
    old = forked_proxy(forking, "nginx2")
    os.kill(old, signal.SIGKILL)
    netns.wait_for(
        lambda: recorded_pid(forking, "nginx2") not in (None, old),
        timeout=60,
        interval=0.2,
        what="a new proxy recorded for nginx2",
    )
    wait_patched(the_lab, agent, "nginx2")
    assert forked_proxy(forking, "nginx2") != old
    sealed_curl(the_lab, capture, "nginx1", "nginx2")
    assert "nginx2: the proxy exited" in agent.text()


def test_a_restarted_agent_adopts_the_forked_proxies(forking, capture):
    the_lab, first = forking.lab, forking.agent
    wait_patched(the_lab, first, "nginx1", "nginx2")
    pids = [forked_proxy(forking, pod) for pod in ("nginx1", "nginx2")]
    assert first.stop() == 0  # --on-exit keep: the proxies run on, their zygote is gone
    assert [forked_proxy(forking, pod, adopted=True) for pod in ("nginx1", "nginx2")] == pids
    second = start_forking_agent(forking, "unpatch")
    netns.wait_for(
        lambda: second.text().count("adopted the proxy a previous agent started") == 2,
        timeout=60,
        interval=0.2,
        what="the adoption",
    )
    wait_patched(the_lab, second, "nginx1", "nginx2")
    assert [recorded_pid(forking, pod) for pod in ("nginx1", "nginx2")] == pids
    sealed_curl(the_lab, capture, "nginx1", "nginx2")


def test_the_agents_stop_ends_the_forked_proxies_and_undoes_the_pods(forking):
    the_lab, agent = forking.lab, forking.agent
    resolv = resolv_files(the_lab)
    pids = [recorded_pid(forking, pod) for pod in ("nginx1", "nginx2")]
    assert all(pids)
    assert agent.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()
    for pod in the_lab.pods.values():
        assert not [p for p in netns_pids(pod.netns) if comm(p) == "tencrypt-run"]
        assert not has_tenc0(the_lab, pod.name)
    assert "unpatching 2 pods" in agent.text()
    # the pods' resolv.conf as before the agent came: read at the start is the patched one
    for name in ("nginx1", "nginx2"):
        assert "nameserver 127.0.0.1" in resolv[name]
        assert (
            "nameserver 127.0.0.1"
            not in (Path("/etc/netns") / the_lab.pod(name).netns / "resolv.conf").read_text()
        )
