"""The shell that writes node-sync's rules into a node's nat table.

Stages of one ``apply``:

1. full (the first sync of a process, every resync, after any failure): read the nat table
   (``iptables-save -t nat``): what is there decides only which stale Tencrypt chains to
   delete and whether the hook jumps exist; then write the whole desired state in one
   ``iptables-restore --noflush`` (atomic per table: a packet sees the old rules or the new
   ones, never half of them), and remove the nft backend's table if a previous run left one;
   partial (otherwise): ``rules.build_partial`` against what this process last programmed,
   rewriting only chain TENCRYPT and the chains of Services that changed (nothing at all if
   nothing did);
2. delete the UDP conntrack entries of (VIP, endpoint) pairs forwarded before and not now. The tunnel is one long-lived UDP flow per pair of pods
   (pod:1337 → VIP:1337): conntrack would keep sending it to the replaced pod for as long as
   it is refreshed. kube-proxy does the same for UDP Services. TCP flows are left alone;
   they fail over by reconnecting.

``netns`` runs every command inside a named network namespace (the lab's node); ``iptables``
picks the backend kube-proxy uses on the node (``iptables``, ``iptables-nft`` or
``iptables-legacy``): its ``-save`` and ``-restore`` companions are used. No command has a
timeout (``command.run``): a long sync is logged with its duration, never killed half-way.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Collection, Sequence

from tencrypt.core.stats import Counter, Stats
from tencrypt.errors import SetupError
from tencrypt.nodesync.cluster import ServiceBackends
from tencrypt.nodesync.command import run
from tencrypt.nodesync.rules import (
    TUNNEL_PORT,
    build_cleanup,
    build_partial,
    build_restore,
    pairs,
    parse_programmed,
)

log = logging.getLogger(__name__)

_DELETED = re.compile(r"(\d+) flow entries have been deleted")


class IptablesApplier:
    name = "iptables"

    def __init__(
        self,
        netns: str | None = None,
        iptables: str = "iptables",
        port: int = TUNNEL_PORT,
        stats: Stats | None = None,
    ) -> None:
        self.netns = netns
        self.iptables = iptables
        self.port = port
        self.stats = stats if stats is not None else Stats()
        self._conntrack_missing_logged = False
        self.applied: list[ServiceBackends] | None = None  # what this process last programmed

    @property
    def size(self) -> int:
        """Rules programmed: two per VIP in TENCRYPT, one per endpoint in its SVC chain, two
        in each SEP chain."""
        if not self.applied:
            return 0
        return sum(2 + 3 * len(b.endpoints) for b in self.applied if b.endpoints)

    def _run(
        self, argv: Sequence[str], input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(argv, self.netns, input=input, check=check)

    def save(self) -> str:
        return str(self._run([f"{self.iptables}-save", "-t", "nat"]).stdout)

    def plan(self, backends: Sequence[ServiceBackends], full: bool = False) -> str:
        """The restore text ``apply`` would use now (``--dry-run``)."""
        if full or self.applied is None:
            try:
                existing = self.save()
            except SetupError:  # a dry run must work without privileges too
                existing = ""
            return build_restore(backends, existing, self.port)
        return build_partial(self.applied, backends, self.port)

    def apply(
        self,
        backends: Sequence[ServiceBackends],
        full: bool = False,
        touched: Collection[str] | None = None,
    ) -> str:
        """Make the nat table forward exactly ``backends``; returns the restore text used.
        ``touched`` is not needed: ``build_partial`` compares per Service anyway."""
        backends = list(backends)
        full = full or self.applied is None
        if full:
            existing = self.save()
            before = parse_programmed(existing)
            text = build_restore(backends, existing, self.port)
        else:
            assert self.applied is not None
            before = pairs(self.applied)
            text = build_partial(self.applied, backends, self.port)
        if text:
            self.applied = None  # until it succeeded: a failure makes the next sync full
            self._run([f"{self.iptables}-restore", "--noflush"], input=text)
            self.stats.inc(Counter.NODESYNC_APPLIED)
        self.applied = backends
        if full:
            self._remove_nft_table()
        for vip, ip in sorted(before - pairs(backends)):
            self.flush_conntrack(vip, ip)
        return text

    def cleanup(self, flush: bool = True) -> None:
        """Remove chain TENCRYPT, its sub-chains and the jumps to it (and, with ``flush``,
        the UDP flows they forwarded)."""
        existing = self.save()
        text = build_cleanup(existing)
        if text:
            self._run([f"{self.iptables}-restore", "--noflush"], input=text)
        self.applied = None
        for vip, ip in sorted(parse_programmed(existing)) if flush else ():
            self.flush_conntrack(vip, ip)

    def _remove_nft_table(self) -> None:
        """The nft backend's table, if a previous run left one (a backend switch)."""
        if shutil.which("nft") is None:
            return
        if self._run(["nft", "list", "table", "inet", "tencrypt"], check=False).returncode:
            return
        log.info("removing the nft backend's table inet tencrypt (now iptables)")
        self._run(["nft", "delete", "table", "inet", "tencrypt"], check=False)

    def flush_conntrack(self, vip: str, endpoint: str) -> None:
        """Forget UDP flows to ``vip``:port that were DNATed to ``endpoint``."""
        if shutil.which("conntrack") is None:
            if not self._conntrack_missing_logged:
                log.warning(
                    "conntrack(8) not found: UDP flows to a replaced endpoint stay on "
                    "it until they idle out (install the conntrack package)"
                )
                self._conntrack_missing_logged = True
            return
        argv = [
            "conntrack",
            "-D",
            "-p",
            "udp",
            "--orig-dst",
            vip,
            "--orig-port-dst",
            str(self.port),
            "--dst-nat",
            endpoint,
        ]
        try:
            proc = self._run(argv, check=False)
        except SetupError as exc:  # timed out: stale flows idle out by themselves
            log.warning("%s", exc)
            return
        # conntrack exits 1 when nothing matched ("0 flow entries have been deleted")
        deleted = _DELETED.search(proc.stderr)
        if deleted is None:
            log.warning("conntrack -D for %s -> %s failed: %s", vip, endpoint, proc.stderr.strip())
        elif int(deleted.group(1)):
            self.stats.inc(Counter.NODESYNC_CONNTRACK_DELETED, int(deleted.group(1)))
            log.info("forgot %s UDP flows %s:%d -> %s", deleted.group(1), vip, self.port, endpoint)
