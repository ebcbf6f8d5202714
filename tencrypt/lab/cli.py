"""``tencrypt lab ACTION``: argv (declared in tencrypt/cli.py) -> the Lab method that does it.

``exec`` attaches the caller's stdin, stdout and stderr to the command and returns its exit
code; ``down`` works without a state file (it cleans by name); every other action except
``up`` needs a lab that ``up`` built (``UsageError`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tencrypt.errors import UsageError
from tencrypt.lab import netpolicy
from tencrypt.lab.cluster import STATE_ROOT, Lab
from tencrypt.lab.topology import Topology
from tencrypt.linux import netns


def main(args: argparse.Namespace) -> int:
    action = args.lab_command
    if action == "up":
        topology = Topology.from_file(args.config) if args.config else Topology.default()
        if args.ip_family:
            topology.ip_family = args.ip_family
        Lab(args.name, topology, args.nodes).up()
        return 0
    if action == "down":
        _lab_or_bare(args.name).down()
        return 0
    lab = Lab.load(args.name)
    if action == "status":
        print(lab.status(), end="")
        return 0
    if action == "exec":
        return exec_attached(lab, args.pod, args.cmd)
    if action == "patch":
        lab.patch(args.pod, strict=args.strict, members=args.members)
        return 0
    if action == "unpatch":
        lab.unpatch(args.pod)
        return 0
    if action == "netpol":
        return netpol(lab, args.netpol_action, args.file)
    raise UsageError(f"unknown lab action {action!r}")


def netpol(lab: Lab, action: str, path: str | None) -> int:
    if action == "show":
        print(netpolicy.describe(lab))
        return 0
    if action == "clear":
        lab.set_network_policies([])
        return 0
    if not path:
        raise UsageError("lab netpol apply: which file? (usage: tencrypt lab netpol apply FILE)")
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        doc = json.loads(text)
    except OSError as exc:
        raise UsageError(f"lab netpol apply: cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"lab netpol apply: {path} is not JSON: {exc}") from exc
    items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else doc
    items = items if isinstance(items, list) else [items]
    if not all(isinstance(i, dict) and i.get("kind") == "NetworkPolicy" for i in items):
        raise UsageError("lab netpol apply: every object must be a NetworkPolicy")
    lab.set_network_policies(items)
    print(netpolicy.describe(lab))
    return 0


def _lab_or_bare(name: str) -> Lab:
    """The lab's own record if there is one; otherwise a default one of that name, which is
    enough for ``down`` (it removes by name, not from the record)."""
    if (STATE_ROOT / name / "state.json").exists():
        try:
            return Lab.load(name)
        except UsageError:
            pass
    return Lab(name)


def exec_attached(lab: Lab, target: str, cmd: list[str]) -> int:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("lab exec: nothing to run (usage: tencrypt lab exec POD -- CMD...)")
    ns = lab.netns_of(target)
    if not netns.exists(ns):
        raise UsageError(f"namespace {ns} of {target} does not exist: is lab {lab.name} up?")
    try:
        return subprocess.run(netns.exec_argv(ns, cmd)).returncode
    except KeyboardInterrupt:
        return 130
