"""What Prometheus would scrape, checked by Prometheus' own linter: ``promtool check metrics``
on real proxies' /metrics after traffic crossed the tunnel, and on node-sync's while it
programs a node.

    [nginx1]--veth--+                              +--veth--[nginx2]     myproject: patched
      tencrypt run  |   node1: br0 172.17.0.1/16   |  tencrypt run       /metrics on each pod's
      127.0.0.1:9137+--- DNAT, dnsmasq ------------+  127.0.0.1:9137     own loopback
                        ^
    host: tencrypt node-sync --netns node1 --metrics 127.0.0.1:<free port>, watching a fake API

promtool comes from scripts/install.sh (taken out of Debian's prometheus package).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tencrypt.lab.proxy import METRICS
from tencrypt.linux import netns
from tencrypt.nodesync.kubeobjects import lab_objects
from tests.kubefakes.fakeapi import FakeApiServer
from tests.netns.conftest import curl

MARKER = "tencrypt-metrics-marker-5d1e"
REPO = Path(__file__).resolve().parents[2]


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed: run scripts/install.sh")
    return subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


def value(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert found, f"{series} not in the metrics"
    return float(found[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_promtool_finds_nothing_to_say_about_a_proxys_metrics(lab):
    lab.patch("nginx2")
    lab.patch("nginx1")
    page = curl(lab, "nginx1", "http://nginx2:8080/", MARKER)
    assert page.returncode == 0 and "Hello from nginx2" in page.stdout, page.stderr
    for pod in ("nginx1", "nginx2"):
        text = lab.exec(pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/metrics"]).stdout
        checked = promtool(text)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", ""), pod
        assert value(text, "tencrypt_packets_sealed_total") > 0
        assert value(text, 'tencrypt_drops_total{reason="bad_tag"}') == 0  # there from start
        assert value(text, "tencrypt_rekeys_total") == 0
        refused = 'tencrypt_firewall_packets_total{rule="refused",direction="in",family="ipv4"}'
        assert value(text, refused) >= 0
        assert re.search(r'^tencrypt_build_info\{.*fastpath="(c|python)"\} 1$', text, re.M)
        assert value(text, "process_resident_memory_bytes") > 0
        assert value(text, "process_open_fds") > 0


def test_promtool_finds_nothing_to_say_about_node_syncs_metrics(lab, tmp_path):
    api = FakeApiServer(lab_objects(lab.services))
    api.start()
    port, log = free_port(), tmp_path / "node-sync.log"
    argv = [sys.executable, "-m", "tencrypt.nodesync", "--netns", lab.nodes["node1"].netns]
    argv += ["--backend", "nft", "--metrics", f"127.0.0.1:{port}"]
    argv += ["--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig"))]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    full = 'tencrypt_nodesync_sync_duration_seconds_count{backend="nft",mode="full"} 1'
    scraped: list[str] = []

    def synced() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                scraped[:] = [response.read().decode()]
        except OSError:
            return False  # not listening yet
        return full in scraped[0].splitlines()

    try:
        netns.wait_for(synced, timeout=30, what="node-sync's first sync in its metrics")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        api.stop()
    text = scraped[0]
    checked = promtool(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", ""), log.read_text()
    assert value(text, "tencrypt_nodesync_applied_total") >= 1
    assert value(text, "tencrypt_nodesync_sync_failures_total") == 0
    assert value(text, "process_start_time_seconds") > 0
    assert re.search(r"^tencrypt_build_info\{.*\} 1$", text, re.M)
