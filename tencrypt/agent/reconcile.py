"""Wanted proxies vs. running proxies → actions: the agent's pure core.

The shell reports what it sees (``on_desired``, ``on_started``, ``on_ready``, ``on_exited``,
``on_stopped``, ``on_adopted``) with ``now`` from its clock, and asks ``plan(now)`` what to
do; the core never calls into I/O.

Rules:
- One ``Entry`` per pod that has, or had, a proxy on this node, keyed by pod uid: the sandbox
  it was started in, the key ring its key file holds, its phase (STARTING → READY, or DEAD).
- Nothing is planned before the first ``on_desired``: the shell calls it once Pods and
  Namespaces have both been listed, because a partial view would stop every proxy on the
  node.
- A wanted pod without an entry starts once its sandbox is resolved and its project's key is
  known (START).
- An entry is stopped (STOP: terminate, undo the namespace, forget the entry) when its pod is
  no longer wanted; when its sandbox is gone or replaced (a sandbox is its network
  namespace: same inode, same sandbox, whatever PID reaches it). A pod still wanted then
  starts afresh at the next plan, in its new sandbox.
- A change of the project's keys never stops a proxy (issue 14): the shell rewrites the key
  file, the proxy re-reads it within a second, and the entry notes the new ring.
- While a project's key is unknown (Secret missing or unreadable), a running proxy keeps the
  key it has and nothing new starts: a failing GET must not unpatch pods.
- A proxy that exits on its own is DEAD and restarted after ``backoff * 2**(n-1)`` seconds,
  capped at ``backoff_max``, n being its consecutive failures; n starts again from zero once
  a proxy has stayed READY for ``stable`` seconds. The restart undoes the namespace first
  (``undo_first``): a dead proxy leaves tenc0, its routes and resolv.conf behind.
- A proxy that is not ready ``ready_timeout`` seconds after its start is killed (KILL) and
  that counts as a failure.
- Adopted entries (proxies a previous agent started, found in its records) take the phase
  the shell found them in: READY (running and ready), STARTING (running, not ready yet: the
  ready timeout runs from the adoption), or DEAD (due at once).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from tencrypt.core.stats import Counter, Stats


@dataclass(slots=True, frozen=True)
class Sandbox:
    pid: int  # a process in the pod's network namespace: the handle nsenter uses
    netns: int  # that namespace's inode number: the sandbox's identity


@dataclass(slots=True, frozen=True)
class Want:
    """A pod that should run a proxy, with what is known so far of its sandbox and key."""

    uid: str
    namespace: str
    name: str
    sandbox: Sandbox | None = None
    key_id: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"


@dataclass(slots=True)
class Entry:
    uid: str
    namespace: str
    name: str
    sandbox: Sandbox  # where it was started
    key_id: str  # with which key
    phase: Phase
    since: float  # when this phase began
    failures: int = 0
    retry_at: float = 0.0

    @classmethod
    def of(cls, want: Want, phase: Phase, now: float, failures: int = 0) -> Entry:
        assert want.sandbox is not None and want.key_id is not None, "a proxy needs both"
        return cls(
            want.uid,
            want.namespace,
            want.name,
            want.sandbox,
            want.key_id,
            phase,
            now,
            failures,
            retry_at=now,
        )

    @property
    def want(self) -> Want:
        return Want(self.uid, self.namespace, self.name, self.sandbox, self.key_id)


class Verb(enum.Enum):
    START = "start"  # launch the proxy for ``want`` (undo the namespace first if asked)
    STOP = "stop"  # terminate it, undo the namespace, forget the entry
    KILL = "kill"  # terminate it and report ``on_exited``: a restart follows, with backoff


@dataclass(slots=True, frozen=True)
class Action:
    verb: Verb
    want: Want
    reason: str
    undo_first: bool = False


@dataclass(slots=True, frozen=True)
class Policy:
    ready_timeout: float = 30.0
    backoff: float = 1.0
    backoff_max: float = 60.0
    stable: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.backoff * 2 ** max(failures - 1, 0), self.backoff_max))


@dataclass(slots=True)
class Reconciler:
    policy: Policy = field(default_factory=Policy)
    stats: Stats = field(default_factory=Stats)
    entries: dict[str, Entry] = field(default_factory=dict)
    wants: dict[str, Want] | None = None  # None until the first complete view

    # -- what the shell saw ----------------------------------------------------------------

    def on_desired(self, wants: Iterable[Want]) -> None:
        self.wants = {w.uid: w for w in wants}
        for uid, entry in self.entries.items():
            want = self.wants.get(uid)
            sandbox = want.sandbox if want else None
            # same namespace reached through another process (a container restarted): keep
            # the newest handle for the undo, it is the same sandbox
            if sandbox and sandbox.netns == entry.sandbox.netns:
                entry.sandbox = sandbox
            if want and want.key_id is not None:  # the key file now holds this ring
                entry.key_id = want.key_id

    def on_adopted(self, want: Want, phase: Phase, now: float) -> None:
        self.entries[want.uid] = Entry.of(want, phase, now)
        self.stats.inc(
            Counter.AGENT_PROXIES_FOUND_DEAD
            if phase is Phase.DEAD
            else Counter.AGENT_PROXIES_ADOPTED
        )

    def on_started(self, want: Want, now: float) -> None:
        old = self.entries.get(want.uid)
        self.entries[want.uid] = Entry.of(
            want, Phase.STARTING, now, failures=old.failures if old else 0
        )
        self.stats.inc(Counter.AGENT_PROXY_STARTS)

    def on_ready(self, uid: str, now: float) -> None:
        entry = self.entries.get(uid)
        if entry and entry.phase is Phase.STARTING:
            entry.phase, entry.since = Phase.READY, now

    def on_exited(self, uid: str, now: float) -> None:
        """The proxy is gone (it died, failed to start, or was killed by a KILL)."""
        entry = self.entries.get(uid)
        if entry is None or entry.phase is Phase.DEAD:
            return
        if entry.phase is Phase.READY and now - entry.since >= self.policy.stable:
            entry.failures = 0
        entry.failures += 1
        entry.phase, entry.since = Phase.DEAD, now
        entry.retry_at = now + self.policy.delay(entry.failures)
        self.stats.inc(Counter.AGENT_PROXY_EXITS)

    def on_stopped(self, uid: str) -> None:
        if self.entries.pop(uid, None) is not None:
            self.stats.inc(Counter.AGENT_PROXY_STOPS)

    # -- what the shell should do ----------------------------------------------------------

    def plan(self, now: float) -> list[Action]:
        if self.wants is None:
            return []
        actions = [a for uid, e in self.entries.items() if (a := self._check(e, now))]
        for uid, want in self.wants.items():
            if uid not in self.entries and want.sandbox and want.key_id:
                actions.append(Action(Verb.START, want, "new pod"))
        return actions

    def _check(self, entry: Entry, now: float) -> Action | None:
        assert self.wants is not None
        want, have = self.wants.get(entry.uid), entry.want
        if want is None:
            return Action(Verb.STOP, have, "pod gone or no longer enabled")
        if want.sandbox is None or want.sandbox.netns != entry.sandbox.netns:
            return Action(Verb.STOP, have, "sandbox gone or replaced")
        if entry.phase is Phase.STARTING and now - entry.since >= self.policy.ready_timeout:
            return Action(Verb.KILL, have, f"not ready after {self.policy.ready_timeout:g}s")
        if entry.phase is Phase.DEAD and now >= entry.retry_at:
            return Action(
                Verb.START,
                replace(have, sandbox=want.sandbox),
                "restart after exit",
                undo_first=True,
            )
        return None

    def next_deadline(self) -> float | None:
        """When ``plan`` may next have something to do without any new input."""
        times = [
            e.retry_at if e.phase is Phase.DEAD else e.since + self.policy.ready_timeout
            for e in self.entries.values()
            if e.phase is not Phase.READY
        ]
        return min(times, default=None)
