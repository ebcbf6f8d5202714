"""core/ stays pure: its modules import only an allow-list, so no I/O, clock, randomness or kernel
interface can creep in (docs/STYLE.md: pure ``core/``, ``now`` and randomness injected).

The rule: a module of tencrypt/core/ may import

- ``tencrypt.core.*`` (absolute or relative);
- ``tencrypt.errors`` (the package's exception types; itself held to this same rule);
- the third-party libraries the pure code is built on: ``cryptography``, ``dnslib``, ``numpy``;
- the standard-library modules in ``STDLIB``: computation on values only. Adding one is a
  reviewed one-line change here; ``MUST_NOT`` names what may never be added (I/O, processes,
  clocks, randomness, the kernel shells, the daemon, the lab);

and nothing else, including under ``if TYPE_CHECKING:``. ``EXCEPTIONS`` lists the imports
outside the rule that exist today, each with its reason and issue; a stale entry fails
``test_exceptions_are_still_needed``, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tencrypt
import tencrypt.core

CORE = Path(tencrypt.core.__file__).parent
PACKAGE = Path(tencrypt.__file__).parent

STDLIB = frozenset(
    {
        "__future__",
        "base64",
        "binascii",
        "collections",
        "dataclasses",
        "enum",
        "hashlib",
        "heapq",
        "hmac",
        "ipaddress",
        "json",
        "posixpath",
        "re",
        "struct",
        "typing",
    }
)
THIRD_PARTY = frozenset({"cryptography", "dnslib", "numpy"})
OWN = ("tencrypt.core", "tencrypt.errors")

# For the pure modules outside core/ (agent, node-sync: their own tests use these two): the
# top-level modules of I/O, processes, clocks and randomness they must not import, and the
# roots a file imports. (core/ is held to the allow-list above instead.)
FORBIDDEN = frozenset(
    {
        "socket",
        "os",
        "select",
        "selectors",
        "asyncio",
        "time",
        "datetime",
        "subprocess",
        "pyroute2",
        "fcntl",
        "threading",
        "uvloop",
        "signal",
        "secrets",
        "random",
    }
)

# what core/ may never import: everything the pure modules outside it may not, and more
MUST_NOT = FORBIDDEN | frozenset(
    {
        "tencrypt.linux",
        "tencrypt.daemon",
        "tencrypt.lab",
        "tencrypt.agent",
        "tencrypt.nodesync",
        "tencrypt.cli",
        "io",
        "pathlib",
        "shutil",
        "logging",
        "importlib",
        "ctypes",
        "sys",
    }
)


def imported_roots(path: Path) -> set[str]:
    """Top-level names of the absolute imports of ``path`` (``os.path`` -> ``os``)."""
    return {m.split(".")[0] for m in imported_modules(path, "") if m and not m.startswith(".")}


# (core module file, imported module) -> why it is there today. Issue #12: randomness is
# injected everywhere else; these two defaults go when their callers (daemon.py builds the
# Tunnel, linux/dns.py the PendingTable) pass secrets.token_bytes / secrets.randbits in.
# Remove an entry with its import; never add one.
EXCEPTIONS = {
    ("session.py", "secrets"): "Tunnel(rng=secrets.token_bytes) default, issue #12",
    ("dnsmsg.py", "secrets"): "PendingTable(rand16=...) default via secrets.randbits, issue #12",
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Dotted names of every module ``path`` imports, relative imports resolved against
    ``package`` (the dotted package the file lives in). ``from X import Y`` yields ``X`` and
    ``X.Y`` (Y may be a sub-module); a use of ``__import__`` yields ``"__import__"``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                module = ".".join(
                    parts[: len(parts) - node.level + 1] + ([module] if module else [])
                )
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.Name) and node.id == "__import__":
            names.add("__import__")
    return names


def allowed(module: str) -> bool:
    """True if the rule in the module docstring lets a core module import ``module``."""
    if any(module == own or module.startswith(own + ".") for own in OWN):
        return True
    return module.split(".")[0] in STDLIB | THIRD_PARTY


def violations(path: Path, package: str) -> set[str]:
    return {m for m in imported_modules(path, package) if not allowed(m)}


def test_core_imports_only_the_allow_list():
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 10
    bad = {}
    for path in modules:
        found = violations(path, "tencrypt.core")
        found -= {m for (name, m) in EXCEPTIONS if name == path.name}
        if found:
            bad[path.name] = sorted(found)
    assert not bad, f"core modules import outside the allow-list: {bad}"


def test_errors_module_is_pure_too():
    assert violations(PACKAGE / "errors.py", "tencrypt") == set()


def test_exceptions_are_still_needed():
    for name, module in EXCEPTIONS:
        assert module in imported_modules(CORE / name, "tencrypt.core"), (
            f"{name} no longer imports {module}: remove the exception"
        )


def test_allow_list_excludes_io_clock_randomness_and_the_shells():
    for name in MUST_NOT:
        assert not allowed(name) and not allowed(name + ".x"), name
    assert {m for (_, m) in EXCEPTIONS} <= {"secrets"}, "exceptions may only shrink"


def test_checker_sees_every_spelling(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os.path\nfrom time import monotonic\nfrom .. import daemon\n"
        "from ..linux import tun\nimport tencrypt.lab.cluster\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from tencrypt.linux.dns import DnsProxy\n"
        "from . import wire\nmod = __import__('socket')\n"
    )
    assert violations(probe, "tencrypt.core") == {
        "os.path",
        "time",
        "time.monotonic",
        "tencrypt",
        "tencrypt.daemon",
        "tencrypt.linux",
        "tencrypt.linux.tun",
        "tencrypt.lab.cluster",
        "tencrypt.linux.dns",
        "tencrypt.linux.dns.DnsProxy",
        "__import__",
    }
