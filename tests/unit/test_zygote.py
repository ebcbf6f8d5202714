"""The zygote (tencrypt/linux/zygote.py, its server tencrypt/zygotecmd.py) and the idle
bench's parsers (bench/idle.py).

Without root: the request parser, a zygote that answers a malformed request with an error and
serves on, one that exits when its client closes, and what ``warm`` loads (in a fresh
interpreter: it freezes the heap and keeps ssl out of the process that calls it). With root:
a forked child really is what the module's rules say (own session, the namespace given, its
output on the log, the run command's own behaviour: ``run --help``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.idle import parse_smaps_rollup, private_by_mapping
from tencrypt import zygotecmd
from tencrypt.linux.zygote import Zygote, ZygoteError, parse_request

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_request_is_argv_and_an_optional_environment():
    assert parse_request(b'{"argv": ["--psk-file", "k"], "env": null}') == (
        ["--psk-file", "k"],
        None,
        None,
    )
    assert parse_request(b'{"argv": [], "env": {"A": "1"}}') == ([], {"A": "1"}, None)
    assert parse_request(b'{"argv": [], "before": ["setup"]}') == ([], None, ["setup"])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[]",
        b'{"env": null}',
        b'{"argv": "run"}',
        b'{"argv": [1]}',
        b'{"argv": [], "env": {"A": 1}}',
        b'{"argv": [], "env": ["A"]}',
        b'{"argv": [], "before": []}',
        b'{"argv": [], "before": "setup"}',
    ],
)
def test_anything_else_is_no_request(data):
    assert parse_request(data) is None


def test_a_malformed_request_is_answered_and_the_zygote_serves_on(tmp_path):
    with Zygote(env=ENV, log=tmp_path / "zygote.log") as z:
        z.sock.settimeout(60)
        z.sock.send(b"not json")  # no descriptors either
        assert "malformed" in json.loads(z.sock.recv(4096))["error"]
        with open(os.devnull, "rb") as a, open(os.devnull, "rb") as b:
            socket.send_fds(z.sock, [b'{"argv": 3}'], [a.fileno(), b.fileno()])
            assert "malformed" in json.loads(z.sock.recv(4096))["error"]
        socket.send_fds(z.sock, [b'{"argv": []}'], [])  # right JSON, no descriptors
        assert "malformed" in json.loads(z.sock.recv(4096))["error"]
        assert z.proc.poll() is None
    assert z.proc.returncode == 0  # closing the socket ended it
    assert "tencrypt zygote: ready" in (tmp_path / "zygote.log").read_text()


def test_a_dead_zygote_is_replaced_before_the_next_request(tmp_path):
    with Zygote(env=ENV) as z:
        first = z.pid
        z.proc.kill()
        z.proc.wait()
        # answered by a new zygote (the child's own fate, setns as non-root, is not asked here)
        pid = z.spawn("/proc/self/ns/net", ["--help"], tmp_path / "log", timeout=60)
        assert pid > 0 and z.pid != first and z.starts == 2


def test_a_zygote_that_does_not_answer_is_an_error_and_replaced(tmp_path):
    with Zygote(env=ENV) as z:
        first = z.pid
        os.kill(first, signal.SIGSTOP)  # alive, but never answers
        try:
            with pytest.raises(ZygoteError, match="did not answer"):
                z.spawn("/proc/self/ns/net", ["--help"], tmp_path / "log", timeout=0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first, signal.SIGCONT)
        assert z.pid != first and z.starts == 2
        assert not Path(f"/proc/{first}").exists() or "Z" in Path(f"/proc/{first}/stat").read_text()


def test_warm_loads_what_a_proxy_runs_and_keeps_ssl_out():
    probe = (
        "import gc, json, sys\n"
        "from tencrypt.zygotecmd import warm\n"
        "warm()\n"
        "print(json.dumps({'mods': sorted(k for k, v in sys.modules.items() if v),"
        " 'frozen': gc.get_freeze_count()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, check=True
    ).stdout
    seen = json.loads(out)
    mods = set(seen["mods"])
    assert set(zygotecmd.PRELOAD) <= mods
    assert {"tencrypt.daemon", "tencrypt._fastpath", "asyncio", "dnslib"} <= mods
    assert "ssl" not in mods and "tencrypt.agent" not in mods and "pyroute2" not in mods
    assert seen["frozen"] > 10000  # the imported heap is in the permanent generation


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")
def test_a_forked_child_runs_the_run_command_in_its_own_session(tmp_path):
    log = tmp_path / "proxy.log"
    with Zygote(env=ENV, log=tmp_path / "zygote.log") as z:
        pid = z.spawn("/proc/self/ns/net", ["--help"], log, env={"PATH": "/usr/bin:/bin"})
        assert pid > 0 and pid != z.pid
        deadline_text = ""
        for _ in range(600):  # `run --help` prints and exits; the zygote reaps it
            deadline_text = log.read_text() if log.exists() else ""
            if "--psk-file" in deadline_text and not Path(f"/proc/{pid}").exists():
                break
            os.sched_yield()
            subprocess.run(["sleep", "0.05"], check=True)
        assert "usage: tencrypt run" in deadline_text
        assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie left behind


def test_smaps_rollup_figures():
    text = (
        "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0    [rollup]\n"
        "Rss:               33000 kB\nPss:               23000 kB\n"
        "Pss_Anon:          10000 kB\nShared_Clean:      14000 kB\n"
        "Private_Clean:       500 kB\nPrivate_Dirty:     16500 kB\n"
    )
    mem = parse_smaps_rollup(text)
    assert mem is not None
    assert (mem.rss_kb, mem.pss_kb, mem.private_kb) == (33000, 23000, 17000)
    assert parse_smaps_rollup("Rss: 1 kB\n") is None


def test_private_memory_is_summed_per_mapping():
    text = (
        "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/python3\n"
        "Private_Clean:         8 kB\nPrivate_Dirty:         4 kB\n"
        "01000000-02000000 rw-p 00000000 00:00 0 [heap]\n"
        "Private_Dirty:       100 kB\n"
        "7f0000000000-7f0000100000 rw-p 00000000 00:00 0\n"
        "Private_Clean:         0 kB\nPrivate_Dirty:        60 kB\n"
        "7f0000200000-7f0000300000 rw-p 00000000 00:00 0\n"
        "Private_Dirty:        40 kB\nVmFlags: rd wr mr mw me ac sd\n"
    )
    assert private_by_mapping(text) == {"python3": 12, "[heap]": 100, "[anon]": 100}


def _wait_gone(pid: int, log: Path, text: str) -> str:
    seen = ""
    for _ in range(600):
        seen = log.read_text() if log.exists() else ""
        if text in seen and not Path(f"/proc/{pid}").exists():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    return seen


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")
def test_the_command_before_runs_first_and_its_failure_means_no_proxy(tmp_path):
    ok, failed = tmp_path / "ok.log", tmp_path / "failed.log"
    with Zygote(env=ENV) as z:
        pid = z.spawn("/proc/self/ns/net", ["--help"], ok, before=["echo", "set up here"])
        text = _wait_gone(pid, ok, "--psk-file")
        assert text.index("set up here") < text.index("usage: tencrypt run")
        pid = z.spawn("/proc/self/ns/net", ["--help"], failed, before=["sh", "-c", "exit 3"])
        text = _wait_gone(pid, failed, "no proxy")
        assert "sh exited with 3; no proxy" in text and "usage:" not in text
