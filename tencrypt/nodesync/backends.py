"""Which backend programs the node, and programming a node from objects in one call.

Rules:
- ``auto`` (the default): nftables where the node's kernel has nf_tables and ``nft`` is
  installed (``nft list tables`` answers), else iptables. nftables is the one that scales
  (one map lookup per packet, a changed Service is one small transaction; see
  scripts/k8s/README.md); iptables stays for nodes without it (RHEL 7 / OpenShift 3.11 with
  iptables-legacy).
- Both backends remove what the other left on the node at their first (full) sync, so a
  node switched from one to the other holds no stale rule.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol

from tencrypt.core.stats import Stats
from tencrypt.errors import UsageError
from tencrypt.nodesync import nft
from tencrypt.nodesync.cluster import ServiceBackends, load_list
from tencrypt.nodesync.iptables import IptablesApplier
from tencrypt.nodesync.kubeobjects import build_list
from tencrypt.nodesync.rules import TUNNEL_PORT

BACKENDS = ("auto", "nft", "iptables")


class Applier(Protocol):
    name: str

    @property
    def size(self) -> int: ...

    def apply(
        self,
        backends: Sequence[ServiceBackends],
        full: bool = False,
        touched: Collection[str] | None = None,
    ) -> str: ...

    def plan(self, backends: Sequence[ServiceBackends], full: bool = False) -> str: ...

    def cleanup(self) -> None: ...


def choose(backend: str, netns: str | None = None) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "nft" if nft.available(netns) else "iptables"


def make_applier(
    backend: str,
    netns: str | None = None,
    iptables: str = "iptables",
    port: int = TUNNEL_PORT,
    stats: Stats | None = None,
) -> Applier:
    """The applier of ``backend`` (``auto`` resolved on this node)."""
    if choose(backend, netns) == "nft":
        return nft.NftApplier(netns, port, stats, iptables)
    return IptablesApplier(netns, iptables, port, stats)


def program_objects(
    objects: Iterable[dict[str, Any]],
    netns: str | None = None,
    port: int = TUNNEL_PORT,
    backend: str = "nft",
    iptables: str = "iptables",
) -> list[ServiceBackends]:
    """Program a node from Kubernetes objects (``kubeobjects.lab_objects(services)`` for the
    lab) through the path a real node takes: objects → ClusterState → rules → the backend."""
    state = load_list(build_list(objects), Stats())
    desired = state.desired()
    make_applier(backend, netns, iptables, port, state.stats).apply(desired, full=True)
    return desired
