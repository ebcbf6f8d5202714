"""Strict mode: the pod's own firewall refuses plaintext from pods of its project.

One nftables table ``ip tencrypt`` in the pod's namespace, written and changed with ``nft -f -``
(each change is one atomic transaction):

    set project   { type ipv4_addr }      addresses known to belong to this project: peers of
                                          authenticated sessions, and what the DNS proxy classified
                                          internal (VIPs and pod IPs)
    chain input   { hook input priority -10 }
        iifname <uplink> udp dport <port> accept        the tunnel itself
        iifname <uplink> ip saddr @project counter drop plaintext from the project
Packets opened by the proxy re-enter through the loopback (raw socket) and are not affected;
cross-project and external traffic never matches the set.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from tencrypt.errors import SetupError

TABLE = "tencrypt"


def _nft(script: str) -> None:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=10)
    except FileNotFoundError as exc:
        raise SetupError("nft not found: install nftables (strict mode needs it) or use --no-strict") from exc
    if proc.returncode != 0:
        raise SetupError(f"nft refused the strict-mode rules: {proc.stderr.strip()}")


class StrictFirewall:
    def __init__(self, uplink: str, port: int) -> None:
        self.uplink = uplink
        self.port = port
        self.members: set[str] = set()

    def install(self) -> None:
        remove_table()
        _nft(f"""table ip {TABLE} {{
  set project {{ type ipv4_addr; }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{self.uplink}" udp dport {self.port} accept
    iifname "{self.uplink}" ip saddr @project counter drop
  }}
}}
""")
        self.members.clear()

    def add(self, ips: Iterable[str]) -> None:
        new = set(ips) - self.members
        if new:
            _nft(f"add element ip {TABLE} project {{ {', '.join(sorted(new))} }}\n")
            self.members |= new

    def discard(self, ips: Iterable[str]) -> None:
        gone = set(ips) & self.members
        if gone:
            _nft(f"delete element ip {TABLE} project {{ {', '.join(sorted(gone))} }}\n")
            self.members -= gone


def remove_table() -> None:
    """Remove the strict-mode table if it is there (shutdown, `setup --undo`)."""
    try:
        subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, timeout=10)
    except FileNotFoundError:
        pass  # no nft, so no table either
