"""`tencrypt dns` (tencrypt.dnscmd): its configuration and its stats line, no sockets opened."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tencrypt.cli import build_parser
from tencrypt.core.podconfig import PodConfig
from tencrypt.core.stats import DropReason, Stats
from tencrypt.dnscmd import _load_pod, resolve_config, stats_line
from tencrypt.errors import UsageError
from tencrypt.linux.dns import DnsConfig, parse_hostport


def args(**kw):
    base = dict(
        listen="127.0.0.1:53",
        upstream=None,
        domain=None,
        cluster_domain="cluster.local",
        timeout=2.0,
    )
    return SimpleNamespace(**{**base, **kw})


def test_resolve_config_flags_state_and_resolv_conf(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "nameserver 172.30.0.2\nsearch myproject.svc.cluster.local "
        "svc.cluster.local\noptions ndots:5\n"
    )
    c = resolve_config(args(), None, resolv)
    assert c.upstream == ("172.30.0.2", 53) and c.domain == "myproject.svc.cluster.local"
    assert c.fwmark is None
    c = resolve_config(
        args(upstream="10.0.0.53:5353", domain="shop.svc.cluster.local."), None, resolv
    )
    assert c.upstream == ("10.0.0.53", 5353) and c.domain == "shop.svc.cluster.local"
    pod = PodConfig(
        pod_ip="10.128.0.4",
        dev="eth0",
        gateway="10.128.0.1",
        dns="172.30.0.9",
        domain="p.svc.cluster.local",
        search=(),
        cluster_domain="cluster.local",
    )
    c = resolve_config(args(), pod, tmp_path / "absent")
    assert c.upstream == ("172.30.0.9", 53) and c.fwmark == pod.fwmark
    assert DnsConfig.from_pod(pod).domain == "p.svc.cluster.local"
    # After setup, resolv.conf points at the proxy itself: never forward to ourselves.
    resolv.write_text("nameserver 127.0.0.1\nsearch p.svc.cluster.local\n")
    with pytest.raises(UsageError, match="itself"):
        resolve_config(args(), None, resolv)
    with pytest.raises(UsageError, match="upstream"):
        resolve_config(args(), None, tmp_path / "absent")
    with pytest.raises(UsageError, match="domain"):
        resolve_config(args(upstream="10.0.0.53"), None, tmp_path / "absent")
    assert parse_hostport("[fd00::53]:5300", 53) == ("fd00::53", 5300)
    assert parse_hostport("fd00::53", 53) == ("fd00::53", 53)
    with pytest.raises(UsageError):
        parse_hostport("dns.example:53", 53)


def test_cli_flags_reach_resolve_config(tmp_path):
    ns = build_parser().parse_args(
        [
            "dns",
            "--upstream",
            "10.0.0.53",
            "--domain",
            "p.svc",
            "--listen",
            "127.0.0.1:5300",
            "--timeout",
            "0.5",
        ]
    )
    assert ns.handler == "tencrypt.dnscmd:main"
    c = resolve_config(ns, None, tmp_path / "absent")
    assert (c.upstream, c.listen, c.domain, c.timeout) == (
        ("10.0.0.53", 53),
        ("127.0.0.1", 5300),
        "p.svc",
        0.5,
    )


def test_stats_line_is_one_json_line():
    stats = Stats()
    stats.drop(DropReason.DNS_MALFORMED_QUERY)
    line = stats_line(stats)
    assert line.startswith("stats ") and "\n" not in line
    snap = json.loads(line.removeprefix("stats "))
    assert snap["drops"] == {DropReason.DNS_MALFORMED_QUERY.value: 1} and snap["table"] == 0


def test_no_setup_state_means_no_pod(tmp_path):
    assert _load_pod(str(tmp_path / "nothing-here")) is None


def test_the_proxy_caps_its_cache_at_its_tables_ttl_and_counts_into_its_stats():
    """Issue 22, items 4 and 6: the proxy hands its Stats to the classification table and the
    answer cache, and the cache the table's TTL cap (no sockets are opened before start)."""
    from tencrypt.linux.dns import DnsProxy

    stats = Stats()
    proxy = DnsProxy(DnsConfig(("10.96.0.10", 53), "shop.svc.cluster.local"), stats)
    cache = proxy.pending.cache
    assert cache is not None and cache.max_ttl == proxy.table.max_ttl == 86400
    assert cache.stats is stats and proxy.table.stats is stats
