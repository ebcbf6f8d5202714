"""A project's key rotation as pure functions: the Secret's shape, the three phases, and what
the node agents must report before the next phase may start.

The Secret ``tencrypt`` in the project's namespace holds the project's key ring::

    PROJECT_PSK           current: initiates handshakes, accepted   (required)
    PROJECT_PSK_NEXT      accepted, never initiates                 (phase 1 to phase 2)
    PROJECT_PSK_PREVIOUS  accepted, never initiates                 (phase 2 to phase 3)

each value, as every Secret value, the base64 of the 44-character base64 text that
``openssl rand -base64 32`` prints.

Rules:
1. The phases (``apply_phase``): ADD_NEXT stages a fresh key as next (refused while a next or a
   previous key is still there); PROMOTE makes next current and current previous; DROP_PREVIOUS
   removes previous. Every state in between is a valid ring, so a rotation interrupted at any
   point leaves a working project.
2. A phase may start only when every node's agent reports that every pod of the project on
   it has loaded the ring the last phase wrote (``progress``); pods one phase apart share a key
   (core/keyring.py), pods two phases apart do not. DROP_PREVIOUS also waits a grace time after
   PROMOTE was loaded everywhere, longer than a session's lifetime, so that every session made
   under the previous key has been re-keyed under the current one.
3. An agent reports in a ConfigMap of its own namespace named ``REPORT_PREFIX + node``,
   labelled ``REPORT_LABEL``, key ``REPORT_KEY``: JSON ``{"node": N, "updated": UNIX,
   "projects": {NS: {"pods": P, "loaded": {RING_LABEL: PODS}}}}`` where ``P`` counts the
   project's pods the agent runs a proxy for, and ``loaded`` how many of their proxies
   reported each ring (``psk.ring_label``: fingerprints only, never key bytes). A report that
   does not parse is treated as a node that has not caught up.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tencrypt.core.psk import KeySet, check_keyset, parse_psk, ring_label
from tencrypt.errors import UsageError

SECRET_NAME = "tencrypt"
SECRET_KEYS = {
    "current": "PROJECT_PSK",
    "next": "PROJECT_PSK_NEXT",
    "previous": "PROJECT_PSK_PREVIOUS",
}
PHASE_ANNOTATION = "tencrypt.io/rotation-phase"  # the last phase written
PHASE_AT_ANNOTATION = "tencrypt.io/rotation-phase-at"  # when (Unix seconds)
REPORT_PREFIX = "tencrypt-keys-"
REPORT_LABEL = ("tencrypt.io/report", "keys")
REPORT_KEY = "keys.json"


class Phase(enum.Enum):
    ADD_NEXT = "add-next"
    PROMOTE = "promote"
    DROP_PREVIOUS = "drop-previous"


def secret_keys(data: Mapping[str, Any] | None) -> KeySet:
    """The ring a Secret's ``data`` holds; ``UsageError`` naming the field (never its value)."""
    data = data or {}
    found: dict[str, bytes] = {}
    for role, name in SECRET_KEYS.items():
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise UsageError(f"Secret {SECRET_NAME}: {name} is not a string")
        try:
            text = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(
                f"Secret {SECRET_NAME}: {name} is not valid Secret data (base64)"
            ) from None
        try:
            found[role] = parse_psk(text)
        except UsageError as exc:  # its message never repeats key material (core/psk.py)
            raise UsageError(f"Secret {SECRET_NAME}: {name}: {exc}") from None
    if "current" not in found:
        raise UsageError(f"Secret {SECRET_NAME} has no {SECRET_KEYS['current']}")
    try:
        return check_keyset(KeySet(found["current"], found.get("next"), found.get("previous")))
    except UsageError as exc:
        raise UsageError(f"Secret {SECRET_NAME}: {exc}") from None


def secret_data(keys: KeySet) -> dict[str, str]:
    """``data`` of the Secret holding ``keys`` (roles not held are absent)."""
    return {
        SECRET_KEYS[role]: base64.b64encode(base64.b64encode(key) + b"\n").decode("ascii")
        for role, key in check_keyset(keys).roles()
    }


def apply_phase(keys: KeySet, phase: Phase, new_key: bytes | None = None) -> KeySet:
    """Rule 1: the ring after ``phase``; ``UsageError`` saying why it cannot run now."""
    if phase is Phase.ADD_NEXT:
        if keys.next is not None:
            raise UsageError("a next key is staged already: run --phase promote")
        if keys.previous is not None:
            raise UsageError("a previous key is still held: run --phase drop-previous first")
        if new_key is None:
            raise UsageError("add-next needs a new key")
        return check_keyset(KeySet(keys.current, next=new_key))
    if phase is Phase.PROMOTE:
        if keys.next is None:
            raise UsageError("no next key to promote: run --phase add-next first")
        return KeySet(keys.next, previous=keys.current)
    if keys.previous is None:
        raise UsageError("no previous key to drop")
    return KeySet(keys.current, next=keys.next)


def plan(keys: KeySet) -> list[Phase]:
    """``--all``: finish the rotation in progress, or run all three phases of a new one."""
    if keys.next is None and keys.previous is None:
        return [Phase.ADD_NEXT, Phase.PROMOTE, Phase.DROP_PREVIOUS]
    phases = [Phase.DROP_PREVIOUS] if keys.previous is not None else []
    if keys.next is not None:
        phases += [Phase.PROMOTE, Phase.DROP_PREVIOUS]
    return phases


# --- what the agents report -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    updated: float
    projects: dict[str, tuple[int, dict[str, int]]]  # namespace -> (pods, {ring label: pods})


def parse_report(text: str | None) -> NodeReport | None:
    """Rule 3's JSON, or None if it does not parse."""
    try:
        doc = json.loads(text or "")
        projects = {
            str(ns): (int(p["pods"]), {str(label): int(n) for label, n in p["loaded"].items()})
            for ns, p in doc["projects"].items()
        }
        return NodeReport(str(doc["node"]), float(doc["updated"]), projects)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def render_report(report: NodeReport) -> str:
    return json.dumps(
        {
            "node": report.node,
            "updated": report.updated,
            "projects": {
                ns: {"pods": pods, "loaded": loaded}
                for ns, (pods, loaded) in sorted(report.projects.items())
            },
        },
        sort_keys=True,
    )


@dataclass(slots=True)
class ProjectView:
    """One project across the cluster, from the agents' reports (``cluster_view``)."""

    project: str
    nodes: int = 0
    pods: int = 0  # pods an agent runs (or tries to run) a proxy for
    sealed: int = 0  # of which a proxy runs and has loaded a key ring
    rings: dict[str, int] = field(default_factory=dict)  # ring label -> pods on it


def cluster_view(
    reports: list[NodeReport], enabled: list[str], now: float, stale_after: float = 180.0
) -> tuple[list[ProjectView], list[str]]:
    """Every enabled project's pods with and without a working proxy, and the nodes whose
    agent has not reported for ``stale_after`` seconds (its figures may be old: the agent
    heartbeats every minute). A project no agent reports has no pod with a proxy anywhere."""
    views = {p: ProjectView(p) for p in enabled}
    for report in reports:
        for project, (pods, loaded) in report.projects.items():
            view = views.setdefault(project, ProjectView(project))
            view.nodes += 1
            view.pods += pods
            for ring, n in loaded.items():
                if ring:
                    view.sealed += n
                    view.rings[ring] = view.rings.get(ring, 0) + n
    stale = sorted(r.node for r in reports if now - r.updated > stale_after)
    return sorted(views.values(), key=lambda v: v.project), stale


@dataclass(slots=True)
class Progress:
    """How far the nodes are in loading ``expected`` for one project."""

    expected: str
    pods: int = 0
    ready: int = 0
    lagging: list[str] = field(default_factory=list)  # "node: what it holds instead"

    @property
    def done(self) -> bool:
        return not self.lagging


def progress(
    reports: Iterable[tuple[str, str | None]], namespace: str, expected: KeySet
) -> Progress:
    """Rule 2: ``reports`` are (ConfigMap name, its REPORT_KEY text); a node is ready when
    every pod of ``namespace`` it runs has loaded exactly ``expected``."""
    want = ring_label(expected.fingerprints())
    out = Progress(want)
    for name, text in reports:
        report = parse_report(text)
        if report is None:
            out.lagging.append(f"{name}: report unreadable")
            continue
        pods, loaded = report.projects.get(namespace, (0, {}))
        ready = loaded.get(want, 0)
        out.pods += pods
        out.ready += min(ready, pods)
        if ready < pods:
            others = (
                ", ".join(
                    f"{n} on {label or 'nothing'}"
                    for label, n in sorted(loaded.items())
                    if label != want
                )
                or "not loaded yet"
            )
            out.lagging.append(f"{report.node}: {ready}/{pods} pods ({others})")
    return out
