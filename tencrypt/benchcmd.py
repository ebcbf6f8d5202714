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

Its flags are declared here too (``add_arguments``, called by tencrypt/cli.py for ``tencrypt
bench`` only): their values are checked by bench/plan.py, which turns them into the plan.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from tencrypt import argtypes
from tencrypt.errors import UsageError

DEFAULT_SYSTEMS = "vanilla,tencrypt,tencrypt-netpol,wireguard-go,openvpn"
DEFAULT_CLIENTS, DEFAULT_NODES = "1,5,10,20", "1,2"  # bench/plan.py: --quick replaces them

NOT_IN_WHEEL = (
    "the benchmark is not part of the installed package: it lives in bench/ of the "
    "source repository. Run it from a clone: `bash scripts/install.sh` there, then "
    "`.venv/bin/tencrypt bench` (as root)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``tencrypt bench``."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run (under two minutes): fewer client counts, short iperf3 runs",
    )
    p.add_argument(
        "--systems",
        default=DEFAULT_SYSTEMS,
        help="comma-separated systems to measure (default: all five; tencrypt-netpol is "
        "Tencrypt with NetworkPolicies isolating both pods). A peer tunnel that is not "
        "installed and cannot be installed with apt-get is skipped, and the report says so",
    )
    p.add_argument(
        "--clients",
        default=DEFAULT_CLIENTS,
        help=f"comma-separated parallel client counts for TCP (default: {DEFAULT_CLIENTS})",
    )
    p.add_argument(
        "--nodes",
        default=DEFAULT_NODES,
        help=f"lab shapes to measure: 1, 2 or 1,2 (default: {DEFAULT_NODES})",
    )
    p.add_argument(
        "--duration",
        type=argtypes.seconds,
        default=10.0,
        help="seconds per iperf3 run (default: 10)",
    )
    p.add_argument(
        "--udp-rate", default="1G", help="offered UDP rate for the loss test (default: 1G)"
    )
    p.add_argument(
        "--out", default="bench/results", help="directory for CSV, markdown and PNG plots"
    )
    p.add_argument("--name", default="tbench", help="lab instance name (default: tbench)")
    p.add_argument(
        "--ip-family",
        choices=["ipv4", "dual"],
        default="ipv4",
        help="dual: a dual-stack lab, and each system's TCP runs repeated over IPv6 "
        "(vanilla, Tencrypt, wireguard-go; not OpenVPN); a full run writes ipv6.* "
        "(default: ipv4)",
    )
    p.add_argument(
        "--peer-binary",
        action="append",
        default=[],
        metavar="SYSTEM=PATH",
        help="also measure this build of a peer (wireguard-go or openvpn) next to the "
        "Debian one, labelled with its --version; repeatable. The bench never "
        "downloads or builds it",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="N",
        help="after each lab shape's main pass, N more rounds of the rows judged against "
        "the current wireguard-go (--peer-binary): ping, sparse request/response and TCP at "
        "1 and 10 clients with the tunnel's CPU, for vanilla (no TCP), that wireguard-go and "
        "Tencrypt, the systems alternating, so that those targets (CPU per Gbit/s too) are "
        "judged on every round's figures "
        "(default: 2 in a full run, 0 with --quick)",
    )
    p.add_argument(
        "--idle-json",
        metavar="PATH",
        help="the result of `python -m bench.idle` (idle proxies on one node: CPU, RSS, PSS, "
        "private memory): its row and its targets join the report. Not given: those "
        "targets say not measured",
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
