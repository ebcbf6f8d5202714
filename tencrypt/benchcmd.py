"""``tencrypt bench``: runs the benchmark of the source checkout this package was loaded from.

The benchmark (``bench/``: harness, peer tunnels, plots) is development tooling, not part of
the product: the wheel and the node image carry ``tencrypt`` only. Rules:

1. ``bench/`` is looked for beside the ``tencrypt`` package directory, i.e. at the top of the
   checkout the code runs from (``pip install -e .``, ``PYTHONPATH=checkout``, or
   ``python -m tencrypt`` in the checkout). An importable ``bench`` package elsewhere on
   ``sys.path`` is not used: the benchmark measures the code beside it.
2. Found: its directory goes first on ``sys.path`` and ``bench.harness.main(args)`` runs.
3. Not found (an installed wheel): a ``UsageError`` that says where the benchmark lives and how
   to run it. Nothing is imported, installed or downloaded.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from tencrypt.errors import UsageError

NOT_IN_WHEEL = (
    "the benchmark is not part of the installed package: it lives in bench/ of the "
    "source repository. Run it from a clone: `bash scripts/install.sh` there, then "
    "`.venv/bin/tencrypt bench` (as root)"
)


def checkout_root(package_dir: Path | None = None) -> Path | None:
    """The checkout holding ``bench/harness.py`` beside the ``tencrypt`` package, or None."""
    package_dir = package_dir or Path(__file__).resolve().parent
    root = package_dir.parent
    return root if (root / "bench" / "harness.py").is_file() else None


def main(args: argparse.Namespace) -> int:
    root = checkout_root()
    if root is None:
        raise UsageError(NOT_IN_WHEEL)
    if not sys.path or sys.path[0] != str(root):
        sys.path.insert(0, str(root))
    harness = importlib.import_module("bench.harness")
    if Path(harness.__file__ or "").resolve().parent != root / "bench":
        raise UsageError(f"bench: imported {harness.__file__}, not the checkout's {root}/bench")
    return int(harness.main(args) or 0)
