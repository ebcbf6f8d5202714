"""Desired Service backends → one ``iptables-restore --noflush`` transaction for the nat table.

Rules:
- Tencrypt owns chain ``TENCRYPT`` and every nat chain named ``TENC-SVC-*`` / ``TENC-SEP-*``;
  nothing else on the node is touched. Each transaction declares all of them (declaring a
  chain in ``--noflush`` mode flushes it), so the result depends only on the desired backends,
  never on what was there before: a restart rebuilds the chains from scratch, and a chain
  someone edited by hand is put back.
- Chains that are no longer wanted are flushed and deleted (``-X``) in the same transaction,
  after the rules that jumped to them are gone.
- After the first sync of a process, ``build_partial`` names only chain TENCRYPT and the
  chains of VIPs whose endpoints changed (kube-proxy's partial sync): the cost of a change
  no longer grows with the number of Services' chains. The periodic resync is a full one.
- ``PREROUTING`` (traffic from pods) and ``OUTPUT`` (from the node itself) jump to
  ``TENCRYPT``; the jump is inserted at the head of the chain, ahead of kube-proxy's
  ``KUBE-SERVICES``, and only if a jump is not there already (the lab's older code appended
  one; either works).
- Balancing is kube-proxy's: endpoint ``i`` of ``n`` is chosen with probability
  ``1/(n-i)`` given that none before it was, so each is chosen with ``1/n``; the last rule
  has no condition. conntrack keeps a flow on the endpoint its first packet chose.
- Chain names hash what they stand for (sha256, base32, 16 characters: 25 in all, under the
  kernel's 28), as kube-proxy does: stable across restarts, different for every VIP/endpoint.
- Output order is fixed by the (sorted) input: the same backends give byte-identical text.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence

from tencrypt.core import TUNNEL_PORT
from tencrypt.nodesync.cluster import ServiceBackends

CHAIN = "TENCRYPT"
SVC_PREFIX = "TENC-SVC-"
SEP_PREFIX = "TENC-SEP-"
HOOKS = ("PREROUTING", "OUTPUT")
PROTOCOLS = ("udp", "tcp")

_CHAIN_DECL = re.compile(r"^:(\S+) ")
_RULE = re.compile(r"^-A (\S+) (.*)-j (\S+)(.*)$")
_DEST = re.compile(r"(?:^| )-d (\d+\.\d+\.\d+\.\d+)(?:/32)? ")
_TO = re.compile(r"--to-destination (\d+\.\d+\.\d+\.\d+)(?::\d+)?")


def chain_name(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def is_owned(chain: str) -> bool:
    return chain == CHAIN or chain.startswith((SVC_PREFIX, SEP_PREFIX))


def build_rules(
    backends: Iterable[ServiceBackends], port: int = TUNNEL_PORT
) -> tuple[list[str], list[str]]:
    """The sub-chains wanted and the ``-A`` lines of TENCRYPT and of those chains."""
    chains: list[str] = []
    rules: list[str] = []
    sep_rules: list[str] = []
    for b in backends:
        if not b.endpoints:
            continue  # nothing to forward to: the packet goes where an unknown VIP goes
        svc = chain_name(SVC_PREFIX, b.namespace, b.name, b.vip)
        chains.append(svc)
        for proto in PROTOCOLS:
            rules.append(
                f"-A {CHAIN} -d {b.vip}/32 -p {proto} -m {proto} --dport {port} "
                f'-m comment --comment "{b.namespace}/{b.name} tunnel" -j {svc}'
            )
        n = len(b.endpoints)
        for i, ip in enumerate(b.endpoints):
            sep = chain_name(SEP_PREFIX, b.namespace, b.name, b.vip, ip)
            chains.append(sep)
            chance = (
                f"-m statistic --mode random --probability {1.0 / (n - i):0.10f} "
                if i < n - 1
                else ""
            )
            sep_rules.append(
                f'-A {svc} -m comment --comment "{b.namespace}/{b.name} -> {ip}" {chance}-j {sep}'
            )
            sep_rules.extend(
                f"-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ip}:{port}"
                for proto in PROTOCOLS
            )
    return chains, rules + sep_rules


def build_restore(
    backends: Sequence[ServiceBackends], existing: str, port: int = TUNNEL_PORT
) -> str:
    """iptables-restore input that makes the nat table forward exactly ``backends``;
    ``existing`` is ``iptables-save -t nat`` of the node now."""
    chains, rules = build_rules(backends, port)
    wanted = set(chains)
    stale = sorted(
        c for c in parse_chains(existing) if is_owned(c) and c != CHAIN and c not in wanted
    )
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    lines += [f":{c} - [0:0]" for c in [*chains, *stale]]
    jumps = parse_jumps(existing)
    lines += [f"-I {hook} 1 -j {CHAIN}" for hook in HOOKS if hook not in jumps]
    lines += rules
    lines += [f"-X {c}" for c in stale]
    return "\n".join([*lines, "COMMIT", ""])


def build_partial(
    old: Sequence[ServiceBackends], new: Sequence[ServiceBackends], port: int = TUNNEL_PORT
) -> str:
    """iptables-restore input that turns the chains of ``old`` (what this process last
    programmed) into those of ``new``, rewriting only what changed, as kube-proxy does since
    1.26: chain TENCRYPT (one rule per VIP and protocol, always rewritten: it is the
    dispatch), the SVC chain of every VIP whose endpoints changed and the SEP chains it gains;
    chains no longer wanted are flushed and deleted. Unchanged chains are not named at all, so
    ``iptables-restore --noflush`` leaves them be. ``""`` if nothing changed."""
    before = {(b.namespace, b.name, b.vip): b.endpoints for b in old}
    if {(b.namespace, b.name, b.vip): b.endpoints for b in new} == before:
        return ""
    chains, rules = build_rules(new, port)
    old_chains, _ = build_rules(old, port)
    changed = [b for b in new if before.get((b.namespace, b.name, b.vip)) != b.endpoints]
    ch_chains, ch_rules = build_rules(changed, port)
    kept = set(old_chains)
    declared = [c for c in ch_chains if c not in kept or c.startswith(SVC_PREFIX)]
    stale = sorted(set(old_chains) - set(chains))
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    lines += [f":{c} - [0:0]" for c in [*declared, *stale]]
    lines += [r for r in rules if r.startswith(f"-A {CHAIN} ")]
    declared_set = set(declared)
    lines += [r for r in ch_rules if r.split(" ", 2)[1] in declared_set]
    lines += [f"-X {c}" for c in stale]
    return "\n".join([*lines, "COMMIT", ""])


def build_cleanup(existing: str) -> str:
    """iptables-restore input that removes every trace of Tencrypt from the nat table."""
    owned = [c for c in parse_chains(existing) if is_owned(c)]
    if not owned:
        return ""
    lines = ["*nat", *(f":{c} - [0:0]" for c in owned)]
    for line in existing.splitlines():
        m = _RULE.match(line)
        if m and m.group(1) in HOOKS and m.group(3) == CHAIN:
            lines.append("-D" + line[2:])
    lines += [f"-X {c}" for c in owned]
    return "\n".join([*lines, "COMMIT", ""])


def parse_chains(save: str) -> list[str]:
    """Chain names declared in the nat section of ``iptables-save`` output, in order."""
    out: list[str] = []
    for line in _nat_lines(save):
        m = _CHAIN_DECL.match(line)
        if m:
            out.append(m.group(1))
    return out


def parse_jumps(save: str) -> set[str]:
    """The hooks (PREROUTING, OUTPUT) that already jump to TENCRYPT."""
    return {
        m.group(1)
        for m in map(_RULE.match, _nat_lines(save))
        if m and m.group(1) in HOOKS and m.group(3) == CHAIN
    }


def parse_programmed(save: str) -> set[tuple[str, str]]:
    """(VIP, endpoint IP) pairs the nat table forwards through Tencrypt's chains now."""
    vip_of: dict[str, set[str]] = {}
    seps_of: dict[str, set[str]] = {}
    ip_of: dict[str, str] = {}
    for line in _nat_lines(save):
        m = _RULE.match(line)
        if not m:
            continue
        chain, match, target, after = m.groups()
        if chain == CHAIN and target.startswith(SVC_PREFIX):
            dest = _DEST.search(" " + match)
            if dest:
                vip_of.setdefault(target, set()).add(dest.group(1))
        elif chain.startswith(SVC_PREFIX) and target.startswith(SEP_PREFIX):
            seps_of.setdefault(chain, set()).add(target)
        elif chain.startswith(SEP_PREFIX) and target == "DNAT":
            to = _TO.search(after)
            if to:
                ip_of[chain] = to.group(1)
    return {
        (vip, ip_of[sep])
        for svc, vips in vip_of.items()
        for vip in vips
        for sep in seps_of.get(svc, ())
        if sep in ip_of
    }


def pairs(backends: Iterable[ServiceBackends]) -> set[tuple[str, str]]:
    return {(b.vip, ip) for b in backends for ip in b.endpoints}


def owned_lines(save: str) -> list[str]:
    """Tencrypt's part of ``iptables-save -t nat``: its chains, their rules and the jumps,
    without counters; what two nodes (or a node before and after a restart) compare."""
    out = []
    for line in _nat_lines(save):
        decl = _CHAIN_DECL.match(line)
        rule = _RULE.match(line)
        if decl and is_owned(decl.group(1)):
            out.append(f":{decl.group(1)}")
        elif rule and (is_owned(rule.group(1)) or rule.group(3) == CHAIN):
            out.append(line)
    return out


def _nat_lines(save: str) -> list[str]:
    lines: list[str] = []
    in_nat = False
    for line in save.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif in_nat:
            lines.append(line.strip())
    return lines
