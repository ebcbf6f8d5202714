"""The project's NetworkPolicies as one proxy enforces them on inner packets (issue #23): the
agent's reduced document (``tencrypt-netpol/1``, written by ``agent/netpol.py``) in, one
``Decision`` per new flow out.

The CNI sees only UDP 1337 between patched pods, so the proxies enforce the policies
themselves: the receiving proxy the ingress ones on the opened packet before it injects it, the
sending proxy the egress ones before it seals, after it picked the Service endpoint (so the
destination is a pod IP and the port its target port, as a CNI sees them after kube-proxy's
DNAT). Only the project's pods come through the tunnel: cross-project and external traffic
stays the CNI's and never reaches this table.

Rules (Kubernetes' semantics, from [concepts]
https://kubernetes.io/docs/concepts/services-networking/network-policies/ and [api]
https://kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1/):

1. Isolation is per direction. The pod is isolated for ingress (egress) when a NetworkPolicy
   that selects it has ``Ingress`` (``Egress``) in its ``policyTypes``; a direction no policy
   isolates allows every flow [concepts "The two sorts of pod isolation"]. The agent decides
   isolation (``policyTypes`` defaulting, malformed policies) and writes, per direction, the
   names of the isolating policies.
2. In an isolated direction a flow is allowed iff at least one rule of an isolating policy
   allows it: rules add up across policies, order never matters, there is no deny rule
   [concepts "Isolated and Non-isolated Pods"]. Isolated with no rule: default deny.
3. A rule allows a flow when its peers match AND its ports match [api
   NetworkPolicyIngressRule, NetworkPolicyEgressRule]. ``"any"`` peers (``from``/``to`` empty
   or absent) match every peer; ``"any"`` ports (``ports`` empty or absent) match every port of
   every protocol. An empty *list* matches nothing (a selector that selects no pod, a named
   port this pod does not have): the writer never turns "nothing" into "any".
4. Peers are addresses and IP blocks. The addresses are the project's pod IPs that the rule's
   podSelector/namespaceSelector select (the agent resolved them; pods of other namespaces
   never come through the tunnel). An IP block is its CIDR minus every ``except`` CIDR [api
   IPBlock]; it applies to the inner addresses, which are pod IPs (no NAT between proxies).
   [concepts] says ipBlocks "should be cluster-external IPs" and leaves pod IPs to the
   plugin; the upstream e2e tests ("should enforce except clause while egress access to
   server in CIDR block") expect them to match pod IPs, and so do we. Addresses and blocks of
   both families are compared as keys (core/packet.py rule 9: IPv6 above every IPv4 one), so
   an IPv4 block never matches an IPv6 peer nor the reverse (``::/0`` is IPv6 only, as in
   Kubernetes, where a dual-stack "everything" is two blocks).
5. Ports are a protocol (TCP, UDP, SCTP) and a range ``port..endPort``, both ends inclusive
   (no ``endPort``: the one port) [api NetworkPolicyPort]. A named port matches when the
   destination pod has a container port of that name and protocol whose number is the flow's
   port [api "a numerical or named port on a pod"]: for ingress the agent resolved names
   against this pod; for egress the document carries the destination pods' named ports
   (``named_ports``) and the name is resolved per destination here. A rule that lists ports
   never matches another protocol (ICMP, ...); a rule with ``"any"`` ports matches every
   protocol. Kubernetes defines policies for TCP, UDP and SCTP only and leaves the rest to the
   plugin [concepts "Network traffic filtering"]; applying the same rules to the rest is the
   closed choice (denied in an isolated direction unless a rule without ports allows it).
6. A pod cannot block access to itself [concepts]: a flow whose peer is one of the pod's own
   addresses is allowed.
7. Verdicts are per connection: "reply traffic for those allowed connections will also be
   implicitly allowed" [concepts "The two sorts of pod isolation"]. The caller asks once per
   new flow and caches the ``Decision`` with the flow; replies and later segments of the flow
   never come here.
8. A document that is not valid ``tencrypt-netpol/1`` is refused with ``NetpolError`` saying
   what is wrong, and the caller keeps its last good table; nothing is half-read or guessed. A
   missing key is an error, except the two whose absence can only deny more
   (``named_ports``, ``malformed``).

Cost: ``from_doc`` precomputes, per direction and protocol, the rules that can match, each
with its port ranges per protocol, a frozenset of peer addresses and its IP blocks as integer
ranges. A lookup is O(1) for an unisolated direction, else O(sum over the candidate rules of
their port ranges + named ports + IP blocks and excepts): pod-IP peers are one set membership,
and every ``Decision`` a lookup returns was built with the table (no per-flow objects).

The format, version 1 (JSON, UTF-8; unknown keys are ignored)::

    {"format": "tencrypt-netpol/1", "project": "shop", "pod": "db-0", "generation": 7,
     "ips": ["10.128.2.7"],
     "ingress": {"isolated": true, "policies": ["allow-frontend", "default-deny"],
                 "rules": [{"policy": "allow-frontend", "rule": 0,
                            "peers": {"ips": ["10.128.2.9"],
                                      "blocks": [{"cidr": "172.17.0.0/16",
                                                  "except": ["172.17.1.0/24"]}]},
                            "ports": [{"protocol": "TCP", "port": 6379, "end": 6379}]}]},
     "egress": {"isolated": true, "policies": ["to-api"],
                "rules": [{"policy": "to-api", "rule": 0, "peers": "any",
                           "ports": [{"protocol": "TCP", "name": "http"}]}]},
     "named_ports": {"10.128.2.9": {"TCP/http": [8080]}},
     "malformed": []}

``ips``: the pod's own addresses (rule 6). ``policies``: the isolating policies, ``[]`` and no
rules when ``isolated`` is false. A rule names its policy (one of the direction's
``policies``) and its index in that policy's ``ingress``/``egress`` list (for counting by
policy and rule). ``peers``: ``"any"`` or ``{"ips": [...], "blocks": [...]}``. ``ports``:
``"any"`` or a list of ``{"protocol", "port", "end"}`` (``port <= end``) and, in egress only,
``{"protocol", "name"}``. ``named_ports``: destination pod IP -> ``"PROTOCOL/name"`` -> port
numbers. ``malformed``: the policies selecting the pod that did not parse (they isolate and
allow nothing; informational).
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from tencrypt.core.packet import SCTP, TCP, UDP
from tencrypt.core.packet import V6 as V6  # the one key rule (core/packet.py rule 9)
from tencrypt.core.packet import ip_key as ip_key

FORMAT = "tencrypt-netpol/1"
FILE_NAME = "netpol.json"
PROTOCOLS = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}  # NetworkPolicyPort.protocol -> IP protocol
MAX_ITEMS = 1 << 20  # a bound on any one list of a document (addresses, rules, ports)

Range = tuple[int, int]
Named = Mapping[tuple[int, str], frozenset[int]]  # (protocol, port name) -> port numbers


class NetpolError(ValueError):
    """The text is not a valid ``tencrypt-netpol/1`` document."""


class Why(enum.Enum):
    UNISOLATED = "unisolated"  # no policy isolates this direction (rule 1)
    SELF = "self"  # the peer is the pod itself (rule 6)
    RULE = "rule"  # a rule allowed it: ``policy`` and ``rule`` say which (rules 2-5)
    DENIED = "denied"  # isolated, and no rule allows it: ``isolating`` says by whom


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    why: Why
    policy: str | None = None  # RULE: the policy whose rule allowed the flow
    rule: int | None = None  # RULE: that rule's index in the policy's ingress/egress list
    isolating: tuple[str, ...] = ()  # DENIED: the policies that isolate the pod this way


UNISOLATED = Decision(True, Why.UNISOLATED)
SELF = Decision(True, Why.SELF)


@dataclass(frozen=True, slots=True)
class Block:
    """An IP block: ``lo..hi`` (keys, rule 4) minus the ``excepts`` ranges."""

    lo: int
    hi: int
    excepts: tuple[Range, ...]

    def __contains__(self, key: int) -> bool:
        if not self.lo <= key <= self.hi:
            return False
        return not any(lo <= key <= hi for lo, hi in self.excepts)


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    decision: Decision  # what an allow by this rule returns (built once)
    any_peer: bool
    ips: frozenset[int]
    blocks: tuple[Block, ...]
    any_port: bool
    ranges: Mapping[int, tuple[Range, ...]]  # protocol -> port ranges
    names: Mapping[int, tuple[str, ...]]  # protocol -> port names (egress)

    def peer_matches(self, key: int) -> bool:
        if self.any_peer or key in self.ips:
            return True
        return any(key in block for block in self.blocks)

    def port_matches(self, proto: int, dport: int, named: Named | None) -> bool:
        if self.any_port:
            return True
        for lo, hi in self.ranges.get(proto, ()):
            if lo <= dport <= hi:
                return True
        if named:
            for name in self.names.get(proto, ()):
                if dport in named.get((proto, name), ()):
                    return True
        return False


@dataclass(frozen=True, slots=True, eq=False)
class Direction:
    isolated: bool
    policies: tuple[str, ...]
    rules: tuple[Rule, ...]
    denied: Decision
    by_proto: Mapping[int, tuple[Rule, ...]]  # TCP/UDP/SCTP -> the rules that can match it
    other: tuple[Rule, ...]  # the rules with "any" ports: every other protocol's candidates

    @classmethod
    def of(cls, isolated: bool, policies: tuple[str, ...], rules: tuple[Rule, ...]) -> Direction:
        by_proto = {
            proto: tuple(r for r in rules if r.any_port or proto in r.ranges or proto in r.names)
            for proto in PROTOCOLS.values()
        }
        other = tuple(r for r in rules if r.any_port)
        denied = Decision(False, Why.DENIED, isolating=policies)
        return cls(isolated, policies, rules, denied, by_proto, other)

    def decide(
        self, own: frozenset[int], key: int, proto: int, dport: int, named: Named | None
    ) -> Decision:
        """Rules 1-6 for one new flow whose peer is ``key``."""
        if not self.isolated:
            return UNISOLATED
        if key in own:
            return SELF
        for rule in self.by_proto.get(proto, self.other):
            if rule.port_matches(proto, dport, named) and rule.peer_matches(key):
                return rule.decision
        return self.denied


@dataclass(frozen=True, slots=True, eq=False)
class NetPolicy:
    """One pod's NetworkPolicy table, as parsed from its document."""

    project: str
    pod: str
    generation: int
    own: frozenset[int]
    inbound: Direction
    outbound: Direction
    named_ports: Mapping[int, Named] = field(default_factory=dict)  # destination key ->
    malformed: tuple[str, ...] = ()

    def ingress(self, src_ip: int | str, proto: int, dport: int) -> Decision:
        """A new flow from ``src_ip`` (an address key as ``packet.addr_key`` makes them, which
        is an IPv4 address's int, or any address as text) to this pod's ``dport``."""
        return self.inbound.decide(self.own, ip_key(src_ip), proto, dport, None)

    def egress(self, dst_ip: int | str, proto: int, dport: int) -> Decision:
        """A new flow from this pod to ``dst_ip``:``dport`` (after endpoint selection)."""
        key = ip_key(dst_ip)
        return self.outbound.decide(self.own, key, proto, dport, self.named_ports.get(key))


def parse_netpol(text: str | bytes) -> NetPolicy:
    """Rule 8: a ``NetPolicy`` or ``NetpolError`` saying what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NetpolError(f"not JSON: {exc}") from None
    return from_doc(doc)


def from_doc(doc: object) -> NetPolicy:
    """The same, from the decoded JSON value (the agent checks its own documents with it)."""
    if not isinstance(doc, dict):
        raise NetpolError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise NetpolError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    project, pod = _text(doc.get("project"), "project"), _text(doc.get("pod"), "pod")
    generation = doc.get("generation")
    if not _is_int(generation) or generation < 0:
        raise NetpolError("'generation' must be a non-negative integer")
    own = frozenset(_key_of(ip, "ips") for ip in _items(_required(doc, "ips"), "ips"))
    malformed = tuple(_text(m, "malformed") for m in _items(doc.get("malformed", []), "malformed"))
    return NetPolicy(
        project,
        pod,
        generation,
        own,
        _direction(_required(doc, "ingress"), "ingress", names_ok=False),
        _direction(_required(doc, "egress"), "egress", names_ok=True),
        _named_ports(doc.get("named_ports", {})),
        malformed,
    )


def render_netpol(doc: Mapping[str, Any]) -> str:
    """The file's text for a document (keys sorted: equal documents give equal files)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"


# -- parsing, piece by piece ----------------------------------------------------------------


def _direction(value: object, where: str, names_ok: bool) -> Direction:
    if not isinstance(value, dict):
        raise NetpolError(f"{where!r} must be an object")
    isolated = value.get("isolated")
    if not isinstance(isolated, bool):
        raise NetpolError(f"{where}: 'isolated' must be true or false")
    policies = tuple(_text(p, f"{where}.policies") for p in _items(value.get("policies"), where))
    if isolated != bool(policies):
        raise NetpolError(f"{where}: isolated exactly when some policy isolates it")
    raw_rules = _items(value.get("rules"), f"{where}.rules")
    if raw_rules and not isolated:
        raise NetpolError(f"{where}: rules in a direction no policy isolates")
    rules = tuple(
        _rule(r, f"{where}.rules[{i}]", policies, names_ok) for i, r in enumerate(raw_rules)
    )
    return Direction.of(isolated, policies, rules)


def _rule(value: object, where: str, policies: tuple[str, ...], names_ok: bool) -> Rule:
    if not isinstance(value, dict):
        raise NetpolError(f"{where} must be an object")
    policy, index = _text(value.get("policy"), f"{where}.policy"), value.get("rule")
    if policy not in policies:
        raise NetpolError(f"{where}: 'policy' {policy!r} is not one of the isolating policies")
    if not _is_int(index) or index < 0:
        raise NetpolError(f"{where}: 'rule' must be a non-negative integer")
    decision = Decision(True, Why.RULE, policy=policy, rule=index)
    peers, ports = _required(value, "peers", where), _required(value, "ports", where)
    any_peer = peers == "any"
    ips: frozenset[int] = frozenset()
    blocks: tuple[Block, ...] = ()
    if not any_peer:
        ips, blocks = _peers(peers, where)
    any_port = ports == "any"
    ranges, names = ({}, {}) if any_port else _ports(ports, where, names_ok)
    return Rule(decision, any_peer, ips, blocks, any_port, ranges, names)


def _peers(value: object, where: str) -> tuple[frozenset[int], tuple[Block, ...]]:
    if not isinstance(value, dict):
        raise NetpolError(f"{where}: 'peers' must be \"any\" or an object")
    ips = frozenset(_key_of(ip, f"{where}.peers.ips") for ip in _items(value.get("ips"), where))
    blocks = []
    for item in _items(value.get("blocks"), f"{where}.peers.blocks"):
        if not isinstance(item, dict):
            raise NetpolError(f"{where}: a block must be an object")
        lo, hi = _cidr(item.get("cidr"), where)
        excepts = tuple(_cidr(e, where) for e in _items(item.get("except"), f"{where}.except"))
        blocks.append(Block(lo, hi, excepts))
    return ips, tuple(blocks)


def _ports(
    value: object, where: str, names_ok: bool
) -> tuple[dict[int, tuple[Range, ...]], dict[int, tuple[str, ...]]]:
    ranges: dict[int, list[Range]] = {}
    names: dict[int, list[str]] = {}
    for item in _items(value, f"{where}.ports"):
        if not isinstance(item, dict) or item.get("protocol") not in PROTOCOLS:
            raise NetpolError(f"{where}: a port needs a protocol among {sorted(PROTOCOLS)}")
        proto = PROTOCOLS[item["protocol"]]
        if "name" in item:
            if not names_ok:
                raise NetpolError(f"{where}: named ports are resolved by the writer in ingress")
            names.setdefault(proto, []).append(_text(item["name"], f"{where}.name"))
            continue
        port, end = item.get("port"), item.get("end")
        if not (_is_int(port) and _is_int(end) and 1 <= port <= end <= 0xFFFF):
            raise NetpolError(f"{where}: a port range needs 1 <= port <= end <= 65535")
        ranges.setdefault(proto, []).append((port, end))
    return (
        {p: tuple(r) for p, r in ranges.items()},
        {p: tuple(n) for p, n in names.items()},
    )


def _named_ports(value: object) -> dict[int, Named]:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise NetpolError("'named_ports' must be an object of pod IPs")
    out: dict[int, Named] = {}
    for ip, ports in value.items():
        if not isinstance(ports, dict):
            raise NetpolError(f"named_ports[{ip!r}] must be an object")
        table: dict[tuple[int, str], frozenset[int]] = {}
        for spec, numbers in ports.items():
            proto, _, name = spec.partition("/") if isinstance(spec, str) else ("", "", "")
            if proto not in PROTOCOLS or not name:
                raise NetpolError(f"named_ports[{ip!r}]: {spec!r} is not PROTOCOL/name")
            found = _items(numbers, f"named_ports[{ip!r}]")
            if not all(_is_int(n) and 1 <= n <= 0xFFFF for n in found):
                raise NetpolError(f"named_ports[{ip!r}][{spec!r}]: not port numbers")
            table[PROTOCOLS[proto], name] = frozenset(found)
        out[_key_of(ip, "named_ports")] = table
    return out


def _cidr(value: object, where: str) -> Range:
    try:
        if not isinstance(value, str) or not value.partition("/")[2].isdigit():
            raise TypeError(value)  # address/prefix-length only, as the writer spells it
        net = ipaddress.ip_network(value, strict=False)
    except (ValueError, TypeError):
        raise NetpolError(f"{where}: not a CIDR: {value!r}") from None
    return ip_key(net.network_address), ip_key(net.broadcast_address)


def _key_of(value: object, where: str) -> int:
    try:
        if not isinstance(value, str):
            raise TypeError(value)
        return ip_key(value)
    except (ValueError, TypeError):
        raise NetpolError(f"{where}: not an IP address: {value!r}") from None


def _items(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise NetpolError(f"{where!r} must be a list")
    if len(value) > MAX_ITEMS:
        raise NetpolError(f"{where!r} holds {len(value)} items, more than {MAX_ITEMS}")
    return value


def _required(doc: dict[str, Any], key: str, where: str = "document") -> object:
    if key not in doc:
        raise NetpolError(f"{where}: {key!r} is missing")
    return doc[key]


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise NetpolError(f"{where}: not a non-empty string: {value!r}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
