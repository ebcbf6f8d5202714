"""NetworkPolicies, Pods and Namespaces as Kubernetes JSON, parsed into what
``agent/netpol.py`` reduces for one proxy (issue #23). Pure: objects in, values out.

Rules (the numbers are ``agent/netpol.py``'s):
2. ``policyTypes`` absent or empty default to ``Ingress``, plus ``Egress`` when ``spec.egress``
   holds at least one rule (the API server's ``SetDefaults_NetworkPolicy``:
   ``len(spec.Egress) != 0``, so ``egress: []`` adds nothing).
3. Label selectors are ``metav1.LabelSelector``
   (https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/):
   every ``matchLabels`` pair and every ``matchExpressions`` requirement must hold. ``In``: the
   key is there with a listed value; ``NotIn``: the key is absent or its value unlisted (as
   ``labels.Requirement.Matches`` has it); ``Exists``/``DoesNotExist``: there/absent. In/NotIn
   need values, Exists/DoesNotExist take none. An empty selector selects everything. In a peer,
   a null ``namespaceSelector`` is the policy's own namespace (``Peer.namespaces`` None), a null
   ``podSelector`` every pod of the selected namespaces.
5. A port's protocol is TCP when absent; ``port`` absent is every port of the protocol;
   ``endPort`` needs a numeric ``port`` and is not below it. A pod's named ports are
   ``spec.containers[].ports[]`` with a name, keyed by (protocol, name).
7. What does not parse never widens access: ``parse_policy`` always returns a ``Policy``, and
   one it cannot read in full is ``malformed`` (allows nothing) and errs towards isolation in
   what it could not read: every pod for an unreadable ``podSelector``, both directions for
   unreadable ``policyTypes``. Unknown keys make a policy malformed: a field of a newer API may
   narrow what it allows. ``parse_pod`` and ``parse_namespace_labels`` return None for what
   does not parse (the caller counts it and ignores it: no peer, which only narrows).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from tencrypt.agent.members import parse_pod_ips
from tencrypt.core.netpolicy import PROTOCOLS

NAME_LABEL = "kubernetes.io/metadata.name"
INGRESS, EGRESS = "Ingress", "Egress"
BOTH = frozenset({INGRESS, EGRESS})
OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})
Labels = Mapping[str, str]


class _Bad(Exception):
    """A part of a policy does not parse (internal: the policy becomes malformed, rule 7)."""


Requirement = tuple[str, str, frozenset[str]]  # (key, operator, values)


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed ``metav1.LabelSelector``; no requirement selects everything (rule 3)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Labels) -> bool:
        for key, op, values in self.requirements:
            present = key in labels
            if op == "In":
                ok = present and labels[key] in values
            elif op == "NotIn":
                ok = not present or labels[key] not in values
            else:
                ok = present if op == "Exists" else not present
            if not ok:
                return False
        return True


EVERYTHING = Selector()


@dataclass(frozen=True, slots=True)
class Peer:
    """One entry of ``from``/``to``: selectors, or an IP block (``cidr`` set)."""

    namespaces: Selector | None = None  # None: the policy's own namespace
    pods: Selector = EVERYTHING
    cidr: str | None = None
    excepts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Port:
    protocol: str  # TCP, UDP or SCTP
    port: int | str | None  # None: every port of the protocol; str: a named port
    end: int | None = None


@dataclass(frozen=True, slots=True)
class PolicyRule:
    peers: tuple[Peer, ...] | None  # None: every peer
    ports: tuple[Port, ...] | None  # None: every port of every protocol


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    selector: Selector
    types: frozenset[str]  # the directions it isolates (rule 2)
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    malformed: bool = False


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    labels: Labels
    ips: frozenset[str]
    ports: Mapping[tuple[str, str], frozenset[int]]  # (protocol, name) -> container ports


def parse_policy(obj: Any, index: int = 0) -> Policy:
    """A ``Policy``, malformed (rule 7) when any part of ``obj`` does not parse."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    found = meta.get("name") if isinstance(meta, dict) else None
    name = found if _is_str(found) else f"#{index}"  # no name: malformed, known by position
    spec = obj.get("spec") if isinstance(obj, dict) else None
    if not isinstance(spec, dict):
        return Policy(name, EVERYTHING, BOTH, malformed=True)
    own = spec.get("podSelector")
    selector = EVERYTHING if own is None else parse_selector(own)
    types = _optional(_policy_types, spec)
    try:
        if not _is_str(found) or set(spec) - {"podSelector", "policyTypes", "ingress", "egress"}:
            raise _Bad
        ingress = _rules(spec.get("ingress"), "from")
        egress = _rules(spec.get("egress"), "to")
    except _Bad:
        return Policy(name, selector or EVERYTHING, types or BOTH, malformed=True)
    if selector is None or types is None:
        return Policy(name, selector or EVERYTHING, types or BOTH, malformed=True)
    return Policy(name, selector, types, ingress, egress)


def parse_selector(value: Any) -> Selector | None:
    """Rule 3; None for anything ``metav1.LabelSelector`` validation refuses."""
    return _optional(_selector, value)


def _selector(value: Any) -> Selector:
    if not isinstance(value, dict) or set(value) - {"matchLabels", "matchExpressions"}:
        raise _Bad
    reqs: list[Requirement] = []
    for key, val in _dict(value.get("matchLabels")).items():
        if not _is_str(key) or not isinstance(val, str):
            raise _Bad
        reqs.append((key, "In", frozenset([val])))
    for expr in _list(value.get("matchExpressions")):
        if not isinstance(expr, dict) or set(expr) - {"key", "operator", "values"}:
            raise _Bad
        key, op, values = expr.get("key"), expr.get("operator"), _list(expr.get("values"))
        if not _is_str(key) or op not in OPERATORS or not all(isinstance(v, str) for v in values):
            raise _Bad
        if bool(values) != (op in ("In", "NotIn")):
            raise _Bad  # In/NotIn need values, Exists/DoesNotExist take none
        reqs.append((key, op, frozenset(values)))
    return Selector(tuple(reqs))


def parse_pod(obj: Any) -> PodInfo | None:
    """A project pod's labels, addresses and named container ports; None if malformed."""
    parsed = parse_pod_ips(obj)
    labels = _labels(obj)
    spec = obj.get("spec") if isinstance(obj, dict) else None
    if parsed is None or labels is None or not isinstance(spec, dict):
        return None
    ports: dict[tuple[str, str], set[int]] = {}
    try:
        for container in _list(spec.get("containers")):
            for port in _list(_dict(container).get("ports")):
                number, name = _dict(port).get("containerPort"), port.get("name")
                protocol = port.get("protocol") or "TCP"
                if not _is_port(number) or not isinstance(protocol, str):
                    raise _Bad
                if _is_str(name):
                    ports.setdefault((protocol, name), set()).add(number)
    except _Bad:
        return None
    named = {key: frozenset(numbers) for key, numbers in ports.items()}
    return PodInfo(parsed[1], labels, parsed[2], named)


def parse_namespace_labels(obj: Any) -> Labels | None:
    """A Namespace's labels with ``kubernetes.io/metadata.name`` (rule 4); None if bad."""
    labels = _labels(obj)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if labels is None or not _is_str(name):
        return None
    return {NAME_LABEL: name, **labels}


def _policy_types(spec: dict[str, Any]) -> frozenset[str]:
    raw = spec.get("policyTypes")
    if raw is None or raw == []:  # absent or empty: the API server's default (rule 2)
        egress = spec.get("egress")
        if egress is not None and not isinstance(egress, list):
            raise _Bad
        return BOTH if egress else frozenset({INGRESS})
    if not isinstance(raw, list) or not all(t in BOTH for t in raw):
        raise _Bad
    return frozenset(raw)


def _rules(value: Any, peers_key: str) -> tuple[PolicyRule, ...]:
    rules = []
    for rule in _list(value):
        if not isinstance(rule, dict) or set(rule) - {peers_key, "ports"}:
            raise _Bad
        peers = _list(rule.get(peers_key))
        ports = _list(rule.get("ports"))
        rules.append(
            PolicyRule(
                tuple(_peer(p) for p in peers) if peers else None,
                tuple(_port(p) for p in ports) if ports else None,
            )
        )
    return tuple(rules)


def _peer(value: Any) -> Peer:
    if not isinstance(value, dict) or set(value) - {"podSelector", "namespaceSelector", "ipBlock"}:
        raise _Bad
    pods, namespaces, block = (
        value.get(k) for k in ("podSelector", "namespaceSelector", "ipBlock")
    )
    if block is None:
        if pods is None and namespaces is None:
            raise _Bad  # "must specify a peer"
        return Peer(
            None if namespaces is None else _selector(namespaces),
            EVERYTHING if pods is None else _selector(pods),
        )
    if pods is not None or namespaces is not None or not isinstance(block, dict):
        raise _Bad  # "may not specify both ipBlock and another peer"
    if set(block) - {"cidr", "except"}:
        raise _Bad
    excepts = _list(block.get("except"))
    return Peer(cidr=_cidr(block.get("cidr")), excepts=tuple(_cidr(e) for e in excepts))


def _port(value: Any) -> Port:
    if not isinstance(value, dict) or set(value) - {"protocol", "port", "endPort"}:
        raise _Bad
    protocol = value.get("protocol") or "TCP"
    port, end = value.get("port"), value.get("endPort")
    if protocol not in PROTOCOLS:
        raise _Bad
    if not (port is None or _is_port(port) or _is_str(port)):
        raise _Bad
    if end is not None and not (_is_port(end) and _is_port(port) and port <= end):
        raise _Bad  # endPort needs a numeric port, and not below it
    return Port(protocol, port, end)


def _cidr(value: Any) -> str:
    """Text as the API validates it, ``address/prefix-length`` (Python would also take an int,
    a bare address or a netmask); host bits are cleared (rule 6)."""
    if not isinstance(value, str) or not value.partition("/")[2].isdigit():
        raise _Bad
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise _Bad from None


def _optional(parse: Any, value: Any) -> Any:
    """``parse(value)``, or None where it raises ``_Bad``."""
    try:
        return parse(value)
    except _Bad:
        return None


def namespace_of(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    return ns if isinstance(ns, str) else None


def _labels(obj: Any) -> dict[str, str] | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    labels = {} if labels is None else labels
    if not isinstance(labels, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return None
    return labels


def _list(value: Any) -> list[Any]:
    """``value`` if a list, ``[]`` if null; ``_Bad`` otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad
    return value


def _dict(value: Any) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad
    return value


def _is_port(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 0xFFFF


def _is_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""
