"""What a proxy carries (issue 16, memory: a proxy per pod, idle RSS ≤ 35 MB): `tencrypt run`
loads what its running path needs and nothing of the other commands.

A fresh interpreter parses a `run` line as ``tencrypt.cli.main`` does, imports the handler's
module and every module that ``serve()``, ``main()`` and the ports they open import inside
their bodies (found in the source, so a new one is covered), and reports ``sys.modules``. The
assertions are about which modules are loaded — never RSS or time, which depend on the machine.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import tencrypt

PACKAGE = Path(tencrypt.__file__).parent

# (module file, functions) whose body imports are part of the running proxy
LAZY = {
    "runcmd.py": ("serve", "main"),
    "ports.py": ("open_ports",),
    "fastpath.py": ("compiled",),
}

NEVER = {
    # not on the running path at all: other commands, the cluster client, setup's helpers
    "numpy": "only the bench and its analysis",
    "pyroute2": "routes go through raw rtnetlink (linux.rtnl)",
    "kubernetes": "the cluster is the agent's business, never the proxy's",
    "tencrypt.kube": "the agent and node-sync read the cluster",
    "tencrypt.nodesync": "node-sync's flags are declared only for node-sync",
    "tencrypt.agent": "the agent's flags are declared only for the agent",
    "tencrypt.keyrotate": "`key rotate` only",
    "tencrypt.status": "`status` only",
    "tencrypt.lab": "the lab only",
    "tencrypt.linux.netlink": "pyroute2's wrapper, setup only",
    "tencrypt.linux.netns": "ctypes' setns, lab and node tools only",
    "uvloop": "the proxy runs on asyncio's own loop (runcmd.main)",
    "ssl": "no TLS in the proxy; cli.keep_out keeps asyncio from importing it",
    "http.server": "metrics are served with asyncio streams",
    "email": "http.server's",
    "shutil": "argparse asks it the terminal width unless told (cli.HelpFormatter)",
    "lzma": "shutil's",
    "bz2": "shutil's",
    "cryptography.hazmat.primitives.serialization": "every key type's module; raw bytes suffice",
    # rare paths: imported when taken, not before
    "tencrypt.linux.inbound": "standalone strict mode only (Proxy.start imports it)",
    "tencrypt.linux.nfqueue": "standalone strict mode only",
    "tencrypt.core.nfqmsg": "standalone strict mode only",
}

NEEDED = (  # the running path: if these are missing, the probe did not run it
    "tencrypt.daemon",
    "tencrypt.linux.dns",
    "tencrypt.linux.metrics",
    "tencrypt.linux.gso",
    "tencrypt.linux.rtnl",
    "asyncio",
    "dnslib",
    "cryptography.hazmat.primitives.asymmetric.x25519",
)


def lazy_imports() -> list[str]:
    """The modules imported inside the bodies of the ``LAZY`` functions."""
    found: list[str] = []
    for file, functions in LAZY.items():
        tree = ast.parse((PACKAGE / file).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in functions:
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        found += [a.name for a in inner.names]
                    elif isinstance(inner, ast.ImportFrom) and inner.module:
                        found.append(inner.module)
                        found += [f"{inner.module}.{a.name}" for a in inner.names]
    return found


PROBE = """
import importlib, json, sys
from tencrypt import cli
args = cli.parse_args(sys.argv[1:])
cli.keep_out(args.command)
importlib.import_module(args.handler.split(":")[0])
for name in json.loads(sys.stdin.read()):
    try:
        importlib.import_module(name)
    except ImportError:  # `from pkg import attr`: attr is no module; _fastpath may be unbuilt
        pass
print(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None)))
"""


def loaded_by_run() -> set[str]:
    argv = ["run", "--psk-file", "/nonexistent", "--metrics", "127.0.0.1:9137"]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        input=json.dumps(lazy_imports()),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(json.loads(out))


def test_the_probe_finds_the_lazy_imports() -> None:
    found = lazy_imports()
    assert {"tencrypt.linux.dns", "tencrypt.linux.gso"} <= set(found)


def test_run_loads_its_path_and_nothing_else() -> None:
    modules = loaded_by_run()
    assert set(NEEDED) <= modules
    loaded = {
        name: why
        for name, why in NEVER.items()
        if any(m == name or m.startswith(name + ".") for m in modules)
    }
    assert loaded == {}
