"""What node-sync and the agent both read of a Kubernetes object (pure: no client).

Rules:
- A namespace (project) takes part while it carries the label ``tencrypt.io/enabled=true``.
- A watch delivers ``ADDED``, ``MODIFIED`` and ``DELETED`` events (``BOOKMARK`` and ``ERROR``
  are handled by the reflector and never reach a consumer); a listed object is folded as
  ``ADDED``.
"""

from __future__ import annotations

import argparse
import enum

ENABLED_LABEL = "tencrypt.io/enabled"


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


def add_kubeconfig_argument(p: argparse.ArgumentParser) -> None:
    """``--kubeconfig FILE``, read by ``kube.client.new_api_client`` (which imports the
    client: this module stays light, so building ``--help`` does not load it)."""
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig to use (default: in-cluster service account, else "
        "$KUBECONFIG or ~/.kube/config)",
    )
