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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tencrypt.nodesync.cluster import ServiceBackends

TABLE = "tencrypt"
FAMILY = "inet"
MAP4, MAP6, ENDPOINTS4 = "vips4", "vips6", "endpoints4"
PICK_PREFIX = "pick-"
PRIORITY = -110  # dstnat (-100, NF_IP_PRI_NAT_DST) - 10: before kube-proxy; a number, as
# nft accepts the name "dstnat" only at prerouting
PROTOCOLS = ("udp", "tcp")
TUNNEL_PORT = 1337

Key = tuple[str, str, int]  # (VIP, protocol, port)
Slot = tuple[str, int]  # (VIP, index)


@dataclass(frozen=True, slots=True)
class Program:
    """What the table holds: the VIP elements (key → endpoint count n, i.e. ``goto
    pick-<n>``), the endpoint elements ((VIP, index) → endpoint) and the ``pick`` chains."""

    elements: Mapping[Key, int]
    endpoints: Mapping[Slot, str]
    picks: frozenset[int]

    @property
    def size(self) -> int:
        """Elements and chains programmed."""
        return len(self.elements) + len(self.endpoints) + len(self.picks)


EMPTY = Program({}, {}, frozenset())


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
    elements: dict[Key, int] = {}
    endpoints: dict[Slot, str] = {}
    for b in backends:
        if not b.endpoints:
            continue
        for proto in PROTOCOLS:
            elements[(b.vip, proto, port)] = len(b.endpoints)
        for i, ip in enumerate(b.endpoints):
            endpoints[(b.vip, i)] = ip
    return Program(elements, endpoints, frozenset(elements.values()))


def diff(old: Program, new: Program) -> list[Op]:
    """The commands that turn ``old`` into ``new`` (nothing if they are equal)."""
    ops = [Op(Verb.DELETE_ELEMENT, element=k) for k in sorted(old.elements)
           if new.elements.get(k) != old.elements[k]]
    ops += [Op(Verb.DELETE_ENDPOINT, slot=s) for s in sorted(old.endpoints)
            if new.endpoints.get(s) != old.endpoints[s]]
    ops += [Op(Verb.ADD_CHAIN, n=n) for n in sorted(new.picks - old.picks)]
    ops += [Op(Verb.ADD_ENDPOINT, slot=s, address=new.endpoints[s]) for s in sorted(new.endpoints)
            if old.endpoints.get(s) != new.endpoints[s]]
    ops += [Op(Verb.ADD_ELEMENT, element=k, n=new.elements[k]) for k in sorted(new.elements)
            if old.elements.get(k) != new.elements[k]]
    ops += [Op(Verb.DELETE_CHAIN, n=n) for n in sorted(old.picks - new.picks)]
    return ops


def apply_ops(program: Program, ops: Sequence[Op]) -> Program:
    """What the kernel makes of ``ops`` on a table holding ``program``; ``ModelError`` for a
    command it would refuse (a missing object, one still in use, a duplicate)."""
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
    return Program(elements, endpoints, frozenset(picks))


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
                lines += [f"add chain {t} {pick_chain(op.n)}",
                          f"add rule {t} {pick_chain(op.n)} {pick_rule(op.n)}"]
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
    lines = [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}",
             f"table {FAMILY} {TABLE} {{",
             f"  map {ENDPOINTS4} {{ typeof ip daddr . numgen random mod 1 : ip daddr;"]
    if program.endpoints:
        lines.append("    elements = { " + ",\n      ".join(
            _endpoint(s, a) for s, a in sorted(program.endpoints.items())) + " }")
    lines.append("  }")
    for n in sorted(program.picks):
        lines.append(f"  chain {pick_chain(n)} {{ {pick_rule(n)}; }}")
    for name, ktype in ((MAP4, "ipv4_addr"), (MAP6, "ipv6_addr")):
        items = [_element(k, n) for k, n in sorted(program.elements.items())
                 if _map(k[0]) == name]
        lines.append(f"  map {name} {{ type {ktype} . inet_proto . inet_service : verdict;")
        if items:
            lines.append("    elements = { " + ",\n      ".join(items) + " }")
        lines.append("  }")
    lines += ["  chain services {",
              f"    ip daddr . meta l4proto . th dport vmap @{MAP4}",
              f"    ip6 daddr . meta l4proto . th dport vmap @{MAP6}", "  }"]
    for hook in ("prerouting", "output"):
        lines.append(f"  chain {hook} {{ type nat hook {hook} priority {PRIORITY}; "
                     "policy accept; jump services; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def cleanup_text() -> str:
    """Remove the table (and with it every chain, map and hook), present or not."""
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def pairs(program: Program) -> set[tuple[str, str]]:
    """(VIP, endpoint IP) pairs the program forwards."""
    return {(key[0], program.endpoints[(key[0], i)]) for key, n in program.elements.items()
            for i in range(n) if (key[0], i) in program.endpoints}


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
    return Program(elements, endpoints, frozenset(picks))
