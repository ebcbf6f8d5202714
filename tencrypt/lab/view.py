"""What the lab's helpers (``status``, ``proxy``) may use of a lab: a Protocol that
``cluster.Lab`` satisfies.

It exists to break the import cycle ``cluster -> proxy, status -> cluster``: the helpers type
their ``lab`` parameter with ``LabView`` from here, so only ``cluster`` imports them and nothing
in the lab package imports ``cluster`` back. A helper that needs more of the lab adds it here
(mypy then checks that ``Lab`` still provides it where ``cluster`` passes ``self``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tencrypt.lab.topology import Node, Pod, Service, Topology


class LabView(Protocol):
    """The read-only face of a lab plus the paths of its per-lab files and its progress line."""

    name: str
    nodes: dict[str, Node]
    pods: dict[str, Pod]
    dns_ip: str
    dns_ips: list[str]
    families: tuple[int, ...]
    state_dir: Path
    topology: Topology

    @property
    def services(self) -> list[Service]: ...

    @property
    def projects(self) -> list[str]: ...

    def psk_file(self, project: str) -> Path: ...

    def log_file(self, what: str) -> Path: ...

    def pid_file(self, what: str) -> Path: ...

    def say(self, text: str) -> None: ...
