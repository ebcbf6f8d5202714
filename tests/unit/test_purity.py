"""core/ stays pure: no module in it imports I/O, the clock or the kernel interfaces."""

import ast
from pathlib import Path

import tencrypt.core

FORBIDDEN = {"socket", "os", "select", "selectors", "asyncio", "time", "subprocess",
             "pyroute2", "fcntl", "threading", "uvloop", "signal"}
CORE = Path(tencrypt.core.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_modules_import_no_io():
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 2
    for path in modules:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_checker_sees_a_forbidden_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os.path\nfrom time import monotonic\n")
    assert imported_roots(probe) >= {"os", "time"}
