"""Running node-sync's commands (iptables-restore, nft, conntrack), in a named network
namespace when one is given.

Rule: no timeout. A sync that takes long on a large cluster is logged with its duration by
the syncer, never killed half-way: a timeout a large cluster always hits would make
node-sync fail outright (the 60 s limit of old did at ~6,000 Services with iptables).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from tencrypt.errors import SetupError
from tencrypt.linux import netns as nsutil


def run(
    argv: Sequence[str], netns: str | None, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (in ``netns`` if given); SetupError naming it if it fails."""
    full = nsutil.exec_argv(netns, argv) if netns else list(argv)
    try:
        proc = subprocess.run(full, capture_output=True, text=True, input=input)
    except FileNotFoundError as exc:
        raise SetupError(f"{full[0]} not found: install it (see scripts/k8s/README.md)") from exc
    if check and proc.returncode != 0:
        raise SetupError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"{(proc.stderr.strip() or proc.stdout.strip())[-2000:]}"
        )
    return proc
