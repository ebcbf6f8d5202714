"""The agent's probes and node-level metrics (``tencrypt agent --metrics ADDR:PORT``).

Rules:
1. Liveness: the agent's loop turns at least every ``TICK`` (agent.py) and beats each turn;
   a loop that has not beaten for ``STALE_AFTER`` seconds is stuck (a hung API call, a
   deadlock) and the kubelet should restart the container. Proxies outlive that restart
   (``--on-exit keep``): the next agent adopts them.
2. Readiness: every kind of object has been listed once, the cluster's ranges are known, and
   one pass has reconciled the node's pods; before that the agent has not yet put the node
   in the state the cluster wants.
3. The HTTP thread only reads: counts are taken from a copy (``list(...)``) of what the loop
   owns, never iterated live.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tencrypt import fastpath
from tencrypt.core import exposition
from tencrypt.core.stats import Counter, Stats
from tencrypt.linux import procstat

# every counter the agent keeps, present from start at 0 (their help: core/stats.py)
COUNTERS = tuple(c for c in Counter if c.startswith("agent_"))
STALE_AFTER = 120.0  # seconds without a loop turn before liveness fails (rule 1)
PHASES = ("starting", "ready", "dead")


@dataclass(slots=True)
class Health:
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    stale_after: float = STALE_AFTER
    beat_at: float | None = None
    passes: int = 0
    last_pass_wall: float = 0.0
    started: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def beat(self) -> None:
        """One turn of the agent's loop."""
        self.beat_at = self.clock()

    def passed(self) -> None:
        """One pass reconciled the node's pods."""
        self.passes += 1
        self.last_pass_wall = self.wall()

    def live(self) -> tuple[bool, str]:
        now = self.clock()
        since = now - (self.beat_at if self.beat_at is not None else self.started)
        if since > self.stale_after:
            return False, f"the agent's loop has not turned for {since:.0f} s (stuck)"
        return True, "ok"


def readiness(listed_all: bool, ranges_known: bool, passes: int) -> tuple[bool, str]:
    """Rule 2, with what is still missing."""
    if not listed_all:
        return False, "not every kind of object has been listed from the API yet"
    if not ranges_known:
        return False, "the cluster's Service and pod ranges are not known yet"
    if passes == 0:
        return False, "no pass has reconciled this node's pods yet"
    return True, "ok"


def render(
    phases: Iterable[str],
    stats: Stats,
    ready: bool,
    health: Health,
    projects_with_keys: int,
) -> str:
    """The agent's own /metrics (families declared in core/exposition.py), with build info
    and the process_* families."""
    count = dict.fromkeys(PHASES, 0)
    for phase in phases:
        count[phase] = count.get(phase, 0) + 1
    lines = [
        *exposition.family("tencrypt_agent_proxies", [((p,), c) for p, c in sorted(count.items())]),
        *exposition.family("tencrypt_agent_ready", [((), 1 if ready else 0)]),
        *exposition.family("tencrypt_agent_passes_total", [((), health.passes)]),
        *exposition.family(
            "tencrypt_agent_last_pass_timestamp_seconds", [((), health.last_pass_wall)]
        ),
        *exposition.family("tencrypt_agent_project_keys", [((), projects_with_keys)]),
        *exposition.render_counters(stats, COUNTERS),
    ]
    return exposition.text(lines) + procstat.render_runtime(fastpath.built())
