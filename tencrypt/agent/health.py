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

from tencrypt import __version__
from tencrypt.core.stats import Counter

# every counter the agent keeps, present from start at 0, with what it counts
COUNTERS = {
    Counter.AGENT_PROXY_STARTS: "Proxies the agent started.",
    Counter.AGENT_PROXY_EXITS: "Proxies that exited without being asked to (restarted with "
    "back-off).",
    Counter.AGENT_PROXY_STOPS: "Proxies the agent stopped (pod gone, key or sandbox changed).",
    Counter.AGENT_PROXIES_ADOPTED: "Running proxies a previous agent started, adopted at start.",
    Counter.AGENT_PROXIES_FOUND_DEAD: "Proxies of a previous agent found dead at start.",
    Counter.AGENT_KEY_PROBLEMS: "Projects whose key Secret was missing or unreadable.",
    Counter.AGENT_MEMBERS_WRITE_FAILED: "Membership files the agent failed to write.",
    Counter.AGENT_BAD_OBJECT: "API objects the agent could not read (skipped).",
}
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
    node: str,
    phases: Iterable[str],
    counters: Callable[[Counter], int],
    ready: bool,
    health: Health,
    projects_with_keys: int,
) -> str:
    """The agent's /metrics: Prometheus text, HELP and TYPE for every family."""
    count = dict.fromkeys(PHASES, 0)
    for phase in phases:
        count[phase] = count.get(phase, 0) + 1
    n = f'node="{node}"'
    lines = [
        "# HELP tencrypt_agent_build_info The agent's version (always 1).",
        "# TYPE tencrypt_agent_build_info gauge",
        f'tencrypt_agent_build_info{{{n},version="{__version__}"}} 1',
        "# HELP tencrypt_agent_proxies Proxies this agent supervises on its node, by phase.",
        "# TYPE tencrypt_agent_proxies gauge",
        *(f'tencrypt_agent_proxies{{{n},phase="{p}"}} {c}' for p, c in sorted(count.items())),
        "# HELP tencrypt_agent_ready 1 once the agent has listed the cluster and reconciled "
        "its node (/readyz), else 0.",
        "# TYPE tencrypt_agent_ready gauge",
        f"tencrypt_agent_ready{{{n}}} {1 if ready else 0}",
        "# HELP tencrypt_agent_passes_total Passes that reconciled the node's pods.",
        "# TYPE tencrypt_agent_passes_total counter",
        f"tencrypt_agent_passes_total{{{n}}} {health.passes}",
        "# HELP tencrypt_agent_last_pass_timestamp_seconds When the last pass ended (Unix "
        "time; 0: none yet).",
        "# TYPE tencrypt_agent_last_pass_timestamp_seconds gauge",
        f"tencrypt_agent_last_pass_timestamp_seconds{{{n}}} {health.last_pass_wall:.3f}",
        "# HELP tencrypt_agent_project_keys Projects whose key ring the agent holds for its pods.",
        "# TYPE tencrypt_agent_project_keys gauge",
        f"tencrypt_agent_project_keys{{{n}}} {projects_with_keys}",
    ]
    for counter, text in COUNTERS.items():
        metric = f"tencrypt_{counter.value}_total"
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} counter"]
        lines.append(f"{metric}{{{n}}} {counters(counter)}")
    return "\n".join(lines) + "\n"
