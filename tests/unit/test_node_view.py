"""The node's view of its proxies (issue 25, items 1 and 2): every proxy serves /metrics and
/status on a Unix socket in its state directory; the agent merges all of them into its own
/metrics, labelled by namespace and pod; `tencrypt status --node` lists them."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import yaml

from tencrypt.agent import scrape
from tencrypt.linux import metrics
from tencrypt.status import main as status_main
from tencrypt.status import node_rows

PROXY_A = """# HELP tencrypt_sessions Live sessions.
# TYPE tencrypt_sessions gauge
tencrypt_sessions 2
# HELP tencrypt_drops_total Dropped, by reason.
# TYPE tencrypt_drops_total counter
tencrypt_drops_total{reason="bad_mac"} 7
tencrypt_drops_total{reason="replay"} 0
"""
PROXY_B = """# HELP tencrypt_sessions Live sessions (B's words).
# TYPE tencrypt_sessions gauge
tencrypt_sessions 5
# TYPE tencrypt_drops_total counter
tencrypt_drops_total{} 1
untyped_thing 3
# TYPE tencrypt_rtt_seconds histogram
tencrypt_rtt_seconds_bucket{le="+Inf"} 4
tencrypt_rtt_seconds_count 4
"""


def test_merge_keeps_one_help_and_type_per_family_and_groups_every_pods_samples() -> None:
    text = scrape.merge([("shop", "web-1", PROXY_A), ("blog", "a", None), ("shop", "db", PROXY_B)])
    assert text.splitlines() == [
        "# HELP tencrypt_proxy_up 1 when the agent could read the proxy's metrics at this "
        "scrape, else 0.",
        "# TYPE tencrypt_proxy_up gauge",
        'tencrypt_proxy_up{namespace="shop",pod="web-1"} 1',
        'tencrypt_proxy_up{namespace="blog",pod="a"} 0',
        'tencrypt_proxy_up{namespace="shop",pod="db"} 1',
        "# HELP tencrypt_sessions Live sessions.",  # the first proxy's words
        "# TYPE tencrypt_sessions gauge",
        'tencrypt_sessions{namespace="shop",pod="web-1"} 2',
        'tencrypt_sessions{namespace="shop",pod="db"} 5',
        "# HELP tencrypt_drops_total Dropped, by reason.",
        "# TYPE tencrypt_drops_total counter",
        'tencrypt_drops_total{namespace="shop",pod="web-1",reason="bad_mac"} 7',
        'tencrypt_drops_total{namespace="shop",pod="web-1",reason="replay"} 0',
        'tencrypt_drops_total{namespace="shop",pod="db"} 1',
        'untyped_thing{namespace="shop",pod="db"} 3',  # a family of its own, no TYPE
        "# TYPE tencrypt_rtt_seconds histogram",
        'tencrypt_rtt_seconds_bucket{namespace="shop",pod="db",le="+Inf"} 4',
        'tencrypt_rtt_seconds_count{namespace="shop",pod="db"} 4',
    ]


def test_merge_with_no_proxy_is_only_the_up_family_and_escapes_labels() -> None:
    assert scrape.merge([]).splitlines()[1] == "# TYPE tencrypt_proxy_up gauge"
    text = scrape.merge([('we"ird', "p\\1", "x 1\n#comment\n\n")])
    assert 'x{namespace="we\\"ird",pod="p\\\\1"} 1' in text.splitlines()


def serve_in_thread(directory: Path, status: dict[str, object]) -> threading.Event:
    """A proxy's socket endpoint, served by the real code on an event loop of its own."""
    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        async def main() -> None:
            server = await metrics.serve_unix(
                directory / metrics.SOCKET_FILE, lambda: PROXY_A, lambda: status
            )
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            server.close()

        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(10)
    return stop


def test_the_socket_serves_metrics_and_status_0600_and_the_node_view_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two, idle = (tmp_path / f"netns-{n}" for n in (4026531992, 4026532001, 4026532002))
    for d in (one, two, idle):
        d.mkdir()
    status = {
        "pod_ip": "10.128.0.5",
        "mode": "cluster",
        "membership": {"project": "shop"},
        "totals": {"peers": 3, "peers_up": 2, "sessions": 2},
        "drops": {"bad_mac": 4, "replay": 1},
        "counters": {"plaintext_fallback": 0},
    }
    stops = [serve_in_thread(one, status)]
    (two / metrics.SOCKET_FILE).touch()  # a proxy that died and left its socket
    try:
        sock = one / metrics.SOCKET_FILE
        assert sock.stat().st_mode & 0o777 == 0o600
        assert metrics.get_unix(sock, "/metrics") == (200, PROXY_A.encode())
        code, body = metrics.get_unix(sock, "/status")
        assert code == 200 and json.loads(body) == status
        assert metrics.get_unix(sock, "/nope")[0] == 404
        assert scrape.read_one(sock) == PROXY_A and scrape.read_one(two / "x") is None

        rows = node_rows(tmp_path)  # the idle namespace (no socket) is not a row
        assert [r["state"] for r in rows] == [str(one), str(two)]
        assert rows[0]["status"] == status and "error" in rows[1]
        assert status_main(parse(["status", "--node", "--state-dir", str(tmp_path)])) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:3] == ["POD", "IP", "PROJECT"]
        assert out[1].split() == ["10.128.0.5", "shop", "cluster", "2/3", "2", "5", "0"]
        assert out[2].startswith("?") and str(two) in out[2]
        assert status_main(parse(["status", "--socket", str(sock), "-o", "json"])) == 0
        assert json.loads(capsys.readouterr().out) == status
        assert status_main(parse(["status", "--socket", str(sock), "-o", "yaml"])) == 0
        assert yaml.safe_load(capsys.readouterr().out) == status  # kubectl's -o yaml
    finally:
        for stop in stops:
            stop.set()


def parse(argv: list[str]):  # type: ignore[no-untyped-def]
    from tencrypt.cli import parse_args

    return parse_args(argv)


def test_the_agents_own_families_and_its_proxies_merge_into_one_valid_exposition() -> None:
    """Both export process_* and build info: each family is written once, the agent's sample
    unlabelled beside every proxy's, and promtool accepts the whole."""
    import shutil
    import subprocess

    from tencrypt.agent.health import Health, render
    from tencrypt.core.stats import Stats

    own = render([], Stats(), False, Health(clock=lambda: 0.0), 0)
    proxy = render(["ready"], Stats(), True, Health(clock=lambda: 0.0), 1)  # same families
    text = scrape.merge([("shop", "web-1", proxy), ("shop", "web-2", None)], own)
    lines = text.splitlines()
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    rss = [line for line in lines if line.startswith("process_resident_memory_bytes")]
    assert len(rss) == 2 and rss[1].startswith(
        'process_resident_memory_bytes{namespace="shop",pod="web-1"} '
    )
    assert 'tencrypt_proxy_up{namespace="shop",pod="web-2"} 0' in lines
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0 and not check.stdout + check.stderr, check


def test_the_cluster_view_counts_each_projects_pods_with_and_without_a_working_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tencrypt status --cluster`: the agents' reports (ConfigMaps) and the enabled
    namespaces, read with a kubeconfig from the API server double."""
    import time

    from tencrypt.core.rotation import REPORT_KEY, REPORT_LABEL, NodeReport, render_report
    from tests.kubefakes import builders
    from tests.kubefakes.writable import WritableApiServer

    def report(node: str, updated: float, projects: dict) -> dict:
        return {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": f"tencrypt-keys-{node}",
                "namespace": "tencrypt-system",
                "labels": dict([REPORT_LABEL]),
            },
            "data": {REPORT_KEY: render_report(NodeReport(node, updated, projects))},
        }

    now = time.time()
    api = WritableApiServer(
        [
            builders.build_namespace("shop"),
            builders.build_namespace("blog"),  # enabled, no pod with a proxy anywhere
            builders.build_namespace("wiki", enabled=False),
            report("node-1", now, {"shop": (3, {"current=ab12cd34": 2, "": 1})}),
            report("node-2", now - 600, {"shop": (1, {"current=ab12cd34": 1})}),
        ]
    )
    api.start()
    try:
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        assert status_main(parse(["status", "--cluster", "--kubeconfig", kubeconfig])) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "2 nodes report"
        assert out[1] == "WARNING: the agent of node node-2 has not reported for 3 minutes"
        rows = {line.split()[0]: line.split() for line in out[3:]}
        assert rows["shop"][1:5] == ["2", "4", "3", "1"]  # nodes, pods, sealed, not sealed
        assert rows["blog"][1:5] == ["0", "0", "0", "0"] and "wiki" not in rows
        assert (
            status_main(parse(["status", "--cluster", "--kubeconfig", kubeconfig, "-o", "json"]))
            == 0
        )
        doc = json.loads(capsys.readouterr().out)
        assert doc["projects"][1] == {
            "project": "shop",
            "nodes": 2,
            "pods": 4,
            "sealed": 3,
            "unsealed": 1,
            "rings": {"current=ab12cd34": 3},
        }
    finally:
        api.stop()


def test_a_socket_path_too_long_for_af_unix_is_a_clear_error(tmp_path: Path) -> None:
    """runcmd logs it and runs on without the node's view (observability, not the data path)."""
    from tencrypt.errors import SetupError

    deep = tmp_path / ("d" * 120)
    deep.mkdir()

    async def start() -> None:
        await metrics.serve_unix(deep / metrics.SOCKET_FILE, lambda: "", None)

    with pytest.raises(SetupError, match="cannot serve metrics on .*too long"):
        asyncio.run(start())
