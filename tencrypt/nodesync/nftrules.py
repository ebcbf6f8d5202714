"""Desired Service backends → an nftables program, and the diff of two programs → one small
nft transaction (pure: text out, nothing run).

The ruleset (table ``inet tencrypt``, Tencrypt's own: kube-proxy's tables are never named)::

    table inet tencrypt {
      chain svc-<hash> { dnat ip to numgen random mod 3 map { 0 : 10.128.0.5, 1 : ..., 2 : ... } }
      map vips4 { type ipv4_addr . inet_proto . inet_service : verdict
                  elements = { 172.30.0.9 . udp . 1337 : goto svc-<hash>, ... tcp ... } }
      map vips6 { type ipv6_addr . inet_proto . inet_service : verdict }
      chain services { ip daddr . meta l4proto . th dport vmap @vips4
                       ip6 daddr . meta l4proto . th dport vmap @vips6 }
      chain prerouting { type nat hook prerouting priority -110; jump services }
      chain output { type nat hook output priority -110; jump services }
    }

Rules:
- One map lookup per packet whatever the number of Services: the map goes from (VIP,
  protocol, port) to a per-VIP chain, udp and tcp of the tunnel port (as kube-proxy's
  nftables mode since 1.29). IPv6 VIPs have their own map (the lookup key's type differs);
  node-sync forwards IPv4 VIPs today (``cluster.py``), so it stays empty.
- Balancing is kube-proxy's: ``numgen random mod n`` picks one of the n endpoints with
  probability 1/n; conntrack keeps a flow on the endpoint its first packet chose. One
  endpoint is a plain ``dnat``. The port is kept (VIP:port → pod:port).
- The hooks sit at priority -110 (``dstnat - 10``): before kube-proxy's DNAT (iptables nat
  and kube-proxy's nft chains are at ``dstnat``, -100); the first NAT chain that binds a
  connection wins, so our VIPs' tunnel port is ours, everything else goes on to kube-proxy
  untouched.
- A VIP without endpoints has no element: its packets go where an unknown VIP goes.
- Chain names hash what they stand for (sha256, base32, 16 characters), stable across
  restarts, as in the iptables backend.
- ``full_text``: the whole table in one transaction (create-if-missing, delete, declare):
  the result depends on the desired state only (start-up and periodic resync repair any
  drift). ``diff(old, new)``: the commands that turn ``old`` into ``new`` — element
  deletions, then chains rewritten or deleted, then chains and elements added — the order
  the kernel needs (a chain in use by an element cannot be deleted; an element cannot point
  at a chain not yet there). ``apply_ops`` is the model of what the kernel does with them,
  as strict as the kernel: what the unit tests check diffs against.
- Output order is fixed by the (sorted) input: the same programs give byte-identical text.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tencrypt.nodesync.cluster import ServiceBackends

TABLE = "tencrypt"
FAMILY = "inet"
MAP4, MAP6 = "vips4", "vips6"
SVC_PREFIX = "svc-"
PRIORITY = -110  # dstnat (-100, NF_IP_PRI_NAT_DST) - 10: before kube-proxy; a number, as
# nft accepts the name "dstnat" only at prerouting
PROTOCOLS = ("udp", "tcp")
TUNNEL_PORT = 1337

Key = tuple[str, str, int]  # (VIP, protocol, port)


@dataclass(frozen=True, slots=True)
class Program:
    """What the table holds: the Service chains (name → endpoints, in order) and the map
    elements (key → chain name)."""

    chains: Mapping[str, tuple[str, ...]]
    elements: Mapping[Key, str]

    @property
    def size(self) -> int:
        """Objects programmed: chains plus map elements."""
        return len(self.chains) + len(self.elements)


EMPTY = Program({}, {})


class Verb(enum.Enum):
    DELETE_ELEMENT = "delete element"
    DELETE_CHAIN = "delete chain"
    FLUSH_CHAIN = "flush chain"
    ADD_CHAIN = "add chain"
    ADD_RULE = "add rule"
    ADD_ELEMENT = "add element"


@dataclass(frozen=True, slots=True)
class Op:
    verb: Verb
    chain: str = ""  # the chain named, or the element's target
    key: Key | None = None  # elements only
    endpoints: tuple[str, ...] = ()  # ADD_RULE only


class ModelError(ValueError):
    """A command the kernel would refuse (what a wrong diff would cause)."""


def chain_name(*parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return SVC_PREFIX + base64.b32encode(digest).decode()[:16].lower()


def program_of(backends: Iterable[ServiceBackends], port: int = TUNNEL_PORT) -> Program:
    chains: dict[str, tuple[str, ...]] = {}
    elements: dict[Key, str] = {}
    for b in backends:
        if not b.endpoints:
            continue
        name = chain_name(b.namespace, b.name, b.vip)
        chains[name] = tuple(b.endpoints)
        for proto in PROTOCOLS:
            elements[(b.vip, proto, port)] = name
    return Program(chains, elements)


def diff(old: Program, new: Program) -> list[Op]:
    """The commands that turn ``old`` into ``new`` (nothing if they are equal)."""
    ops = [Op(Verb.DELETE_ELEMENT, old.elements[k], k) for k in sorted(old.elements)
           if new.elements.get(k) != old.elements[k]]
    for name in sorted(old.chains):
        if name not in new.chains:
            ops.append(Op(Verb.DELETE_CHAIN, name))
        elif new.chains[name] != old.chains[name]:
            ops += [Op(Verb.FLUSH_CHAIN, name), Op(Verb.ADD_RULE, name,
                                                   endpoints=new.chains[name])]
    for name in sorted(new.chains):
        if name not in old.chains:
            ops += [Op(Verb.ADD_CHAIN, name), Op(Verb.ADD_RULE, name,
                                                 endpoints=new.chains[name])]
    ops += [Op(Verb.ADD_ELEMENT, new.elements[k], k) for k in sorted(new.elements)
            if old.elements.get(k) != new.elements[k]]
    return ops


def apply_ops(program: Program, ops: Sequence[Op]) -> Program:
    """What the kernel makes of ``ops`` on a table holding ``program``; ``ModelError`` for a
    command it would refuse (a missing object, one still in use, a duplicate)."""
    chains = dict(program.chains)
    rules = {name: 1 for name in chains}  # rules per chain: ours hold exactly one
    elements = dict(program.elements)
    for op in ops:
        if op.verb is Verb.DELETE_ELEMENT:
            if op.key not in elements:
                raise ModelError(f"no element {op.key}")
            del elements[op.key]
        elif op.verb is Verb.DELETE_CHAIN:
            if op.chain not in chains or op.chain in elements.values():
                raise ModelError(f"chain {op.chain} absent or in use")
            del chains[op.chain], rules[op.chain]
        elif op.verb is Verb.FLUSH_CHAIN:
            if op.chain not in chains:
                raise ModelError(f"no chain {op.chain}")
            chains[op.chain], rules[op.chain] = (), 0
        elif op.verb is Verb.ADD_CHAIN:
            if op.chain in chains:
                raise ModelError(f"chain {op.chain} exists")  # we never re-add one
            chains[op.chain], rules[op.chain] = (), 0
        elif op.verb is Verb.ADD_RULE:
            if op.chain not in chains or rules[op.chain]:
                raise ModelError(f"chain {op.chain} absent or not empty")
            chains[op.chain], rules[op.chain] = op.endpoints, 1
        else:
            assert op.key is not None
            if op.key in elements or op.chain not in chains:
                raise ModelError(f"element {op.key} exists or its chain is absent")
            elements[op.key] = op.chain
    return Program(chains, elements)


# -- text -----------------------------------------------------------------------------------

def _family(ip: str) -> str:
    return "ip" if ipaddress.ip_address(ip).version == 4 else "ip6"


def _map(vip: str) -> str:
    return MAP4 if _family(vip) == "ip" else MAP6


def rule_text(endpoints: Sequence[str]) -> str:
    """The one rule of a Service chain: DNAT to one of ``endpoints`` at random."""
    family = _family(endpoints[0])
    if len(endpoints) == 1:
        return f"dnat {family} to {endpoints[0]}"
    pick = ", ".join(f"{i} : {ip}" for i, ip in enumerate(endpoints))
    return f"dnat {family} to numgen random mod {len(endpoints)} map {{ {pick} }}"


def _element(key: Key, chain: str) -> str:
    vip, proto, port = key
    return f"{vip} . {proto} . {port} : goto {chain}"


def render(ops: Sequence[Op]) -> str:
    """``ops`` as ``nft -f`` input: one transaction."""
    t = f"{FAMILY} {TABLE}"
    lines = []
    for op in ops:
        if op.verb in (Verb.DELETE_ELEMENT, Verb.ADD_ELEMENT):
            assert op.key is not None
            body = _element(op.key, op.chain) if op.verb is Verb.ADD_ELEMENT else \
                " . ".join(map(str, op.key))
            lines.append(f"{op.verb.value} {t} {_map(op.key[0])} {{ {body} }}")
        elif op.verb is Verb.ADD_RULE:
            lines.append(f"add rule {t} {op.chain} {rule_text(op.endpoints)}")
        else:
            lines.append(f"{op.verb.value} {t} {op.chain}")
    return "".join(line + "\n" for line in lines)


def full_text(program: Program) -> str:
    """The whole table, replacing whatever it held, as one ``nft -f`` transaction."""
    lines = [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}",
             f"table {FAMILY} {TABLE} {{"]
    for name in sorted(program.chains):
        lines.append(f"  chain {name} {{ {rule_text(program.chains[name])}; }}")
    for name, ktype in ((MAP4, "ipv4_addr"), (MAP6, "ipv6_addr")):
        items = [_element(k, c) for k, c in sorted(program.elements.items()) if _map(k[0]) == name]
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
    return {(key[0], ip) for key, chain in program.elements.items()
            for ip in program.chains.get(chain, ())}


_CHAIN_HEAD = re.compile(r"^\s*chain (svc-[a-z2-7]+) \{")
_ELEMENT = re.compile(r"([0-9a-f.:]+) \. (udp|tcp) \. (\d+) : goto (svc-[a-z2-7]+)")
_DNAT_ONE = re.compile(r"dnat ip6? to ([0-9a-f.:]+)\s*(?:;|$)")
_DNAT_PICK = re.compile(r"(\d+) : ([0-9a-f.:]+)")


def parse_listing(text: str) -> Program:
    """The program ``nft list table inet tencrypt`` shows (what a node holds now): its
    Service chains' endpoints and its map elements. Anything else in the text is ignored."""
    chains: dict[str, tuple[str, ...]] = {}
    elements: dict[Key, str] = {}
    current = None
    for line in text.splitlines():
        head = _CHAIN_HEAD.match(line)
        if head:
            current = head.group(1)
            chains[current] = ()
        if current and "dnat" in line:
            if "numgen" in line:
                picks = sorted((int(i), ip) for i, ip in _DNAT_PICK.findall(line.split("map", 1)[1]))
                chains[current] = tuple(ip for _, ip in picks)
            elif (one := _DNAT_ONE.search(line)) is not None:
                chains[current] = (one.group(1),)
        if line.strip() == "}":
            current = None
        for vip, proto, port, chain in _ELEMENT.findall(line):
            elements[(vip, proto, int(port))] = chain
    return Program(chains, elements)
