"""A user's mistake is one line and an exit code, never a traceback (issue 25, item 4): every
number and address is checked by the parser before a command touches anything (exit 2);
a missing kubeconfig is a usage error (2); an unreachable API server a runtime one; a
snapshot that would wipe the node's forwarding is refused unless asked for."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tencrypt import argtypes
from tencrypt.errors import UsageError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "nodesync-cluster.json"

# a kubeconfig whose API server refuses every connection (port 1 of loopback)
UNREACHABLE = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
users: [{name: u, user: {token: x}}]
"""


def tencrypt(*argv: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line in a child (its exit code and both streams), with no
    kubeconfig of this machine's to find: HOME is empty and KUBECONFIG unset."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "tencrypt", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        input=stdin,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The last stderr line: the error, with every word; and no traceback anywhere."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, last
    return last


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "--metrics", "127.0.0.1:99999"], ["--metrics", "127.0.0.1:99999"]),
        (["run", "--metrics", "127.0.0.1:0"], ["--metrics", "port 0"]),
        (["run", "--metrics", "localhost:9137"], ["--metrics", "an IP address"]),
        (["run", "--port", "0"], ["--port", "not a port number"]),
        (["run", "--port", "70000"], ["--port", "not a port number"]),
        (["run", "--session-lifetime", "-5"], ["--session-lifetime", "more than 0"]),
        (["run", "--handshake-give-up", "nan"], ["--handshake-give-up", "not a finite"]),
        (["dns", "--cache-entries", "-1"], ["--cache-entries", "0 or more"]),
        (["dns", "--timeout", "0"], ["--timeout", "more than 0"]),
        (["setup", "--resolv-conf-of", "0"], ["--resolv-conf-of", "1 or more"]),
        (["node-sync", "--port", "0"], ["--port", "not a port number"]),
        (["node-sync", "--resync", "-1"], ["--resync", "more than 0"]),
        (["node-sync", "--metrics", "0.0.0.0:65536"], ["--metrics"]),
        (["agent", "--node", "n", "--ready-timeout", "0"], ["--ready-timeout"]),
        (["agent", "--node", "n", "--proxy-metrics", "x"], ["--proxy-metrics"]),
        (["key", "rotate", "-n", "p", "--grace", "-1"], ["--grace", "0 seconds or more"]),
        (["key", "rotate", "-n", "p", "--timeout", "0"], ["--timeout", "more than 0"]),
    ],
)
def test_out_of_range_numbers_and_addresses_are_refused_by_the_parser(
    argv: list[str], words: list[str], tmp_path: Path
) -> None:
    """Refused before anything runs: `run` here would need root and a setup; it never
    gets that far."""
    proc = tencrypt(*argv, home=tmp_path)
    assert "usage:" in proc.stderr
    one_line_error(proc, 2, *words)


def test_no_kubeconfig_is_one_usage_line_for_every_command_that_needs_one(tmp_path: Path) -> None:
    for argv in (["key", "rotate", "-n", "p"], ["node-sync", "--once", "--dry-run"]):
        line = one_line_error(tencrypt(*argv, home=tmp_path), 2, "Kubernetes client")
        assert "--kubeconfig" in line
    missing = tmp_path / "nope"
    one_line_error(
        tencrypt("key", "rotate", "-n", "p", "--kubeconfig", str(missing), home=tmp_path),
        2,
        str(missing),
        "no such file",
    )
    garbage = tmp_path / "garbage"
    garbage.write_text("not: a kubeconfig\n")
    one_line_error(
        tencrypt("key", "rotate", "-n", "p", "--kubeconfig", str(garbage), home=tmp_path),
        2,
        str(garbage),
    )


def test_an_unreachable_api_server_is_one_runtime_line(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(UNREACHABLE)
    rotate = tencrypt(
        "key", "rotate", "-n", "p", "--kubeconfig", str(kubeconfig), "--timeout", "1", home=tmp_path
    )
    line = one_line_error(rotate, 3, "read Secret p/tencrypt", "unreachable")
    assert "Connection refused" in line
    sync = tencrypt(
        "node-sync", "--once", "--dry-run", "--kubeconfig", str(kubeconfig), home=tmp_path
    )
    assert sync.returncode in (1, 2) and "Traceback" not in sync.stderr, sync.stderr
    assert "unreachable" in sync.stderr.strip().splitlines()[-1]


def _snapshot(kinds: set[str]) -> str:
    doc = json.loads(FIXTURE.read_text())
    doc["items"] = [item for item in doc["items"] if item.get("kind") in kinds]
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("kinds", "missing"),
    [
        ({"Service", "EndpointSlice"}, "no Namespace"),
        ({"Namespace", "EndpointSlice"}, "no Service"),
        ({"Namespace", "Service"}, "no EndpointSlice or Endpoints"),
    ],
)
def test_node_sync_refuses_a_snapshot_that_would_wipe_the_forwarding(
    kinds: set[str], missing: str, tmp_path: Path
) -> None:
    once = ["node-sync", "--once", "--dry-run", "--backend", "nft", "--from-file", "-"]
    proc = tencrypt(*once, home=tmp_path, stdin=_snapshot(kinds))
    one_line_error(proc, 2, missing, "--allow-empty")
    assert proc.stdout == ""  # no transaction printed, none applied
    allowed = tencrypt(*once, "--allow-empty", home=tmp_path, stdin=_snapshot(kinds))
    assert allowed.returncode == 0, allowed.stderr
    assert "table inet tencrypt" in allowed.stdout  # the (empty) table it was asked for


def test_node_sync_refuses_a_snapshot_that_enables_no_service(tmp_path: Path) -> None:
    doc = json.loads(FIXTURE.read_text())
    for item in doc["items"]:
        if item.get("kind") == "Namespace":
            item["metadata"].get("labels", {}).pop("tencrypt.io/enabled", None)
    once = ["node-sync", "--once", "--dry-run", "--backend", "nft", "--from-file", "-"]
    one_line_error(tencrypt(*once, home=tmp_path, stdin=json.dumps(doc)), 2, "enables no Service")
    whole = tencrypt(*once, home=tmp_path, stdin=FIXTURE.read_text())
    assert whole.returncode == 0 and "dnat" in whole.stdout, whole.stderr


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (argtypes.port_number, {"1": 1, "65535": 65535}, ["0", "65536", "-1", "x", "1.5"]),
        (argtypes.positive_int, {"1": 1, "77": 77}, ["0", "-3", "one"]),
        (argtypes.count, {"0": 0, "5": 5}, ["-1", "five"]),
        (argtypes.seconds, {"0.5": 0.5, "300": 300.0}, ["0", "-5", "inf", "nan", "soon"]),
        (argtypes.microseconds, {"0": 0.0, "400": 400.0}, ["-1", "1000001", "nan", "x"]),
        (argtypes.seconds_or_zero, {"0": 0.0, "2.5": 2.5}, ["-0.1", "-inf", "x"]),
        (
            argtypes.address,
            {"127.0.0.1:9137": "127.0.0.1:9137", "[::1]:1": "[::1]:1"},
            [
                "127.0.0.1:0",
                "127.0.0.1:65536",
                "127.0.0.1",
                ":9137",
                "host:9137",
                "1.2.3.4:x",
            ],
        ),
    ],
)
def test_each_type_takes_its_range_and_refuses_the_rest(kind, good, bad) -> None:
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(text)):
            kind(text)


def test_parse_address_takes_port_0_for_callers_that_read_the_port_back() -> None:
    assert argtypes.parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert argtypes.parse_address("[::1]:9137") == ("::1", 9137)
    with pytest.raises(UsageError, match="--listen wants ADDR:PORT"):
        argtypes.parse_address("nowhere", "--listen")


@pytest.mark.parametrize(
    ("setup_args", "words"),
    [
        ("--mtu abc", ["--setup-args", "not flags of `tencrypt setup`"]),
        ("--no-such-flag", ["--setup-args"]),
        ("--resolv-conf-of 0", ["--setup-args"]),
        ("--service-cidr 10.96.0.0/33", ["--setup-args", "10.96.0.0/33"]),
        ("--pod-cidr nonsense", ["--setup-args", "nonsense"]),
        ("--undo", ["--undo is the agent's"]),
    ],
)
def test_the_agent_refuses_setup_args_setup_would_refuse_before_it_touches_a_pod(
    setup_args: str, words: list[str], tmp_path: Path
) -> None:
    """One typo in the DaemonSet's --setup-args stops the agent at start, with one line,
    instead of failing the set-up of every enabled pod of the node."""
    proc = tencrypt("agent", "--node", "n1", f"--setup-args={setup_args}", home=tmp_path)
    one_line_error(proc, 2, *words)


def test_good_setup_args_pass_the_agents_check() -> None:
    from tencrypt.agent.cli import check_setup_args

    check_setup_args("--service-cidr 10.96.0.0/12 --pod-cidr 10.244.0.0/16 --mtu 1400")
    check_setup_args("")
