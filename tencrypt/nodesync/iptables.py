"""The shell that writes node-sync's rules into a node's nat table.

Stages of one ``apply``:

1. read the nat table (``iptables-save -t nat``): what is there decides only which stale
   Tencrypt chains to delete and whether the hook jumps exist;
2. write the whole desired state in one ``iptables-restore --noflush`` (atomic per table: a
   packet sees the old rules or the new ones, never half of them);
3. delete the UDP conntrack entries of (VIP, endpoint) pairs that step 1 saw and the new
   rules no longer hold. The tunnel is one long-lived UDP flow per pair of pods
   (pod:1337 → VIP:1337): conntrack would keep sending it to the replaced pod for as long as
   it is refreshed. kube-proxy does the same for UDP Services. TCP flows are left alone;
   they fail over by reconnecting.

``netns`` runs every command inside a named network namespace (the lab's node); ``iptables``
picks the backend kube-proxy uses on the node (``iptables``, ``iptables-nft`` or
``iptables-legacy``): its ``-save`` and ``-restore`` companions are used.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError
from tencrypt.linux import netns as nsutil
from tencrypt.nodesync.cluster import ServiceBackends, load_list
from tencrypt.nodesync.kubeobjects import build_list
from tencrypt.nodesync.rules import (
    TUNNEL_PORT,
    build_cleanup,
    build_restore,
    pairs,
    parse_programmed,
)

log = logging.getLogger(__name__)

_DELETED = re.compile(r"(\d+) flow entries have been deleted")


class IptablesApplier:
    def __init__(self, netns: str | None = None, iptables: str = "iptables",
                 port: int = TUNNEL_PORT, stats: Stats | None = None) -> None:
        self.netns = netns
        self.iptables = iptables
        self.port = port
        self.stats = stats if stats is not None else Stats()
        self._conntrack_missing_logged = False

    def _run(self, argv: Sequence[str], input: str | None = None, check: bool = True):
        full = nsutil.exec_argv(self.netns, argv) if self.netns else list(argv)
        return nsutil.sh(full, input=input, check=check, timeout=60)

    def save(self) -> str:
        return self._run([f"{self.iptables}-save", "-t", "nat"]).stdout

    def apply(self, backends: Sequence[ServiceBackends]) -> str:
        """Make the nat table forward exactly ``backends``; returns the restore text used."""
        existing = self.save()
        text = build_restore(backends, existing, self.port)
        self._run([f"{self.iptables}-restore", "--noflush"], input=text)
        self.stats.inc("nodesync_applied")
        for vip, ip in sorted(parse_programmed(existing) - pairs(backends)):
            self.flush_conntrack(vip, ip)
        return text

    def cleanup(self) -> None:
        """Remove chain TENCRYPT, its sub-chains and the jumps to it."""
        existing = self.save()
        text = build_cleanup(existing)
        if text:
            self._run([f"{self.iptables}-restore", "--noflush"], input=text)
        for vip, ip in sorted(parse_programmed(existing)):
            self.flush_conntrack(vip, ip)

    def flush_conntrack(self, vip: str, endpoint: str) -> None:
        """Forget UDP flows to ``vip``:port that were DNATed to ``endpoint``."""
        if shutil.which("conntrack") is None:
            if not self._conntrack_missing_logged:
                log.warning("conntrack(8) not found: UDP flows to a replaced endpoint stay on "
                            "it until they idle out (install the conntrack package)")
                self._conntrack_missing_logged = True
            return
        argv = ["conntrack", "-D", "-p", "udp", "--orig-dst", vip, "--orig-port-dst",
                str(self.port), "--dst-nat", endpoint]
        try:
            proc = self._run(argv, check=False)
        except SetupError as exc:  # timed out: stale flows idle out by themselves
            log.warning("%s", exc)
            return
        # conntrack exits 1 when nothing matched ("0 flow entries have been deleted")
        deleted = _DELETED.search(proc.stderr)
        if deleted is None:
            log.warning("conntrack -D for %s -> %s failed: %s", vip, endpoint,
                        proc.stderr.strip())
        elif int(deleted.group(1)):
            self.stats.inc("nodesync_conntrack_deleted", int(deleted.group(1)))
            log.info("forgot %s UDP flows %s:%d -> %s", deleted.group(1), vip, self.port,
                     endpoint)


def program_objects(objects: Iterable[dict[str, Any]], netns: str | None = None,
                    port: int = TUNNEL_PORT, iptables: str = "iptables") -> list[ServiceBackends]:
    """Program a node from Kubernetes objects (``kubeobjects.lab_objects(services)`` for the
    lab) through the path a real node takes: objects → ClusterState → rules → restore."""
    state = load_list(build_list(objects), Stats())
    desired = state.desired()
    IptablesApplier(netns, iptables, port, state.stats).apply(desired)
    return desired
