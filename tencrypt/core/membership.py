"""The project's membership as the cluster API knows it: the file the node agent (or the lab,
playing the agent's part) hands each proxy.

Rules (DESIGN §1a "Evidence that an address is internal"):
1. Membership is the strongest evidence: every address in it is INTERNAL for strict mode,
   whatever DNS says. It lists the pod IPs of the project's pods (cluster-wide, IPv4 and
   IPv6) and the project's Service cluster IPs (both families).
2. The file is ``members.json`` in the pod's setup state directory, replaced atomically
   (write a temporary file, rename) by its writer; the proxy reads it at start and whenever
   it changes. ``generation`` only grows: a file with a lower generation than the one loaded
   is ignored (an out-of-order writer), so membership never goes back in time.
3. A file that does not parse is refused with a clear message and the last good membership
   is kept; a proxy never runs on half a file.
4. The format, version 1 (JSON, UTF-8)::

       {"format": "tencrypt-members/1", "project": "shop", "generation": 42,
        "pods": ["10.128.2.7", "fd00:10:128::7"], "services": ["172.30.5.9"]}

   ``project`` is the namespace name; ``pods`` and ``services`` are lists of IP address
   strings (any order, duplicates allowed); unknown keys are ignored (forward compatible).

Pure: text in, ``Members`` out, and the reverse.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

FORMAT = "tencrypt-members/1"
FILE_NAME = "members.json"
MAX_ADDRESSES = 1 << 20  # a bound on what one file may hold (a project of a million pods)


class MembershipError(ValueError):
    """The membership text is not a valid ``tencrypt-members/1`` document."""


@dataclass(frozen=True, slots=True)
class Members:
    project: str
    generation: int
    pods: frozenset[str]
    services: frozenset[str]

    @property
    def addresses(self) -> frozenset[str]:
        return self.pods | self.services


def _addresses(value: object, key: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise MembershipError(f"{key!r} must be a list of IP addresses")
    if len(value) > MAX_ADDRESSES:
        raise MembershipError(f"{key!r} holds {len(value)} addresses, more than {MAX_ADDRESSES}")
    out = set()
    for item in value:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            out.add(str(ipaddress.ip_address(item)))  # canonical text: one spelling per address
        except (ValueError, TypeError):
            raise MembershipError(f"{key!r}: not an IP address: {item!r}") from None
    return frozenset(out)


def parse_members(text: str | bytes) -> Members:
    """Rule 3/4: a ``Members`` or ``MembershipError`` saying what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MembershipError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MembershipError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise MembershipError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    project, generation = doc.get("project"), doc.get("generation")
    if not isinstance(project, str) or not project:
        raise MembershipError("'project' must be a non-empty string")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise MembershipError("'generation' must be a non-negative integer")
    return Members(
        project,
        generation,
        _addresses(doc.get("pods", []), "pods"),
        _addresses(doc.get("services", []), "services"),
    )


def render_members(members: Members) -> str:
    """The file's text for ``members`` (sorted, so equal memberships give equal files)."""
    return (
        json.dumps(
            {
                "format": FORMAT,
                "project": members.project,
                "generation": members.generation,
                "pods": sorted(members.pods, key=_sort_key),
                "services": sorted(members.services, key=_sort_key),
            }
        )
        + "\n"
    )


def _sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)
