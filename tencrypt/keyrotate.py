"""`tencrypt key rotate`: move a project to a new key in three phases, never cutting a connection.

With the operator's own credentials (kubeconfig), or in a CronJob with a ServiceAccount that may
read and update only Secrets named ``tencrypt`` and list the agents' reports
(scripts/k8s/optional/key-rotation-cronjob.yaml). Stages of a run (core/rotation.py has the
rules):

 1. read Secret ``tencrypt`` of ``--namespace``; the phases to run: ``--phase`` one of them,
    or (``--all``, the default) what finishes the rotation in progress, or all three of a new
    one (``rotation.plan``); with no agent report at all there is nothing to wait on, and the
    run stops before it changes anything;
 2. wait until every pod runs the ring the Secret holds now (a run interrupted before the
    nodes caught up, or a node that was down, must not be left two phases behind);
 3. per phase: before DROP_PREVIOUS, wait out the grace time since PROMOTE was loaded
    everywhere (from this run, or the Secret's annotations); write the new ring into the Secret
    (with its resourceVersion: a concurrent change is a clear error, never overwritten), with
    the phase and its time as annotations; a new key comes from ``os.urandom(32)`` here and is
    never printed;
 4. wait until every node's agent reports that every pod of the project loaded that ring
    (``rotation.progress``), printing progress whenever it changes; past ``--timeout`` stop with
    the nodes that lag. The Secret is then left at a valid phase: re-run to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tencrypt import argtypes
from tencrypt.agent.netpolobjects import Requirement, Selector
from tencrypt.core.psk import KeySet, ring_label
from tencrypt.core.rotation import (
    PHASE_ANNOTATION,
    PHASE_AT_ANNOTATION,
    REPORT_KEY,
    REPORT_LABEL,
    SECRET_NAME,
    Phase,
    Progress,
    apply_phase,
    plan,
    progress,
    secret_data,
    secret_keys,
)
from tencrypt.errors import TencryptError, UsageError
from tencrypt.kube.objects import ENABLED_LABEL, add_kubeconfig_argument

DEFAULT_GRACE = 300.0  # > a session's lifetime (180 s): every session re-keyed meanwhile
DEFAULT_TIMEOUT = 600.0
POLL = 2.0
PHASES = 3  # add-next, promote, drop-previous
MAX_PARALLEL = 64  # --all-namespaces: projects rotated at once (each a mostly sleeping thread)


def worst_case_seconds(timeout: float, grace: float) -> float:
    """The longest a whole rotation (``--all``) may take before it gives up: the check that
    every pod runs what the Secret holds, a wait per phase (each up to ``timeout``), and the
    grace before drop-previous. A Job's activeDeadlineSeconds must exceed it, or Kubernetes
    kills the run while it still waits within its own limits."""
    return (1 + PHASES) * timeout + grace


class RotationError(TencryptError):
    """The rotation stopped (agents lagging, the API refused): the Secret is at a valid phase."""

    exit_code = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    r = sub.add_parser(
        "rotate",
        help="rotate a project's key: add-next, promote, drop-previous",
        description="Rotate the key of a project (Secret tencrypt, PROJECT_PSK[_NEXT|_PREVIOUS]) "
        "in three phases, waiting between them until every node's agent reports "
        "that every pod of the project loaded the new ring. No proxy restarts.",
    )
    which_ns = r.add_mutually_exclusive_group(required=True)
    which_ns.add_argument("--namespace", "-n", help="the project's namespace")
    which_ns.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="every enabled project (namespaces labelled tencrypt.io/enabled=true), rotated "
        "side by side: the whole run takes what one project's takes, not their sum",
    )
    which_ns.add_argument(
        "--selector",
        "-l",
        metavar="SELECTOR",
        help="like --all-namespaces, only the enabled namespaces whose labels match "
        "SELECTOR (equality-based: k=v, k!=v, k, !k, comma-separated)",
    )
    which = r.add_mutually_exclusive_group()
    which.add_argument(
        "--phase", choices=[ph.value for ph in Phase], help="run only this phase (default: --all)"
    )
    which.add_argument(
        "--all",
        action="store_true",
        help="finish the rotation in progress, or run all three phases of a new one (the default)",
    )
    r.add_argument(
        "--grace",
        type=argtypes.seconds_or_zero,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="seconds between promote (loaded everywhere) and drop-previous; longer "
        f"than the proxies' --session-lifetime (default: {DEFAULT_GRACE:.0f})",
    )
    r.add_argument(
        "--timeout",
        type=argtypes.seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds to wait for the agents after each phase (default: {DEFAULT_TIMEOUT:.0f})",
    )
    r.add_argument(
        "--agent-namespace",
        default="tencrypt-system",
        help="where the agents write their reports (default: tencrypt-system)",
    )
    add_kubeconfig_argument(r)
    r.add_argument("--context", help="kubeconfig context (default: its current context)")


@dataclass(slots=True)
class Rotator:
    """One run against one project; ``clock``, ``sleep`` and ``new_key`` are injected."""

    api: Any  # kubernetes.client.CoreV1Api
    namespace: str
    agent_namespace: str
    out: TextIO
    grace: float = DEFAULT_GRACE
    timeout: float = DEFAULT_TIMEOUT
    poll: float = POLL
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    new_key: Callable[[], bytes] = lambda: os.urandom(32)
    shared: SharedReports | None = None  # --all-namespaces: one poll of the reports for all
    _loaded_at: dict[Phase, float] = field(default_factory=dict)

    def run(self, only: Phase | None = None) -> KeySet:
        keys, secret = self.read()
        self.say(f"{self.namespace}: Secret {SECRET_NAME} holds {label(keys)}")
        phases = [only] if only is not None else plan(keys)
        self.say("phases: " + " -> ".join(ph.value for ph in phases))
        if not self.reports():  # nothing to wait on: a phase could strand pods, refuse
            raise RotationError(
                f"no agent key reports in {self.agent_namespace} (ConfigMaps labelled "
                f"{'='.join(REPORT_LABEL)}): are the agents running, with their report (Role "
                "tencrypt-agent-key-report, --report-namespace)? Nothing was changed."
            )
        self.say("before any change, every pod must run what the Secret holds:")
        self.wait_agents(keys)  # a previous run may have stopped before the nodes caught up
        for phase in phases:
            if phase is Phase.DROP_PREVIOUS:
                self.wait_grace(secret)
            keys, secret = self.write(phase, keys, secret)
            self.wait_agents(keys)
            self._loaded_at[phase] = self.clock()
        self.say(f"done: {self.namespace} runs on {label(keys)}")
        return keys

    # ---- the Secret ----------------------------------------------------------------------
    def read(self) -> tuple[KeySet, dict[str, Any]]:
        secret = self._call(
            f"read Secret {self.namespace}/{SECRET_NAME}",
            self.api.read_namespaced_secret,
            SECRET_NAME,
            self.namespace,
            _preload_content=False,
        )
        return secret_keys(secret.get("data")), secret

    def write(
        self, phase: Phase, keys: KeySet, secret: dict[str, Any]
    ) -> tuple[KeySet, dict[str, Any]]:
        new = apply_phase(keys, phase, self.new_key() if phase is Phase.ADD_NEXT else None)
        meta = secret.get("metadata") or {}
        annotations = {
            **(meta.get("annotations") or {}),
            PHASE_ANNOTATION: phase.value,
            PHASE_AT_ANNOTATION: f"{self.clock():.0f}",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": secret.get("type", "Opaque"),
            "metadata": {**meta, "annotations": annotations},
            "data": secret_data(new),
        }
        written = self._call(
            f"update Secret {self.namespace}/{SECRET_NAME}",
            self.api.replace_namespaced_secret,
            SECRET_NAME,
            self.namespace,
            body,
            _preload_content=False,
        )
        self.say(
            f"phase {phase.value}: Secret {self.namespace}/{SECRET_NAME} now holds {label(new)}"
        )
        return new, written

    # ---- waiting ---------------------------------------------------------------------------
    def wait_agents(self, keys: KeySet) -> Progress:
        """Rule 2 of core/rotation.py: until every pod of the project runs ``keys``."""
        start = self.clock()
        shown = None
        while True:
            got = progress(self.reports(), self.namespace, keys)
            line = f"  agents: {got.ready}/{got.pods} pods on {got.expected}" + (
                "; waiting for " + "; ".join(got.lagging) if got.lagging else ""
            )
            if line != shown:
                self.say(line)
                shown = line
            if got.done:
                if got.pods == 0:
                    self.say(f"  (no agent reports a pod of {self.namespace}: nothing to wait for)")
                return got
            if self.clock() - start >= self.timeout:
                raise RotationError(
                    f"after {self.timeout:.0f} s these nodes have not loaded {got.expected}: "
                    f"{'; '.join(got.lagging)}. The Secret holds a valid phase; their pods "
                    "refuse handshakes with pods two phases ahead (strict mode never falls "
                    "back to plaintext). Fix the nodes (agent running?) and re-run."
                )
            self.sleep(self.poll)

    def wait_grace(self, secret: dict[str, Any]) -> None:
        """Wait until ``grace`` seconds after PROMOTE was loaded everywhere: from this run,
        else from the Secret's annotations, else (unknown) a full grace from now."""
        since = self._loaded_at.get(Phase.PROMOTE)
        if since is None:
            notes = (secret.get("metadata") or {}).get("annotations") or {}
            try:
                since = (
                    float(notes[PHASE_AT_ANNOTATION])
                    if notes.get(PHASE_ANNOTATION) == Phase.PROMOTE.value
                    else None
                )
            except (KeyError, ValueError):
                since = None
        until = (self.clock() if since is None else since) + self.grace
        if until > self.clock():
            self.say(
                f"  grace: {until - self.clock():.0f} s for sessions under the previous "
                "key to re-key under the current one"
            )
        while self.clock() < until:
            self.sleep(min(self.poll * 15, until - self.clock()))

    def reports(self) -> list[tuple[str, str | None]]:
        if self.shared is not None:
            return self.shared.get(self._list_reports)
        return self._list_reports()

    def _list_reports(self) -> list[tuple[str, str | None]]:
        doc = self._call(
            "list ConfigMaps",
            self.api.list_namespaced_config_map,
            self.agent_namespace,
            label_selector="=".join(REPORT_LABEL),
            _preload_content=False,
        )
        return [
            (
                (item.get("metadata") or {}).get("name", "?"),
                (item.get("data") or {}).get(REPORT_KEY),
            )
            for item in doc.get("items") or []
        ]

    # ---- shared ----------------------------------------------------------------------------
    def say(self, line: str) -> None:
        self.out.write(line + "\n")  # one write: lines of rotations side by side never mix
        self.out.flush()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        from tencrypt.kube.client import brief, unreachable

        try:
            resp = fn(*args, **kw)
            doc: dict[str, Any] = json.loads(resp.data)
            return doc
        except ApiException as exc:
            raise RotationError(
                api_error(
                    what,
                    exc.status or 0,
                    exc.reason or "",
                    exc.body,
                    self.namespace,
                    self.agent_namespace,
                )
            ) from None
        except unreachable() as exc:  # refused, timed out, TLS: the API server unreachable
            raise RotationError(f"cannot {what}: {brief(exc)}") from None


def api_error(
    what: str, status: int, reason: str, body: Any, namespace: str, agent_namespace: str
) -> str:
    """One line: what failed, the server's message, and what to check."""
    try:
        message = json.loads(body or "{}").get("message") or ""
    except (ValueError, AttributeError):
        message = ""
    hint = {
        401: " (check your kubeconfig's credentials)",
        403: f" (needs get and update on Secret {namespace}/{SECRET_NAME} and list on ConfigMaps "
        f"in {agent_namespace}: scripts/k8s/optional/key-rotation-cronjob.yaml shows the "
        "rules)",
        404: f" (no Secret {SECRET_NAME} in {namespace}? see scripts/k8s/secret-example.yaml)",
        409: " (the Secret changed meanwhile, another rotation? nothing was overwritten: re-run)",
    }.get(status, "")
    return f"cannot {what}: HTTP {status} {reason}{': ' + message if message else ''}{hint}"


def label(keys: KeySet) -> str:
    return ring_label(keys.fingerprints()).replace("=", " ").replace(",", ", ")


def parse_selector(text: str) -> Selector:
    """An equality-based label selector (``k=v`` or ``k==v``, ``k!=v``, ``k``, ``!k``, comma
    separated) as the agent's parsed ``metav1.LabelSelector`` (agent/netpolobjects.py), whose
    ``matches`` it then uses; UsageError for anything else (set-based ``in``/``notin``)."""
    reqs: list[Requirement] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise UsageError(f"--selector {text!r}: an empty term")
        if " in " in term or " notin " in term or "(" in term:
            raise UsageError(f"--selector {text!r}: set-based terms are not supported")
        if "!=" in term:
            key, _, value = term.partition("!=")
            reqs.append((key.strip(), "NotIn", frozenset([value.strip()])))
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            reqs.append((key.strip(), "In", frozenset([value.strip()])))
        elif term.startswith("!"):
            reqs.append((term[1:].strip(), "DoesNotExist", frozenset()))
        else:
            reqs.append((term, "Exists", frozenset()))
        if not reqs[-1][0]:
            raise UsageError(f"--selector {text!r}: a term without a key")
    return Selector(tuple(reqs))


def enabled_namespaces(api: Any, selector: Selector | None = None) -> list[str]:
    """The enabled projects' namespaces (``ENABLED_LABEL=true``) that ``selector`` matches,
    sorted. The API's and the transport's errors are the caller's to word."""
    doc = json.loads(
        api.list_namespace(label_selector=f"{ENABLED_LABEL}=true", _preload_content=False).data
    )
    wanted = Selector(
        ((ENABLED_LABEL, "In", frozenset(["true"])), *(selector.requirements if selector else ()))
    )
    return sorted(
        (item.get("metadata") or {}).get("name", "")
        for item in doc.get("items") or []
        if wanted.matches((item.get("metadata") or {}).get("labels") or {})
    )


class Prefixed:
    """A text stream that prefixes each line with ``[namespace] ``, shared by threads."""

    def __init__(self, out: TextIO, prefix: str, lock: threading.Lock) -> None:
        self.out, self.prefix, self.lock = out, prefix, lock

    def write(self, text: str) -> int:
        with self.lock:
            for line in text.splitlines(keepends=True):
                self.out.write(self.prefix + line if line.strip() else line)
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self.out.flush()


class SharedReports:
    """One list of the agents' reports every ``poll`` seconds for all the rotations of a
    run, not one per project: a hundred projects poll the API server as one does."""

    def __init__(self, poll: float, clock: Callable[[], float]) -> None:
        self.poll, self.clock, self.lock = poll, clock, threading.Lock()
        self.at: float | None = None
        self.value: list[tuple[str, str | None]] = []

    def get(
        self, fetch: Callable[[], list[tuple[str, str | None]]]
    ) -> list[tuple[str, str | None]]:
        with self.lock:
            now = self.clock()
            if self.at is None or now - self.at >= self.poll:
                self.value, self.at = fetch(), now
            return self.value


def rotate_many(
    make: Callable[[str, TextIO, SharedReports], Rotator],
    namespaces: list[str],
    only: Phase | None,
    out: TextIO,
    poll: float = POLL,
    clock: Callable[[], float] = time.time,
) -> int:
    """Each namespace's rotation on a thread of its own, side by side; 0 when all finished,
    RotationError's exit code when any stopped (each says why, prefixed by its namespace)."""
    from concurrent.futures import ThreadPoolExecutor

    lock, shared = threading.Lock(), SharedReports(poll, clock)
    failed: dict[str, str] = {}

    def one(namespace: str) -> None:
        try:
            make(namespace, Prefixed(out, f"[{namespace}] ", lock), shared).run(only)  # type: ignore[arg-type]
        except TencryptError as exc:
            failed[namespace] = str(exc)

    with ThreadPoolExecutor(max(1, min(MAX_PARALLEL, len(namespaces)))) as pool:
        list(pool.map(one, namespaces))
    for namespace, why in sorted(failed.items()):
        print(f"[{namespace}] stopped: {why}", file=out, flush=True)
    done = len(namespaces) - len(failed)
    print(f"rotated {done} of {len(namespaces)} projects", file=out, flush=True)
    return RotationError.exit_code if failed else 0


def main(args: argparse.Namespace) -> int:
    from kubernetes import client

    from tencrypt.kube.client import new_api_client

    api = client.CoreV1Api(new_api_client(args.kubeconfig, args.context))
    only = Phase(args.phase) if args.phase else None
    if args.namespace is None:  # --all-namespaces or --selector
        from tencrypt.kube.client import api_failures, brief

        selector = parse_selector(args.selector) if args.selector else None
        try:
            namespaces = enabled_namespaces(api, selector)
        except api_failures() as exc:
            raise RotationError(f"cannot list namespaces: {brief(exc)}") from None
        print(
            f"{len(namespaces)} enabled projects: {', '.join(namespaces) or '-'}",
            file=sys.stdout,
            flush=True,
        )
        if len(namespaces) > MAX_PARALLEL:
            print(
                f"more than {MAX_PARALLEL} projects: they run {MAX_PARALLEL} at a time, the "
                "run may take longer than one project's worst case",
                file=sys.stdout,
                flush=True,
            )

        def make(namespace: str, out: TextIO, shared: SharedReports) -> Rotator:
            return Rotator(
                api,
                namespace,
                args.agent_namespace,
                out,
                grace=args.grace,
                timeout=args.timeout,
                shared=shared,
            )

        return rotate_many(make, namespaces, only, sys.stdout)
    rotator = Rotator(
        api,
        args.namespace,
        args.agent_namespace,
        sys.stdout,
        grace=args.grace,
        timeout=args.timeout,
    )
    rotator.run(only)
    return 0
