"""/metrics as Prometheus reads it (core/exposition.py): every family a proxy or node-sync emits
is declared with its help and type, counters end in _total and are there from start at 0, the
firewall's counters are one labelled family, build info and process metrics are there; and
promtool, when installed (CI installs it: scripts/install.sh), finds nothing to complain about."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import pytest

from tencrypt.core import exposition
from tencrypt.core.exposition import FAMILIES, Family, Kind, ProcessSample
from tencrypt.core.stats import NODESYNC_COUNTERS, PROXY_COUNTERS, Counter, DropReason, Stats
from tencrypt.linux import firewall, procstat
from tencrypt.nodesync.metrics import SyncMetrics, render
from tests.unit.fakes import Pod

A = "10.128.0.11"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def proxy_metrics() -> str:
    pod = Pod(A)
    asyncio.run(pod.proxy.prepare())
    return pod.proxy.render_metrics()


def nodesync_metrics() -> str:
    m = SyncMetrics("nft")
    m.observe("full", 0.02, 12, 1_700_000_000.0)
    return render(m, Stats(), "python")


def families(text: str) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (help, type, sample lines), checking the text's shape on the way."""
    found: dict[str, tuple[str, str, list[str]]] = {}
    helps: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert name not in helps, f"{name} twice"
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert name in helps, f"{name}: TYPE without HELP before it"
            found[name], current = (helps[name], kind, []), name
        else:
            match = SAMPLE.match(line)
            assert match, line
            assert match[1] == current or match[1].removeprefix(current) in (
                "_bucket",
                "_sum",
                "_count",
            ), f"{line!r} outside its family {current}"
            found[current][2].append(line)
    return found


@pytest.mark.parametrize("render_text", [proxy_metrics, nodesync_metrics])
def test_every_emitted_family_is_declared_with_its_help_and_type(render_text):
    emitted = families(render_text())
    for name, (help_text, kind, _) in emitted.items():
        family = FAMILIES[name]
        assert (help_text, kind) == (family.help, family.kind.value)
        assert name.endswith("_total") == (family.kind is Kind.COUNTER)
        assert help_text.endswith(".") and len(help_text.split()) >= 3, name


def test_a_new_proxy_shows_every_counter_reason_and_firewall_rule_at_zero():
    emitted = families(proxy_metrics())
    for counter in PROXY_COUNTERS:
        assert emitted[f"tencrypt_{counter}_total"][2] == [f"tencrypt_{counter}_total 0"]
    assert not [
        name for name in emitted if name.startswith(("tencrypt_agent_", "tencrypt_nodesync"))
    ]
    drops = emitted["tencrypt_drops_total"][2]
    assert drops == [f'tencrypt_drops_total{{reason="{r.value}"}} 0' for r in DropReason]
    read = {"refused_out_ipv4": 3}  # what the fake kernel's nft counters say (tests/unit/fakes)
    assert emitted["tencrypt_firewall_packets_total"][2] == [
        f'tencrypt_firewall_packets_total{{rule="{r}",direction="{d}",family="{f}"}} '
        f"{read.get(firewall.comment(r, d, f), 0)}"
        for r, d, f in firewall.COUNTED
    ]
    assert not [name for name in emitted if re.match(r"tencrypt_firewall_refused", name)]
    for name in ("tencrypt_netpol_flows_allowed_total", "tencrypt_netpol_packets_denied_total"):
        assert emitted[name][2] == []  # labelled by policy: no policy, no series (HELP, TYPE)


def test_build_info_and_process_metrics_come_with_the_proxy_and_node_sync():
    for text in (proxy_metrics(), nodesync_metrics()):
        emitted = families(text)
        (info,) = emitted["tencrypt_build_info"][2]
        assert re.fullmatch(
            r'tencrypt_build_info\{version="[^"]+",python="3\.\d+\.\d+",fastpath="(c|python)"\} 1',
            info,
        )
        for name in (
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ):
            ((value,),) = [line.split()[1:] for line in emitted[name][2]]
            assert float(value) > 0 or name == "process_cpu_seconds_total", name


def test_node_sync_shows_its_own_counters_from_start():
    emitted = families(nodesync_metrics())
    for counter in NODESYNC_COUNTERS:
        assert emitted[f"tencrypt_{counter}_total"][2] == [f"tencrypt_{counter}_total 0"]
    assert not [n for n in emitted if n.startswith("tencrypt_packets_")]
    assert (
        'tencrypt_nodesync_sync_duration_seconds_count{backend="nft",mode="full"} 1'
        in (emitted["tencrypt_nodesync_sync_duration_seconds"][2])
    )


def test_the_firewall_counts_by_rule_direction_and_family_from_its_comments():
    comments = re.findall(r'comment "([^"]+)"', firewall.render_table("eth0", 1337, 0x1))
    assert sorted(comments) == sorted(firewall.BY_COMMENT)
    from tencrypt.observe import render_firewall

    lines = render_firewall({"refused_in_ipv4": 7, "something_else": 3}).splitlines()
    assert 'tencrypt_firewall_packets_total{rule="refused",direction="in",family="ipv4"} 7' in lines
    assert len([ln for ln in lines if not ln.startswith("#")]) == len(firewall.COUNTED)


def test_an_undeclared_family_or_a_wrong_label_set_is_a_bug_not_a_series():
    with pytest.raises(KeyError):
        exposition.family("tencrypt_made_up_total", [((), 1)])
    with pytest.raises(ValueError, match="takes labels"):
        exposition.sample("tencrypt_drops_total", (), 1)
    for bad in (
        Family("x_total", Kind.GAUGE, "A gauge named as a counter."),
        Family("x", Kind.COUNTER, "A counter without _total."),
        Family("x", Kind.GAUGE, ""),
    ):
        with pytest.raises(ValueError):
            exposition._declare([bad])
    with pytest.raises(ValueError):
        exposition._declare([Family("x", Kind.GAUGE, "One."), Family("x", Kind.GAUGE, "Two.")])


def test_help_and_label_values_are_escaped(monkeypatch):
    monkeypatch.setitem(FAMILIES, "t_x", Family("t_x", Kind.GAUGE, "a \\ b\nc", ("l",)))
    assert exposition.family("t_x", [(('q"\\\n',), 1.5)]) == [
        "# HELP t_x a \\\\ b\\nc",
        "# TYPE t_x gauge",
        't_x{l="q\\"\\\\\\n"} 1.5',
    ]


STAT = (
    "4242 (tencrypt run) S 1 4242 4242 0 -1 4194560 9000 0 3 0 "
    "250 150 0 0 20 0 3 0 123456 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0"
)


def test_proc_files_are_read_as_the_official_process_collector_reads_them():
    cpu, rss, vsize, start = exposition.parse_stat(STAT, 1_700_000_000.0, 100, 4096)
    assert (cpu, rss, vsize, start) == (4.0, 2560 * 4096, 104857600, 1_700_000_000.0 + 1234.56)
    assert exposition.parse_boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n") == 1.7e9
    limits = "Limit  Soft Limit  Hard Limit  Units\nMax open files  1024  524288  files\n"
    assert exposition.parse_max_fds(limits) == 1024
    assert exposition.parse_max_fds("Max open files  unlimited  unlimited  files\n") == -1
    with pytest.raises(ValueError):
        exposition.parse_boot_time("cpu 1 2 3\n")
    with pytest.raises(ValueError):
        exposition.parse_max_fds("Max processes 10 10 processes\n")


def test_process_families_keep_their_headers_when_proc_cannot_be_read(tmp_path):
    assert procstat.read_process(str(tmp_path)) is None
    lines = exposition.render_process(None)
    assert lines and all(line.startswith("#") for line in lines)
    sample = ProcessSample(1.25, 10, 20, 1.7e9, 5, 1024)
    assert "process_open_fds 5" in exposition.render_process(sample)
    here = procstat.read_process()
    assert here is not None and here.open_fds >= 3 and here.resident_bytes > 0


def test_counter_help_is_the_declaration():
    assert FAMILIES["tencrypt_packets_sealed_total"].help == Counter.PACKETS_SEALED.help


@pytest.mark.parametrize("render_text", [proxy_metrics, nodesync_metrics])
def test_promtool_finds_nothing_to_complain_about(render_text):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/install.sh installs it; CI has it)")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=render_text(), capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
