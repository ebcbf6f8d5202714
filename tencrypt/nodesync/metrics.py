"""node-sync's metrics, in the Prometheus text format (``SyncMetrics.render`` is pure).

- ``tencrypt_nodesync_sync_duration_seconds{backend,mode}``: a histogram of the time one
  sync took to program the node (``mode``: ``full`` — start-up, resync, after a failure —
  or ``partial`` — one transaction of what changed);
- ``tencrypt_nodesync_programmed_elements{backend}``: what the node holds after the last
  sync (nft: Service chains plus map elements; iptables: rules);
- ``tencrypt_nodesync_last_success_timestamp_seconds``: wall-clock time of the last sync
  that succeeded (alert when it falls behind);
- ``tencrypt_nodesync_sync_failures_total``: syncs that failed (retried, then full);
- ``render`` adds node-sync's event counters (``tencrypt_nodesync_*_total``), build info and the
  ``process_*`` families (linux/procstat.py), with HELP and TYPE from core/exposition.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tencrypt.core import exposition
from tencrypt.core.stats import NODESYNC_COUNTERS, Stats
from tencrypt.linux import procstat

BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
MODES = ("full", "partial")


@dataclass(slots=True)
class SyncMetrics:
    backend: str
    counts: dict[str, list[int]] = field(
        default_factory=lambda: {m: [0] * (len(BUCKETS) + 1) for m in MODES}
    )
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))
    elements: int = 0
    last_success: float = 0.0
    failures: int = 0
    failing: bool = False  # the last sync failed (cleared by the next that succeeds)

    def observe(self, mode: str, seconds: float, elements: int, now: float) -> None:
        """One sync that succeeded: its duration, what it left programmed, when."""
        slot = next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))
        self.counts[mode][slot] += 1
        self.sums[mode] += seconds
        self.elements, self.last_success = elements, now
        self.failing = False

    def failed(self) -> None:
        self.failures += 1
        self.failing = True

    def ready(self) -> tuple[bool, str]:
        """Readiness: the node holds what the cluster wants. Not before the first sync has
        programmed it, and not while syncs fail (the forwarding is then stale)."""
        if self.failing:
            return False, "the last sync failed: the node's forwarding may be stale (see log)"
        if not self.last_success:
            return False, "no sync has programmed the node yet"
        return True, "ok"

    def render(self) -> str:
        name = "tencrypt_nodesync_sync_duration_seconds"
        out = exposition.header(name)
        for mode in MODES:
            total = 0
            for bound, count in zip((*BUCKETS, float("inf")), self.counts[mode], strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(
                    exposition.sample(name, (self.backend, mode), total, "_bucket", f'le="{le}"')
                )
            out.append(exposition.sample(name, (self.backend, mode), self.sums[mode], "_sum"))
            out.append(exposition.sample(name, (self.backend, mode), total, "_count"))
        out += exposition.family(
            "tencrypt_nodesync_programmed_elements", [((self.backend,), self.elements)]
        )
        out += exposition.family(
            "tencrypt_nodesync_last_success_timestamp_seconds", [((), self.last_success)]
        )
        out += exposition.family("tencrypt_nodesync_sync_failures_total", [((), self.failures)])
        return exposition.text(out)


def render(metrics: SyncMetrics, stats: Stats, fastpath: str) -> str:
    """All of node-sync's /metrics: its syncs, its counters (``NODESYNC_COUNTERS`` from start),
    build info and process (``fastpath``: whether the compiled extension is there)."""
    return (
        metrics.render()
        + exposition.text(exposition.render_counters(stats, NODESYNC_COUNTERS))
        + procstat.render_runtime(fastpath)
    )
