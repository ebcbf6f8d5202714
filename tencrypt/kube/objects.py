"""What node-sync and the agent both read of a Kubernetes object (pure: no client).

Rules:
- A namespace (project) takes part while it carries the label ``tencrypt.io/enabled=true``.
- A watch delivers ``ADDED``, ``MODIFIED`` and ``DELETED`` events (``BOOKMARK`` and ``ERROR``
  are handled by the reflector and never reach a consumer); a listed object is folded as
  ``ADDED``.
"""

from __future__ import annotations

import enum

ENABLED_LABEL = "tencrypt.io/enabled"


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
