"""`tencrypt run`: the composition root of the proxy (DESIGN §2, STYLE "daemon.py").

``serve`` reads the configuration setup recorded and the flags, opens the devices and sockets
(``ports.open_ports``), builds the classification table once (the DNS proxy writes it, the data
path reads it) and the clocks, hands all of it to ``daemon.Proxy``, serves ``/metrics`` and
``/status`` if asked, prints "tencrypt: ready" (what the agent and the lab wait for), and on
SIGTERM/SIGINT stops in order: the readers, the DNS proxy, the tasks, the ports. ``main`` runs
it on asyncio's own event loop with the polling selector (linux/spin.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tencrypt.core.keyring import KeyRing
from tencrypt.core.session import Limits
from tencrypt.core.stats import Stats
from tencrypt.daemon import NO_STRICT_GIVE_UP, Proxy
from tencrypt.errors import SetupError
from tencrypt.linux import allocator
from tencrypt.linux.effects import Kernel
from tencrypt.linux.keyfile import LOADED_FILE, describe, read_keys, write_loaded
from tencrypt.linux.members import MembersFile
from tencrypt.linux.spin import SpinSelector
from tencrypt.ports import open_ports

log = logging.getLogger("tencrypt.run")


async def serve(args: argparse.Namespace, selector: SpinSelector | None = None) -> int:
    from tencrypt.linux import metrics, podnet
    from tencrypt.linux.dns import DnsConfig, DnsProxy, class_table

    setup_state = podnet.load_state(args.state_dir)  # refuses a dead namespace's state
    config = dataclasses.replace(setup_state.config, port=args.port)
    tuned = allocator.tune()  # before the data path allocates anything
    log.info("allocator: %s", tuned or "not glibc: left as it is")
    stats = Stats()
    keys, keyfile = read_keys(args, stats)
    log.info("project keys: %s", describe(keys))
    strict = True if args.strict is None else args.strict
    limits = Limits()
    give_up = args.handshake_give_up or (None if strict else NO_STRICT_GIVE_UP)
    if give_up is not None:
        limits = dataclasses.replace(limits, handshake_give_up=give_up)
    if args.session_lifetime:
        limits = dataclasses.replace(
            limits,
            reject_after_time=args.session_lifetime,
            rekey_after_time=args.session_lifetime * 2 / 3,
        )
    state_dir = podnet.namespace_state_dir(args.state_dir)
    # the file named here, else the one setup was given; none: standalone (never a file found
    # in the state directory, which a dead namespace with this inode may have left)
    members_path = args.members_file or setup_state.members_file
    dns = DnsConfig.from_pod(config)
    table = class_table(dns, stats)  # one classification: the DNS proxy writes, the data path reads
    proxy = Proxy(
        config,
        KeyRing.from_keys(keys, X25519PrivateKey.generate),
        strict,
        stats,
        open_ports(config, stats, args.batch),
        DnsProxy(dns, stats, table=table),
        Kernel(config, firewall=strict),
        limits=limits,
        batch=args.batch,
        express=getattr(args, "express", True),
        members=MembersFile(Path(members_path)) if members_path else None,
        keyfile=keyfile,
        clock=time.monotonic,
        wall=time.time,
        selector=selector,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload_keys)  # re-read the key file now
    pid_file = state_dir / podnet.PID_FILE
    proxy.loaded_dir = state_dir
    write_loaded(state_dir, keys)
    await proxy.start()
    servers = []
    socket_path = state_dir / metrics.SOCKET_FILE
    try:  # a metrics address that cannot be bound stops the proxy as SIGTERM would
        # the node's view (agent, `tencrypt status --node`): always, no port in the pod; an
        # observer's convenience, so a socket that cannot be made is logged, never fatal
        try:
            servers.append(
                await metrics.serve_unix(socket_path, proxy.render_metrics, proxy.status)
            )
        except SetupError as exc:
            log.warning("%s: the node agent will not see this proxy's metrics", exc)
        if args.metrics:
            servers.append(await metrics.serve(args.metrics, proxy.render_metrics, proxy.status))
        pid_file.write_text(f"{os.getpid()}\n")
        print(
            f"tencrypt: ready: pod {config.pod_ip}, project {config.domain}, "
            f"udp :{config.port}, {'strict' if strict else 'not strict'}",
            file=sys.stderr,
            flush=True,
        )
        await proxy.timers()
    finally:
        log.info("shutting down")
        for server in servers:
            server.close()
        socket_path.unlink(missing_ok=True)
        await proxy.stop()
        pid_file.unlink(missing_ok=True)
        (state_dir / LOADED_FILE).unlink(missing_ok=True)  # no proxy: no ring loaded
    log.info("stopped; counters: %s", proxy.stats.counters)
    return 0


def main(args: argparse.Namespace) -> int:
    # asyncio's own loop, not uvloop: measured on the lab, the same throughput and ping, about
    # 10 µs more per request/response, and 3.4 MB less RSS per proxy (uvloop and the ssl it
    # needs; cli.keep_out keeps ssl out). Measured again on the sparse shape (issue 26,
    # bench/results/uvloop.md): uvloop ~3 % faster, inside the noise, +3.3 MB, and no polling
    # window. Its selector polls a while before sleeping (spin.py).
    spin = args.spin_us / 1e6

    selector = SpinSelector(spin)  # the express lane's wait serves its readiness through it

    def new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(selector)

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(serve(args, selector))
