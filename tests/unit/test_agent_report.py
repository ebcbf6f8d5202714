"""The agent's key report (agent/report.py): what its proxies loaded, per project, published
as a ConfigMap in its own namespace through the real client and the API double."""

from __future__ import annotations

import logging

import pytest
from kubernetes import client

from tencrypt.agent.report import KeyReporter, node_report
from tencrypt.core.psk import KeySet, ring_label
from tencrypt.core.rotation import REPORT_KEY, parse_report, progress
from tencrypt.kube import client as kubeclient
from tencrypt.linux.keyfile import write_loaded
from tests.kubefakes.writable import WritableApiServer

K1, K2 = bytes(range(1, 33)), bytes(range(2, 34))
OLD, NEW = KeySet(K1), KeySet(K1, next=K2)


def test_node_report_counts_pods_and_the_rings_they_loaded():
    loaded = {1: ring_label(NEW.fingerprints()), 2: ring_label(OLD.fingerprints()), 3: None}
    report = node_report(
        "n1", [("shop", 1), ("shop", 2), ("shop", 3), ("blog", 1)], loaded.get, 5.0
    )
    assert report.projects == {
        "shop": (3, {ring_label(NEW.fingerprints()): 1, ring_label(OLD.fingerprints()): 1, "": 1}),
        "blog": (1, {ring_label(NEW.fingerprints()): 1}),
    }
    assert report.node == "n1" and report.updated == 5.0


@pytest.fixture
def api(tmp_path):
    server = WritableApiServer()
    server.start()
    api = kubeclient.new_api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    yield server, client.CoreV1Api(api)
    api.close()
    server.stop()


def test_the_report_is_published_on_change_and_on_heartbeat_only(api, tmp_path, caplog):
    server, core = api
    now = [100.0]
    reporter = KeyReporter(
        core, "tencrypt-system", "n1", tmp_path, clock=lambda: now[0], every=1.0, heartbeat=60.0
    )
    (tmp_path / "netns-7").mkdir()
    write_loaded(tmp_path / "netns-7", OLD)
    reporter.publish([("shop", 7)])  # created
    stored = server.get("ConfigMap", "tencrypt-system", "tencrypt-keys-n1")
    assert parse_report(stored["data"][REPORT_KEY]).projects == {
        "shop": (1, {ring_label(OLD.fingerprints()): 1})
    }
    assert stored["metadata"]["labels"] == {"tencrypt.io/report": "keys"}
    for step in (0.5, 1.0, 1.0):  # too soon, then unchanged: no write
        now[0] += step
        reporter.publish([("shop", 7)])
    write_loaded(tmp_path / "netns-7", NEW)
    now[0] += 1.0
    reporter.publish([("shop", 7)])  # changed: updated at once
    now[0] += 61.0
    reporter.publish([("shop", 7)])  # heartbeat
    assert [w[3] for w in server.writes] == ["create", "update", "update"]
    docs = [
        (
            "tencrypt-keys-n1",
            server.get("ConfigMap", "tencrypt-system", "tencrypt-keys-n1")["data"][REPORT_KEY],
        )
    ]
    assert progress(docs, "shop", NEW).done
    server.forbid.add(("update", "ConfigMap"))
    write_loaded(tmp_path / "netns-7", OLD)
    with caplog.at_level(logging.ERROR, "tencrypt.agent"):
        for _ in range(3):  # refused: logged once, never raised, retried
            now[0] += 1.0
            reporter.publish([("shop", 7)])
    assert len([r for r in caplog.records if "cannot publish" in r.getMessage()]) == 1
    server.forbid.clear()
    now[0] += 1.0
    reporter.publish([("shop", 7)])
    assert reporter.writes == 4
