"""Strict mode's firewall: the pod's own nftables table, the boundary that routes are not.

One table ``inet tencrypt`` in the pod's namespace (both families), installed by `tencrypt
setup` before any proxy reads a packet and left in place when the proxy stops, until `setup
--undo` (DESIGN §1a "Routes are not the boundary")::

    set project4 { type ipv4_addr }     the project's addresses: members from the agent,
    set project6 { type ipv6_addr }     peers of authenticated sessions, what DNS called
                                        internal (Service VIPs and pod IPs, both families)
    chain output { hook output priority 0 }
        oifname <uplink> meta mark <fwmark> udp sport <port> accept   the proxy's own tunnel
        oifname <uplink> meta mark <dns mark> accept                  the DNS proxy's upstream
        oifname <uplink> icmpv6 type { nd-* } accept                  neighbour discovery
        oifname <uplink> ip  daddr @project4 counter reject (admin-prohibited)  "refused_out_ipv4"
        oifname <uplink> ip6 daddr @project6 counter reject (admin-prohibited)  "refused_out_ipv6"
    chain input { hook input priority -10 }
        iifname <uplink> udp dport <port> accept                     the tunnel itself
        iifname <uplink> icmpv6 type { nd-* } accept                 neighbour discovery
        iifname <uplink> ip  saddr @project4 counter drop            "refused_in_ipv4"
        iifname <uplink> ip6 saddr @project6 counter drop            "refused_in_ipv6"

So a wrong route, a deleted /32 or a race costs availability, never confidentiality: no packet
to a project address leaves the uplink but the proxy's own UDP, and no plaintext from one is
accepted. Packets the proxy opened re-enter through tenc0 or the loopback and are not affected;
cross-project and external traffic never matches the sets. The local app gets an ICMP
"administratively prohibited" for a refused packet, so it fails fast instead of retrying.

Every change is one ``nft -f -`` transaction (atomic). ``install`` is idempotent and keeps the
sets' elements (a restarted proxy adopts them: no window). Nothing here runs inside a packet or
DNS callback: ``linux.effects`` calls it from its own task.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable

from tencrypt.core.podconfig import DNS_MARK_BIT
from tencrypt.errors import SetupError

TABLE = "tencrypt"
FAMILY = "inet"
LEGACY = ("ip", TABLE)  # the IPv4-only table of earlier releases: removed when found
SET4, SET6 = "project4", "project6"
# The rules that count, as (rule, direction, family): each one's nft comment is
# ``<rule>_<direction>_<family>`` (``comment``), /metrics labels its counter with the three
# (``tencrypt_firewall_packets_total``, observe.py) and `tencrypt status` shows it by comment.
COUNTED = (
    ("refused", "out", "ipv4"),
    ("refused", "out", "ipv6"),
    ("refused", "in", "ipv4"),
    ("refused", "in", "ipv6"),
)
# ICMPv6 neighbour discovery (RFC 4861) between the pod and a project address on its link is
# how either reaches the other at all (IPv6's ARP), also for the tunnel itself: never refused
ND_TYPES = (
    "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect"
)
NFT_TIMEOUT = 30.0  # seconds; a transaction of a few thousand elements takes milliseconds


def nft(script: str) -> str:
    """Run one nft transaction (``nft -f -``); SetupError with nft's message on failure."""
    try:
        proc = subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT
        )
    except FileNotFoundError as exc:
        raise SetupError("nft not found: install nftables (strict mode needs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"nft did not answer within {NFT_TIMEOUT:.0f} s") from exc
    if proc.returncode != 0:
        raise SetupError(f"nft refused: {proc.stderr.strip()}")
    return proc.stdout


def comment(rule: str, direction: str, family: str) -> str:
    return f"{rule}_{direction}_{family}"


BY_COMMENT = {comment(*c): c for c in COUNTED}  # the labels of a counting rule's comment


def render_table(uplink: str, port: int, fwmark: int, dns_mark: int | None = None) -> str:
    """The idempotent transaction that installs (or repairs) the table, keeping set elements."""
    t = f"{FAMILY} {TABLE}"
    out4, out6, in4, in6 = (comment(*c) for c in COUNTED)
    return f"""add table {t}
add set {t} {SET4} {{ type ipv4_addr; }}
add set {t} {SET6} {{ type ipv6_addr; }}
add chain {t} output {{ type filter hook output priority 0; policy accept; }}
add chain {t} input {{ type filter hook input priority -10; policy accept; }}
flush chain {t} output
flush chain {t} input
add rule {t} output oifname "{uplink}" meta mark {fwmark:#x} udp sport {port} accept
add rule {t} output oifname "{uplink}" meta mark {dns_mark or fwmark | DNS_MARK_BIT:#x} accept
add rule {t} output oifname "{uplink}" icmpv6 type {{ {ND_TYPES} }} accept
add rule {t} output oifname "{uplink}" ip daddr @{SET4} counter reject with icmpx type admin-prohibited comment "{out4}"
add rule {t} output oifname "{uplink}" ip6 daddr @{SET6} counter reject with icmpx type admin-prohibited comment "{out6}"
add rule {t} input iifname "{uplink}" udp dport {port} accept
add rule {t} input iifname "{uplink}" icmpv6 type {{ {ND_TYPES} }} accept
add rule {t} input iifname "{uplink}" ip saddr @{SET4} counter drop comment "{in4}"
add rule {t} input iifname "{uplink}" ip6 saddr @{SET6} counter drop comment "{in6}"
"""  # noqa: E501


def render_changes(add: Iterable[str], delete: Iterable[str]) -> str:
    """One transaction adding and deleting set elements (IPv4 and IPv6 addresses)."""
    lines = []
    for verb, ips in (("delete", delete), ("add", add)):
        by_set: dict[str, list[str]] = {SET4: [], SET6: []}
        for ip in ips:
            by_set[SET6 if ":" in ip else SET4].append(ip)
        for name, members in by_set.items():
            if members:
                lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(members)} }}")
    return "".join(line + "\n" for line in lines)


def install(uplink: str, port: int, fwmark: int) -> None:
    """Install or repair the table (idempotent; set elements are kept)."""
    remove_legacy()
    nft(render_table(uplink, port, fwmark, fwmark | DNS_MARK_BIT))


def change(add: Iterable[str], delete: Iterable[str]) -> None:
    script = render_changes(add, delete)
    if script:
        nft(script)


def elements() -> set[str]:
    """The addresses in both sets now (empty when the table is not there)."""
    found: set[str] = set()
    for name in (SET4, SET6):
        try:
            out = _run_json(["list", "set", FAMILY, TABLE, name])
        except SetupError:
            return set()
        for item in out:
            elems = item.get("set", {}).get("elem", [])
            found.update(e for e in elems if isinstance(e, str))
    return found


def counters() -> dict[str, int]:
    """Packets each commented rule refused so far, by comment (empty without the table)."""
    try:
        out = _run_json(["list", "table", FAMILY, TABLE])
    except SetupError:
        return {}
    found = {}
    for item in out:
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                found[rule["comment"]] = int(expr["counter"].get("packets", 0))
    return found


def exists() -> bool:
    try:
        _run_json(["list", "table", FAMILY, TABLE])
    except SetupError:
        return False
    return True


def remove_table() -> None:
    """Remove the table if it is there (`setup --undo`, `run --no-strict`)."""
    for family, name in ((FAMILY, TABLE), LEGACY):
        _delete(family, name)


def remove_legacy() -> None:
    _delete(*LEGACY)


def _delete(family: str, name: str) -> None:
    try:
        subprocess.run(
            ["nft", "delete", "table", family, name], capture_output=True, timeout=NFT_TIMEOUT
        )
    except FileNotFoundError:
        pass  # no nft, so no table either


def _run_json(words: list[str]) -> list[dict]:  # type: ignore[type-arg]
    try:
        proc = subprocess.run(
            ["nft", "-j", *words], capture_output=True, text=True, timeout=NFT_TIMEOUT
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"nft: {exc}") from exc
    if proc.returncode != 0:
        raise SetupError(proc.stderr.strip())
    try:
        return list(json.loads(proc.stdout).get("nftables", []))
    except ValueError as exc:
        raise SetupError(f"nft -j printed no JSON: {exc}") from exc
