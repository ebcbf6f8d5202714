"""Constants once: each of these numbers is defined in exactly one module and imported elsewhere.

- kernel ABI numbers of the shells (``SO_MARK``, ``UDP_SEGMENT``, the TUN ioctls, ...):
  ``tencrypt/linux/kernel.py``, citing their headers;
- ``VNET_HDR_LEN`` (the virtio-net header, parsed by pure code): ``tencrypt/core/batch.py``;
- the tunnel's 60-byte per-packet overhead: ``OVERHEAD`` in ``tencrypt/core/podconfig.py``;
- the tunnel port 1337: ``TUNNEL_PORT`` in ``tencrypt/core/__init__.py``; no other code of the
  package or the benchmark spells 1337 as a number (tests may: they state expected bytes).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import tencrypt

PACKAGE = Path(tencrypt.__file__).parent
ROOTS = [PACKAGE, PACKAGE.parent / "bench"]

HOMES = {
    "SO_MARK": "tencrypt/linux/kernel.py",
    "SO_RCVBUFFORCE": "tencrypt/linux/kernel.py",
    "SO_SNDBUFFORCE": "tencrypt/linux/kernel.py",
    "SO_NETNS_COOKIE": "tencrypt/linux/kernel.py",
    "SOL_UDP": "tencrypt/linux/kernel.py",
    "UDP_SEGMENT": "tencrypt/linux/kernel.py",
    "UDP_GRO": "tencrypt/linux/kernel.py",
    "TUNSETIFF": "tencrypt/linux/kernel.py",
    "RT_TABLE_MAIN": "tencrypt/linux/kernel.py",
    "VNET_HDR_LEN": "tencrypt/core/batch.py",
    "OVERHEAD": "tencrypt/core/podconfig.py",
    "TUNNEL_PORT": "tencrypt/core/__init__.py",
}
PORT = 1337


def sources() -> list[tuple[str, ast.Module, list[str]]]:
    out = []
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            text = path.read_text()
            out.append(
                (path.relative_to(PACKAGE.parent).as_posix(), ast.parse(text), text.splitlines())
            )
    return out


def module_level_names(tree: ast.Module) -> dict[str, ast.expr | None]:
    names: dict[str, ast.expr | None] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names[t.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node.value
    return names


def definitions() -> dict[str, list[str]]:
    """Constant name -> the files that assign it at module level (imports do not count)."""
    found: dict[str, list[str]] = {name: [] for name in HOMES}
    for name, tree, _ in sources():
        for const in module_level_names(tree).keys() & HOMES.keys():
            found[const].append(name)
    return found


def port_literals() -> list[str]:
    """``1337 in FILE`` for every integer 1337 outside TUNNEL_PORT's home, except routing-table
    numbers (``table``: the policy-routing table, a different number that happens to match)."""
    hits = []
    for name, tree, lines in sources():
        if name == HOMES["TUNNEL_PORT"]:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == PORT and type(node.value) is int:
                line = lines[node.lineno - 1]
                if "table" not in line:
                    hits.append(f"1337 in {name}")
    return hits


def sixty_byte_overheads() -> list[str]:
    """``module.NAME`` of every module-level *OVERHEAD* constant in the package worth 60."""
    hits = []
    for name, tree, _ in sources():
        if not name.startswith("tencrypt/"):
            continue
        consts = [n for n in module_level_names(tree) if "OVERHEAD" in n]
        if consts:
            module = importlib.import_module(name.removesuffix(".py").replace("/", "."))
            hits += [f"{module.__name__}.{n}" for n in consts if getattr(module, n) == 60]
    return hits


def test_homes_define_them():
    found = definitions()
    for const, home in HOMES.items():
        assert home in found[const], f"{const} is not defined in {home}"


def problems() -> set[str]:
    found = definitions()
    out = {f"{c} also in {f}" for c, files in found.items() for f in files if f != HOMES[c]}
    out |= set(port_literals())  # a file may hold several
    out |= {h for h in sixty_byte_overheads() if h != "tencrypt.core.podconfig.OVERHEAD"}
    return out


def test_each_constant_once():
    assert problems() == set()


def test_the_finders_see_copies():
    assert "tencrypt.core.podconfig.OVERHEAD" in sixty_byte_overheads()
