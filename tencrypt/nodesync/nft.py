"""The shell that writes node-sync's rules with nftables (table ``inet tencrypt``).

Stages of one ``apply``:

1. full (the first sync of a process, every resync, and after any failure): at the first
   one (or after a failure) read the table the node holds (``nft list table``: which (VIP,
   endpoint) pairs a previous run forwarded, for step 3); write the whole table in one
   ``nft -f`` transaction
   (``nftrules.full_text``); then remove the iptables backend's chain TENCRYPT if a previous
   run left one (switching backends leaves nothing stale; ours runs first meanwhile);
   incremental (otherwise): one ``nft -f`` transaction of ``nftrules.diff`` between what this
   process last programmed and what is wanted now — a changed Service is a few lines,
   whatever the size of the cluster. Nothing to change: nothing is run.
2. nft applies a transaction atomically: a packet sees the old rules or the new ones. An
   incremental one goes through libnftables in this process (``libnft.Library``: no
   process per transaction, ~0.1 ms instead of ~16 ms for a changed endpoint; ``nft -f``
   where the library cannot be loaded); a full one through ``nft -f``, whose parse of
   50,000 elements (~70 MB at 10,000 Services) is then freed with its process instead of
   raising node-sync's own peak (the time is the same).
3. UDP conntrack entries of (VIP, endpoint) pairs no longer forwarded are deleted, as in
   the iptables backend (the tunnel is one long-lived UDP flow per pair of pods).

No command has a timeout (``command.run``): a transaction that takes long is logged with its
duration by the syncer, never killed half-way.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Collection, Sequence

from tencrypt.core.stats import Counter, Stats
from tencrypt.errors import SetupError
from tencrypt.nodesync.cluster import ServiceBackends
from tencrypt.nodesync.command import run
from tencrypt.nodesync.iptables import IptablesApplier
from tencrypt.nodesync.libnft import Library
from tencrypt.nodesync.nftrules import (
    EMPTY,
    FAMILY,
    TABLE,
    TUNNEL_PORT,
    ModelError,
    Program,
    cleanup_text,
    diff,
    full_text,
    lost_pairs,
    pairs,
    parse_listing,
    program_of,
    render,
    updated,
)

log = logging.getLogger(__name__)


def available(netns: str | None = None) -> bool:
    """nft is installed and the kernel answers it (nf_tables is there)."""
    if shutil.which("nft") is None:
        return False
    try:
        return run(["nft", "list", "tables"], netns, check=False).returncode == 0
    except SetupError:
        return False


class NftApplier:
    name = "nft"

    def __init__(
        self,
        netns: str | None = None,
        port: int = TUNNEL_PORT,
        stats: Stats | None = None,
        iptables: str = "iptables",
        library: bool = True,
    ) -> None:
        self.netns, self.port = netns, port
        self.stats = stats if stats is not None else Stats()
        self.xtables = IptablesApplier(netns, iptables, port, self.stats)  # conntrack, cleanup
        self.applied: Program | None = None  # what this process last programmed
        self.library = library  # try libnftables first (False: always `nft -f`)
        self._lib: Library | None = None

    @property
    def size(self) -> int:
        return self.applied.size if self.applied else 0

    def listing(self) -> Program:
        """What the node's table holds now (empty if there is none)."""
        proc = run(["nft", "list", "table", FAMILY, TABLE], self.netns, check=False)
        if proc.returncode != 0:
            return EMPTY
        try:
            return parse_listing(proc.stdout)
        except ModelError as exc:  # edited by hand: the full sync replaces it all the same
            log.warning("table %s %s is not one node-sync wrote (%s)", FAMILY, TABLE, exc)
            return EMPTY

    def plan(self, backends: Sequence[ServiceBackends], full: bool = False) -> str:
        """The transaction ``apply`` would run now (``--dry-run``)."""
        new = program_of(backends, self.port)
        if full or self.applied is None:
            return full_text(new)
        return render(diff(self.applied, new))

    def apply(
        self,
        backends: Sequence[ServiceBackends],
        full: bool = False,
        touched: Collection[str] | None = None,
    ) -> str:
        """Make the table forward exactly ``backends``; returns the transaction run.
        ``touched`` (a partial sync): the VIPs that may have changed since the last apply,
        so only those are looked at (``nftrules.updated``, ``diff(only=)``)."""
        if full or self.applied is None or touched is None:
            new, touched = program_of(backends, self.port), None
        else:
            new = updated(self.applied, backends, touched)
        full = full or self.applied is None
        if full:  # what a previous process left is read; our own last program is known
            before = self.listing() if self.applied is None else self.applied
            text, lost = full_text(new), pairs(before) - pairs(new)
        else:
            assert self.applied is not None
            ops = diff(self.applied, new, only=touched)
            text, lost = render(ops), lost_pairs(self.applied, new, ops)
        if text:
            self.applied = None  # until it succeeded: a failure makes the next sync full
            self._transaction(text, small=not full)
            self.stats.inc(Counter.NODESYNC_APPLIED)
        self.applied = new
        if full:  # after ours is in place: the VIPs are forwarded throughout the switch
            self._remove_iptables_chains()
        for vip, ip in sorted(lost):
            self.xtables.flush_conntrack(vip, ip)
        return text

    def _transaction(self, text: str, small: bool = True) -> None:
        if small and self.library and self._lib is None:
            self._lib = Library.open(self.netns)
            self.library = self._lib is not None
        if small and self._lib is not None:
            self._lib.run(text)
        else:
            run(["nft", "-f", "-"], self.netns, input=text)

    def cleanup(self) -> None:
        """Remove the table (every chain, map and hook of it)."""
        before = self.listing()
        run(["nft", "-f", "-"], self.netns, input=cleanup_text())
        self.applied = None
        for vip, ip in sorted(pairs(before)):
            self.xtables.flush_conntrack(vip, ip)

    def _remove_iptables_chains(self) -> None:
        try:
            if "TENCRYPT" in self.xtables.save():
                log.info("removing the iptables backend's chain TENCRYPT (now nftables)")
                self.xtables.cleanup(flush=False)
        except SetupError as exc:  # no iptables on the node: nothing of it to remove
            log.debug("iptables backend not checked: %s", exc)
