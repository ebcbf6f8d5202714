"""``tencrypt dns``: the embedded DNS proxy alone, for testing — its command, not the proxy.

The proxy itself is ``tencrypt.linux.dns.DnsProxy``; this module only composes it the way the
command line asks:

1. Configuration (``resolve_config``): each value from its flag first, then from the state
   ``tencrypt setup`` left (``--state-dir``), then from resolv.conf (first ``nameserver``,
   first ``search`` entry). No upstream or no domain is a ``UsageError``, and so is an
   upstream equal to the listening address (after setup, resolv.conf names the proxy itself).
2. Routes: the proxy's own effects task (``linux.effects``, no firewall) keeps tenc0's /32
   routes in step with the classification only when setup's state is there and tenc0 exists;
   otherwise the proxy only classifies.
3. ``serve`` runs until SIGTERM/SIGINT; SIGUSR1 logs one ``stats_line``, and so does the stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tencrypt.core.classify import Change
from tencrypt.core.effects import Desired
from tencrypt.core.podconfig import PodConfig, parse_resolv_conf
from tencrypt.core.stats import Stats
from tencrypt.errors import UsageError
from tencrypt.linux.dns import DnsConfig, DnsProxy, parse_hostport

log = logging.getLogger("tencrypt.dns")


def stats_line(stats: Stats, proxy: DnsProxy | None = None) -> str:
    """One JSON line of counters, drops by reason and the table size (for logs and tests)."""
    snap = {
        "counters": dict(sorted(stats.counters.items())),
        "drops": {r.value: n for r, n in sorted(stats.drops.items(), key=lambda i: i[0].value)},
        "table": proxy.table_size() if proxy else 0,
    }
    return "stats " + json.dumps(snap, sort_keys=True)


def _load_pod(state_dir: str) -> PodConfig | None:
    """Setup's PodConfig, or None when setup has not run here (or pyroute2 is missing)."""
    try:
        from tencrypt.linux.podnet import load_config
    except ImportError:
        return None
    try:
        return load_config(state_dir)
    except UsageError:
        return None


def resolve_config(
    args: Any, pod: PodConfig | None, resolv_conf: Path = Path("/etc/resolv.conf")
) -> DnsConfig:
    """Flags first, then setup's state, then resolv.conf (rule 1)."""
    servers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    if (not args.upstream or not args.domain) and pod is None and resolv_conf.exists():
        parsed = parse_resolv_conf(resolv_conf.read_text())
        servers, search = parsed.nameservers, parsed.search
    upstream = args.upstream or (pod.dns if pod is not None else None) or next(iter(servers), None)
    domain = args.domain or (pod.domain if pod is not None else None) or next(iter(search), None)
    if not upstream:
        raise UsageError("no upstream DNS server: give --upstream or run `tencrypt setup` first")
    if not domain:
        raise UsageError("no project domain: give --domain or run `tencrypt setup` first")
    config = DnsConfig(
        upstream=parse_hostport(upstream, 53),
        domain=domain.rstrip("."),
        cluster_domain=args.cluster_domain.rstrip("."),
        listen=parse_hostport(args.listen, 53),
        timeout=args.timeout,
        fwmark=pod.fwmark if pod is not None else None,
        cache_entries=max(0, getattr(args, "cache_entries", 1024)),
    )
    if config.upstream == config.listen:
        raise UsageError(f"the upstream {upstream} is this proxy itself: give --upstream")
    return config


def _tun_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


async def serve(
    config: DnsConfig,
    stats: Stats,
    pod: PodConfig | None = None,
    stop_signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Run a proxy until a stop signal; SIGUSR1 logs the counters (rule 3). With ``pod``, its
    classification changes become /32 routes (rule 2)."""
    proxy = DnsProxy(config, stats)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("%s", stats_line(stats, proxy)))
    effects = None
    if pod is not None:
        from tencrypt.linux.effects import EffectApplier, Kernel

        desired = Desired(pod.service_cidrs, pod.own_addresses)
        applier = effects = EffectApplier(desired, stats, Kernel(pod, firewall=False))

        def on_change(changes: list[Change]) -> None:
            desired.on_changes(changes)
            applier.wake()

        proxy.on_change = on_change
    await proxy.start()
    task = asyncio.create_task(effects.run(stop)) if effects else None
    try:
        await stop.wait()
    finally:
        await proxy.close()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        if effects is not None:
            effects.close()
        log.info("%s", stats_line(stats, proxy))


def main(args: Any) -> int:
    """``tencrypt dns``: the proxy alone. Routes are applied only when setup's state is there
    and tenc0 exists; with explicit --upstream/--domain and no setup it only classifies."""
    pod = _load_pod(args.state_dir)
    config = resolve_config(args, pod)
    asyncio.run(serve(config, Stats(), pod if pod is not None and _tun_exists(pod.tun) else None))
    return 0


__all__ = ["main", "resolve_config", "serve", "stats_line"]
