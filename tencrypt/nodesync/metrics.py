"""node-sync's metrics, in the Prometheus text format (pure: numbers in, text out).

- ``tencrypt_nodesync_sync_duration_seconds{backend,mode}``: a histogram of the time one
  sync took to program the node (``mode``: ``full`` — start-up, resync, after a failure —
  or ``partial`` — one transaction of what changed);
- ``tencrypt_nodesync_programmed_elements{backend}``: what the node holds after the last
  sync (nft: Service chains plus map elements; iptables: rules);
- ``tencrypt_nodesync_last_success_timestamp_seconds``: wall-clock time of the last sync
  that succeeded (alert when it falls behind);
- ``tencrypt_nodesync_sync_failures_total``: syncs that failed (retried, then full).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        out = [f"# HELP {name} Time one sync took to program the node.", f"# TYPE {name} histogram"]
        for mode in MODES:
            labels = f'backend="{self.backend}",mode="{mode}"'
            total = 0
            for bound, count in zip((*BUCKETS, float("inf")), self.counts[mode], strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
            out.append(f"{name}_sum{{{labels}}} {self.sums[mode]:.6f}")
            out.append(f"{name}_count{{{labels}}} {total}")
        out += [
            "# HELP tencrypt_nodesync_programmed_elements Chains, map elements or rules "
            "the node holds after the last sync.",
            "# TYPE tencrypt_nodesync_programmed_elements gauge",
            f'tencrypt_nodesync_programmed_elements{{backend="{self.backend}"}} {self.elements}',
            "# HELP tencrypt_nodesync_last_success_timestamp_seconds When the last sync "
            "succeeded (Unix time).",
            "# TYPE tencrypt_nodesync_last_success_timestamp_seconds gauge",
            f"tencrypt_nodesync_last_success_timestamp_seconds {self.last_success:.3f}",
            "# HELP tencrypt_nodesync_sync_failures_total Syncs that failed.",
            "# TYPE tencrypt_nodesync_sync_failures_total counter",
            f"tencrypt_nodesync_sync_failures_total {self.failures}",
        ]
        return "\n".join(out) + "\n"
