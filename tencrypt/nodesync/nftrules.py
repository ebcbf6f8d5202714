"""Desired Service backends → an nftables program, and the diff of two programs → one small
nft transaction (pure: text out, nothing run).

The ruleset (table ``inet tencrypt``, Tencrypt's own: kube-proxy's tables are never named)::

    table inet tencrypt {
      map endpoints4 { typeof ip daddr . numgen random mod 1 : ip daddr
                       elements = { 172.30.0.9 . 0 : 10.128.0.5, 172.30.0.9 . 1 : ..., ... } }
      chain pick-3 { dnat ip to ip daddr . numgen random mod 3 map @endpoints4 }
      map vips4 { type ipv4_addr . inet_proto . inet_service : verdict
                  elements = { 172.30.0.9 . udp . 1337 : goto pick-3, ... tcp ... } }
      map vips6 { type ipv6_addr . inet_proto . inet_service : verdict }
      chain services { ip daddr . meta l4proto . th dport vmap @vips4
                       ip6 daddr . meta l4proto . th dport vmap @vips6 }
      chain prerouting { type nat hook prerouting priority -110; jump services }
      chain output { type nat hook output priority -110; jump services }
    }

Rules:
- Two map lookups per packet whatever the number of Services: (VIP, protocol, port) →
  the chain ``pick-<n>`` of its endpoint count n, udp and tcp of the tunnel port (the shape
  of kube-proxy's nftables mode); there ``numgen random mod n`` draws an index and (VIP,
  index) → endpoint. Each of the n endpoints is chosen with probability 1/n, kube-proxy's
  balancing; conntrack keeps a flow on the endpoint its first packet chose. The port is kept
  (VIP:port → pod:port).
- Everything per Service is a map element: one chain per distinct endpoint count, not per
  Service, so a table of 10,000 Services is a few chains and 50,000 elements (nft builds
  that in a fraction of a second; a chain per Service with its own anonymous map took 25
  times longer), and a changed Service is a few element commands.
- IPv6 VIPs have their own map (the lookup key's type differs); node-sync forwards IPv4
  VIPs today (``cluster.py``, the tunnel is IPv4), so it stays empty.
- The hooks sit at priority -110 (``dstnat - 10``): before kube-proxy's DNAT (iptables nat
  and kube-proxy's nft chains are at ``dstnat``, -100); the first NAT chain that binds a
  connection wins, so our VIPs' tunnel port is ours, everything else goes on to kube-proxy
  untouched.
- A VIP without endpoints has no element: its packets go where an unknown VIP goes.
- ``full_text``: the whole table in one transaction (create-if-missing, delete, declare):
  the result depends on the desired state only (start-up and periodic resync repair any
  drift). ``diff(old, new)``: the commands that turn ``old`` into ``new`` — elements deleted,
  ``pick`` chains added, elements added, unused ``pick`` chains deleted — the order the
  kernel needs (an element cannot point at a chain not yet there; a chain in use cannot be
  deleted). ``apply_ops`` is the model of what the kernel does with them, as strict as the
  kernel: what the unit tests check diffs against.
- Output order is fixed by the (sorted) input: the same programs give byte-identical text.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tencrypt.core import TUNNEL_PORT
from tencrypt.nodesync.cluster import ServiceBackends

TABLE = "tencrypt"
FAMILY = "inet"
MAP4, MAP6, ENDPOINTS4 = "vips4", "vips6", "endpoints4"
PICK_PREFIX = "pick-"
PRIORITY = -110  # dstnat (-100, NF_IP_PRI_NAT_DST) - 10: before kube-proxy; a number, as
# nft accepts the name "dstnat" only at prerouting
PROTOCOLS = ("udp", "tcp")

Key = tuple[str, str, int]  # (VIP, protocol, port)
Slot = tuple[str, int]  # (VIP, index)


@dataclass(frozen=True, slots=True)
class Program:
    """What the table holds: each VIP's endpoints in order (its elements: udp and tcp of
    ``port`` → ``goto pick-<n>``, and (VIP, i) → endpoint i), and the ``pick`` chains."""

    vips: Mapping[str, tuple[str, ...]]
    picks: frozenset[int]
    port: int = TUNNEL_PORT

    @property
    def elements(self) -> dict[Key, int]:
        return {
            (vip, proto, self.port): len(eps)
            for vip, eps in self.vips.items()
            for proto in PROTOCOLS
        }

    @property
    def endpoints(self) -> dict[Slot, str]:
        return {(vip, i): ip for vip, eps in self.vips.items() for i, ip in enumerate(eps)}

    @property
    def size(self) -> int:
        """Elements and chains programmed."""
        return sum(len(PROTOCOLS) + len(eps) for eps in self.vips.values()) + len(self.picks)


EMPTY = Program({}, frozenset())


def from_elements(
    elements: Mapping[Key, int], endpoints: Mapping[Slot, str], picks: Iterable[int]
) -> Program:
    """The program a table of these elements holds; ``ModelError`` if they do not make one
    (a VIP with one protocol and not the other, an index out of its range, a missing one)."""
    vips: dict[str, tuple[str, ...]] = {}
    ports = {k[2] for k in elements}
    if len(ports) > 1:
        raise ModelError(f"elements for several ports: {sorted(ports)}")
    counts: dict[str, set[int]] = {}
    protocols: dict[str, set[str]] = {}
    for (vip, proto, _), n in elements.items():
        counts.setdefault(vip, set()).add(n)
        protocols.setdefault(vip, set()).add(proto)
    for vip, ns in counts.items():
        protos = protocols[vip]
        if len(ns) != 1 or protos != set(PROTOCOLS):
            raise ModelError(f"{vip}: elements {sorted(protos)} with counts {sorted(ns)}")
        n = ns.pop()
        if any((vip, i) not in endpoints for i in range(n)):
            raise ModelError(f"{vip}: an endpoint index below {n} is missing")
        vips[vip] = tuple(endpoints[(vip, i)] for i in range(n))
    extra = [s for s in endpoints if s[0] not in vips or s[1] >= len(vips[s[0]])]
    if extra:
        raise ModelError(f"endpoints no VIP uses: {sorted(extra)[:3]}")
    return Program(vips, frozenset(picks), ports.pop() if ports else TUNNEL_PORT)


class Verb(enum.Enum):
    DELETE_ELEMENT = "delete element"  # of vips4
    DELETE_ENDPOINT = "delete endpoint"  # an element of endpoints4
    ADD_CHAIN = "add chain"  # pick-<n> and its one rule
    ADD_ENDPOINT = "add endpoint"
    ADD_ELEMENT = "add element"
    DELETE_CHAIN = "delete chain"


@dataclass(frozen=True, slots=True)
class Op:
    verb: Verb
    element: Key | None = None  # DELETE_ELEMENT, ADD_ELEMENT
    slot: Slot | None = None  # DELETE_ENDPOINT, ADD_ENDPOINT
    n: int = 0  # the pick chain: ADD_ELEMENT's target, ADD_CHAIN, DELETE_CHAIN
    address: str = ""  # ADD_ENDPOINT


class ModelError(ValueError):
    """A command the kernel would refuse (what a wrong diff would cause)."""


def pick_chain(n: int) -> str:
    return f"{PICK_PREFIX}{n}"


def program_of(backends: Iterable[ServiceBackends], port: int = TUNNEL_PORT) -> Program:
    vips = {b.vip: tuple(b.endpoints) for b in backends if b.endpoints}
    return Program(vips, frozenset(len(eps) for eps in vips.values()), port)


def updated(old: Program, backends: Iterable[ServiceBackends], touched: Collection[str]) -> Program:
    """``program_of(backends, old.port)`` when only the VIPs in ``touched`` can differ from
    ``old``: those are taken from ``backends`` (the last one with endpoints wins, as in
    ``program_of``), every other VIP is kept as ``old`` has it."""
    vips = dict(old.vips)
    for vip in touched:
        vips.pop(vip, None)
    for b in backends:
        if b.endpoints and b.vip in touched:
            vips[b.vip] = tuple(b.endpoints)
    return Program(vips, frozenset(len(eps) for eps in vips.values()), old.port)


def diff(old: Program, new: Program, only: Collection[str] | None = None) -> list[Op]:
    """The commands that turn ``old`` into ``new`` (nothing if they are equal). VIPs are
    compared by their address (a string: its hash is cached), so one change in a large
    program costs one pass over its VIPs, and commands are made for the changed ones only;
    ``only``: the caller knows no VIP outside it differs (a watch event's), and not even
    that pass is made."""
    if old.port != new.port:
        changed = sorted(set(old.vips) | set(new.vips))
    elif only is not None:
        changed = sorted(v for v in set(only) if old.vips.get(v) != new.vips.get(v))
    else:
        changed = sorted(
            {v for v, eps in old.vips.items() if new.vips.get(v) != eps}
            | {v for v in new.vips if v not in old.vips}
        )
    gone_el: list[Op] = []
    gone_ep: list[Op] = []
    add_ep: list[Op] = []
    add_el: list[Op] = []
    for vip in changed:
        was, now = old.vips.get(vip, ()), new.vips.get(vip, ())
        same_elements = len(was) == len(now) and old.port == new.port
        if was and not same_elements:
            gone_el += [Op(Verb.DELETE_ELEMENT, element=(vip, p, old.port)) for p in PROTOCOLS]
        gone_ep += [
            Op(Verb.DELETE_ENDPOINT, slot=(vip, i))
            for i, ip in enumerate(was)
            if i >= len(now) or now[i] != ip
        ]
        add_ep += [
            Op(Verb.ADD_ENDPOINT, slot=(vip, i), address=ip)
            for i, ip in enumerate(now)
            if i >= len(was) or was[i] != ip
        ]
        if now and not same_elements:
            add_el += [
                Op(Verb.ADD_ELEMENT, element=(vip, p, new.port), n=len(now)) for p in PROTOCOLS
            ]
    return [
        *gone_el,
        *gone_ep,
        *(Op(Verb.ADD_CHAIN, n=n) for n in sorted(new.picks - old.picks)),
        *add_ep,
        *add_el,
        *(Op(Verb.DELETE_CHAIN, n=n) for n in sorted(old.picks - new.picks)),
    ]


def lost_pairs(old: Program, new: Program, ops: Iterable[Op]) -> set[tuple[str, str]]:
    """(VIP, endpoint) pairs ``old`` forwards and ``new`` does not, looking only at the VIPs
    ``ops`` (``diff(old, new)``) touch: ``pairs(old) - pairs(new)`` at the cost of the change."""
    vips = {op.element[0] for op in ops if op.element} | {op.slot[0] for op in ops if op.slot}
    return {(v, ip) for v in vips for ip in old.vips.get(v, ())} - {
        (v, ip) for v in vips for ip in new.vips.get(v, ())
    }


def apply_ops(program: Program, ops: Sequence[Op]) -> Program:
    """What the kernel makes of ``ops`` on a table holding ``program``; ``ModelError`` for a
    command it would refuse (a missing object, one still in use, a duplicate), or for a
    table left inconsistent (``from_elements``)."""
    elements, endpoints = dict(program.elements), dict(program.endpoints)
    picks = set(program.picks)
    for op in ops:
        if op.verb is Verb.DELETE_ELEMENT:
            if op.element not in elements:
                raise ModelError(f"no element {op.element}")
            del elements[op.element]
        elif op.verb is Verb.DELETE_ENDPOINT:
            if op.slot not in endpoints:
                raise ModelError(f"no endpoint {op.slot}")
            del endpoints[op.slot]
        elif op.verb is Verb.ADD_CHAIN:
            if op.n in picks:
                raise ModelError(f"chain {pick_chain(op.n)} exists")
            picks.add(op.n)
        elif op.verb is Verb.DELETE_CHAIN:
            if op.n not in picks or op.n in elements.values():
                raise ModelError(f"chain {pick_chain(op.n)} absent or in use")
            picks.discard(op.n)
        elif op.verb is Verb.ADD_ENDPOINT:
            if op.slot is None or op.slot in endpoints:
                raise ModelError(f"endpoint {op.slot} exists")
            endpoints[op.slot] = op.address
        else:
            if op.element is None or op.element in elements or op.n not in picks:
                raise ModelError(f"element {op.element} exists or {pick_chain(op.n)} is absent")
            elements[op.element] = op.n
    return from_elements(elements, endpoints, picks)


# -- text -----------------------------------------------------------------------------------


def _family(ip: str) -> str:
    return "ip" if ipaddress.ip_address(ip).version == 4 else "ip6"


def _map(vip: str) -> str:
    return MAP4 if _family(vip) == "ip" else MAP6


def pick_rule(n: int) -> str:
    """The one rule of chain ``pick-<n>``: DNAT to endpoint (VIP, random index < n)."""
    return f"dnat ip to ip daddr . numgen random mod {n} map @{ENDPOINTS4}"


def _element(key: Key, n: int | None = None) -> str:
    vip, proto, port = key
    return f"{vip} . {proto} . {port}" + ("" if n is None else f" : goto {pick_chain(n)}")


def _endpoint(slot: Slot, address: str | None = None) -> str:
    return f"{slot[0]} . {slot[1]}" + ("" if address is None else f" : {address}")


def render(ops: Sequence[Op]) -> str:
    """``ops`` as ``nft -f`` input: one transaction, elements batched per command."""
    t = f"{FAMILY} {TABLE}"
    lines: list[str] = []
    batch: list[str] = []
    head = ""

    def flush() -> None:
        if batch:
            lines.append(f"{head} {{ {', '.join(batch)} }}")
            batch.clear()

    for op in ops:
        if op.verb in (Verb.ADD_CHAIN, Verb.DELETE_CHAIN):
            flush()
            head = ""
            if op.verb is Verb.ADD_CHAIN:
                lines += [
                    f"add chain {t} {pick_chain(op.n)}",
                    f"add rule {t} {pick_chain(op.n)} {pick_rule(op.n)}",
                ]
            else:
                lines.append(f"delete chain {t} {pick_chain(op.n)}")
            continue
        if op.verb in (Verb.DELETE_ELEMENT, Verb.ADD_ELEMENT):
            assert op.element is not None
            verb, table = op.verb.value, _map(op.element[0])
            item = _element(op.element, op.n if op.verb is Verb.ADD_ELEMENT else None)
        else:
            assert op.slot is not None
            verb = "add element" if op.verb is Verb.ADD_ENDPOINT else "delete element"
            table = ENDPOINTS4
            item = _endpoint(op.slot, op.address if op.verb is Verb.ADD_ENDPOINT else None)
        if f"{verb} {t} {table}" != head:
            flush()
            head = f"{verb} {t} {table}"
        batch.append(item)
    flush()
    return "".join(line + "\n" for line in lines)


def full_text(program: Program) -> str:
    """The whole table, replacing whatever it held, as one ``nft -f`` transaction."""
    lines = [
        f"add table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        f"  map {ENDPOINTS4} {{ typeof ip daddr . numgen random mod 1 : ip daddr;",
    ]
    if program.endpoints:
        lines.append(
            "    elements = { "
            + ",\n      ".join(_endpoint(s, a) for s, a in sorted(program.endpoints.items()))
            + " }"
        )
    lines.append("  }")
    for n in sorted(program.picks):
        lines.append(f"  chain {pick_chain(n)} {{ {pick_rule(n)}; }}")
    for name, ktype in ((MAP4, "ipv4_addr"), (MAP6, "ipv6_addr")):
        items = [_element(k, n) for k, n in sorted(program.elements.items()) if _map(k[0]) == name]
        lines.append(f"  map {name} {{ type {ktype} . inet_proto . inet_service : verdict;")
        if items:
            lines.append("    elements = { " + ",\n      ".join(items) + " }")
        lines.append("  }")
    lines += [
        "  chain services {",
        f"    ip daddr . meta l4proto . th dport vmap @{MAP4}",
        f"    ip6 daddr . meta l4proto . th dport vmap @{MAP6}",
        "  }",
    ]
    for hook in ("prerouting", "output"):
        lines.append(
            f"  chain {hook} {{ type nat hook {hook} priority {PRIORITY}; "
            "policy accept; jump services; }"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def cleanup_text() -> str:
    """Remove the table (and with it every chain, map and hook), present or not."""
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def pairs(program: Program) -> set[tuple[str, str]]:
    """(VIP, endpoint IP) pairs the program forwards."""
    return {(vip, ip) for vip, eps in program.vips.items() for ip in eps}


_PICK_HEAD = re.compile(r"^\s*chain pick-(\d+) \{")
_ELEMENT = re.compile(r"([0-9a-f.:]+) \. (udp|tcp) \. (\d+) : goto pick-(\d+)")
_ENDPOINT = re.compile(r"([0-9a-f.:]+) \. (\d+) : ([0-9a-f.:]+)")


def parse_listing(text: str) -> Program:
    """The program ``nft list table inet tencrypt`` shows (what a node holds now): its
    elements and ``pick`` chains. Anything else in the text is ignored."""
    elements: dict[Key, int] = {}
    endpoints: dict[Slot, str] = {}
    picks: set[int] = set()
    section = ""
    for line in text.splitlines():
        head = _PICK_HEAD.match(line)
        if head:
            picks.add(int(head.group(1)))
        stripped = line.strip()
        if stripped.startswith(("map ", "chain ")):
            section = stripped.split()[1]
        for vip, proto, port, n in _ELEMENT.findall(line):
            elements[(vip, proto, int(port))] = int(n)
        if section == ENDPOINTS4:
            for vip, index, address in _ENDPOINT.findall(line):
                endpoints[(vip, int(index))] = address
    return from_elements(elements, endpoints, picks)
