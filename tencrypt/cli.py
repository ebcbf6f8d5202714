"""argv → parsed arguments → the one entry point that does the work.

Every sub-command is declared here, so that ``tencrypt --help`` and ``tencrypt CMD --help``
describe the whole interface in one place. Handlers are ``module:function`` strings imported
only when their command runs, so that ``--help`` stays fast and a command never pays for
another's imports. A handler takes the parsed ``argparse.Namespace`` and returns an exit code.

``main`` declares the flags of the one command on its line only (``build_parser(only=...)``):
some commands' flags live beside their handlers (node-sync, agent, key, status, bench), and a
proxy (`tencrypt run`, one per pod) must not carry their modules — the Kubernetes objects, the
HTTP server, nft and netns helpers — for its whole life (memory, issue 16).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tencrypt import __version__, argtypes
from tencrypt.core import TUNNEL_PORT
from tencrypt.errors import TencryptError
from tencrypt.setupflags import add_arguments as _setup

PSK_HELP = (
    "the project key is read from --psk-file FILE or the TENCRYPT_PROJECT_PSK environment "
    "variable (32 random bytes in base64, as `openssl rand -base64 32` prints), never from "
    "the command line"
)

SPIN_US = 400.0  # run --spin-us: linux/spin.py; measured in README ("Latency")

Adder = Callable[[argparse.ArgumentParser], None]


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns`` without shutil: $COLUMNS when positive, else the
    width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, given the width up front. argparse makes one for every flag it
    declares (to check the metavar), and one without a width imports ``shutil`` to measure
    the terminal — and with it zlib, bz2 and lzma, which a proxy would then carry for life."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = terminal_columns() - 2 if width is None else width  # as argparse's own default
        super().__init__(prog, indent_increment, max_help_position, width)


def _psk(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--psk-file",
        metavar="FILE",
        help="file holding the project key (base64), or a key ring for a rotation "
        "without restart: lines `current KEY`, `next KEY`, `previous KEY` "
        "(current required; `#` comments). Current initiates; next and previous "
        "are accepted too. Re-read within a second of a change and on SIGHUP; a "
        "malformed new file is refused (logged, counted) and the loaded keys kept",
    )


def _run(p: argparse.ArgumentParser) -> None:
    _psk(p)
    p.add_argument(
        "--strict",
        dest="strict",
        action="store_true",
        default=None,
        help="refuse plaintext from pods of this project (default when a key is present)",
    )
    p.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="fail OPEN: remove the firewall, accept plaintext from pods of this "
        "project, and reach a project pod without a proxy in the clear once "
        "its handshakes go unanswered (logged per peer, counted as "
        "plaintext_fallback)",
    )
    p.add_argument(
        "--handshake-give-up",
        type=argtypes.seconds,
        metavar="SECONDS",
        help="seconds of unanswered handshakes before a peer counts as unreachable "
        "(default: 30 strict, 5 with --no-strict)",
    )
    p.add_argument(
        "--session-lifetime",
        type=argtypes.seconds,
        metavar="SECONDS",
        help="seconds a session's keys may seal before a fresh handshake must replace "
        "them (re-keyed at two thirds of it; default: 180, WireGuard's)",
    )
    p.add_argument(
        "--members-file",
        metavar="FILE",
        help="the project's membership (tencrypt-members/2 or /1 JSON) written by the "
        "node agent; re-read when it changes (default: the file `tencrypt setup` was "
        "given with --members-file; none: standalone mode)",
    )
    p.add_argument(
        "--metrics",
        type=argtypes.address,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics over HTTP at this address, e.g. 127.0.0.1:9137",
    )
    p.add_argument(
        "--port",
        type=argtypes.port_number,
        default=TUNNEL_PORT,
        help=f"UDP port of the tunnel (default: {TUNNEL_PORT})",
    )
    p.add_argument(
        "--spin-us",
        type=argtypes.microseconds,
        default=SPIN_US,
        metavar="MICROSECONDS",
        help="after its last packet the proxy keeps polling this long before it sleeps, so "
        "that the reply of a round trip finds it awake; costs CPU only within that window "
        f"after traffic (default: {SPIN_US:g}; 0: sleep at once)",
    )
    p.add_argument(
        "--no-batch",
        dest="batch",
        action="store_false",
        help="one packet per system call: disable TUN offloads and UDP GSO/GRO",
    )
    p.add_argument(
        "--express",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the express lane: packets of established flows sealed and opened in C, one "
        "call per readiness (needs the compiled fast path, the batch path and an IPv4 "
        "tunnel; otherwise off by itself; default: on, --no-express turns it off)",
    )
    p.add_argument(
        "--state-dir",
        default="/run/tencrypt",
        help="where `tencrypt setup` left its state (default: /run/tencrypt)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level",
    )


def _dns(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen", default="127.0.0.1:53", help="address to serve (default: 127.0.0.1:53)"
    )
    p.add_argument(
        "--upstream",
        help="cluster DNS server ADDR[:PORT] (default: from setup's state or resolv.conf)",
    )
    p.add_argument(
        "--domain",
        help="the project's DNS domain (default: from setup's state or "
        "resolv.conf's first `search` entry)",
    )
    p.add_argument(
        "--cluster-domain",
        default="cluster.local",
        help="the cluster's DNS domain (default: cluster.local)",
    )
    p.add_argument(
        "--timeout",
        type=argtypes.seconds,
        default=2.0,
        help="seconds before a silent upstream earns the client a SERVFAIL (default: 2)",
    )
    p.add_argument(
        "--cache-entries",
        type=argtypes.count,
        default=1024,
        metavar="N",
        help="answers kept for repeated queries, each at most for its records' TTL "
        "(default: 1024; 0: no cache)",
    )
    p.add_argument("--state-dir", default="/run/tencrypt", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _lab(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name",
        default="tenc",
        help="lab instance name, prefix of every namespace it makes (default: tenc)",
    )
    sub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="build the lab (cleaning a previous one of the same name first)")
    up.add_argument(
        "--nodes",
        type=int,
        choices=[1, 2],
        default=1,
        help="1 node, or 2 nodes joined over VXLAN (default: 1)",
    )
    up.add_argument(
        "--config",
        metavar="FILE",
        help="topology JSON (default: the built-in myproject/project2 topology)",
    )
    up.add_argument(
        "--ip-family",
        choices=["ipv4", "dual", "ipv6"],
        help="the cluster's IP families: ipv4; dual (every pod and Service also gets an "
        "IPv6 address from ULA prefixes, IPv4 primary, DNS answers A and AAAA); ipv6 "
        "(IPv6 only; two nodes run VXLAN over an IPv6 underlay). Default: the topology's "
        '"ip_family", else ipv4',
    )
    sub.add_parser("status", help="show nodes, pods, Services and what runs in each pod")
    ex = sub.add_parser("exec", help="run a command inside a pod's namespace")
    ex.add_argument("pod", metavar="POD")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    sub.add_parser("down", help="remove every namespace, link, rule, file and process of the lab")
    pa = sub.add_parser("patch", help="run the nsenter launcher on a pod: setup + tencrypt run")
    pa.add_argument("pod", metavar="POD")
    pa.add_argument("--no-strict", dest="strict", action="store_false", default=True)
    pa.add_argument(
        "--no-members",
        dest="members",
        action="store_false",
        default=True,
        help="run the proxy standalone: no membership file from the lab (which "
        "otherwise plays the node agent's part)",
    )
    un = sub.add_parser("unpatch", help="stop the pod's proxy and undo its setup")
    un.add_argument("pod", metavar="POD")
    np_ = sub.add_parser(
        "netpol",
        help="the lab's NetworkPolicies: enforced by every node as a CNI would, and handed "
        "to patched pods' proxies as the agent would",
    )
    np_.add_argument(
        "netpol_action",
        choices=["show", "apply", "clear"],
        help="show: which pods they isolate; apply FILE: replace them with the "
        "NetworkPolicy objects of FILE (JSON: one object, a list, or a v1 List); clear: none",
    )
    np_.add_argument("file", nargs="?", metavar="FILE", help="for apply ('-': stdin)")


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="leave the lab up after the demo")
    p.add_argument(
        "--name", default="tdemo", help="lab instance name for the demo (default: tdemo)"
    )
    p.add_argument(
        "--ip-family",
        choices=["ipv4", "dual", "ipv6"],
        default="dual",
        help="the demo lab's IP families (see `tencrypt lab up --help`; default: dual, "
        "IPv4 and IPv6, both sealed; ipv6: an IPv6-only cluster, the tunnel over IPv6)",
    )


def _bench(p: argparse.ArgumentParser) -> None:
    from tencrypt.benchcmd import add_arguments  # flags live beside their handler

    add_arguments(p)


def _node_sync(p: argparse.ArgumentParser) -> None:
    from tencrypt.nodesync.cli import add_arguments  # flags live beside their handler

    add_arguments(p)


def _agent(p: argparse.ArgumentParser) -> None:
    from tencrypt.agent.cli import add_arguments  # flags live beside their handler

    add_arguments(p)


def _key(p: argparse.ArgumentParser) -> None:
    from tencrypt.keyrotate import add_arguments  # flags live beside their handler

    add_arguments(p)


def _status(p: argparse.ArgumentParser) -> None:
    from tencrypt.status import add_arguments  # flags live beside their handler

    add_arguments(p)


COMMANDS: list[tuple[str, str, Adder, str]] = [
    (
        "setup",
        "configure this network namespace for the proxy (tenc0, routes, rules, resolv.conf); "
        "inputs are checked before anything changes, and a failed step undoes the others",
        _setup,
        "tencrypt.linux.podnet:main",
    ),
    (
        "run",
        "run the proxy in this (set-up) pod namespace: DNS proxy + sealed tunnel",
        _run,
        "tencrypt.runcmd:main",
    ),
    ("dns", "run only the embedded DNS proxy (for testing)", _dns, "tencrypt.dnscmd:main"),
    (
        "lab",
        "a namespace cluster on this machine: up, status, exec, patch, unpatch, netpol, down",
        _lab,
        "tencrypt.lab.cli:main",
    ),
    (
        "demo",
        "the original demo, end to end on a fresh lab, with a verdict",
        _demo,
        "tencrypt.lab.demo:main",
    ),
    (
        "node-sync",
        f"keep the node's VIP:{TUNNEL_PORT} -> pods forwarding (nftables table inet tencrypt, "
        "or the TENCRYPT iptables chain) in step with the Services and endpoints of enabled "
        "projects",
        _node_sync,
        "tencrypt.nodesync.cli:main",
    ),
    (
        "agent",
        "node daemon: run the proxy in every pod of this node whose project is enabled, "
        "restart it when it dies, undo the pod when it goes",
        _agent,
        "tencrypt.agent.cli:main",
    ),
    (
        "key",
        "rotate a project's key in three phases without restarting a proxy or cutting a "
        "connection (`key rotate --namespace NS`)",
        _key,
        "tencrypt.keyrotate:main",
    ),
    (
        "status",
        "print a running proxy's peers, sessions, classification counts and drops (from "
        "its --metrics endpoint or its socket), every proxy of this node (--node), or every "
        "enabled project of the cluster (--cluster)",
        _status,
        "tencrypt.status:main",
    ),
    (
        "bench",
        "iperf3 benchmark on the lab: vanilla vs Tencrypt vs wireguard-go vs OpenVPN "
        "(from a source checkout: bench/ is not in the installed package)",
        _bench,
        "tencrypt.benchcmd:main",
    ),
]


def share_group_flags(group: argparse.ArgumentParser) -> None:
    """Let every sub-command of a command group accept the group's flags too, so that
    ``tencrypt lab up --name X`` means ``tencrypt lab --name X up``.

    Each optional of ``group`` (other than --help) is declared again on each sub-command, with
    the default ``argparse.SUPPRESS``: given after the sub-command it overrides the group's
    value; not given there, the group's value (or default) stands. A sub-command's own flag of
    the same spelling wins (it is not re-declared). A group without sub-commands is untouched.
    Positional arguments are not moved: a flag goes before a sub-command's positionals when
    the last of them takes the rest of the line (``lab exec --name X POD -- CMD``).
    """
    subs = [a for a in group._actions if isinstance(a, argparse._SubParsersAction)]
    flags = [
        a for a in group._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]
    for sub in subs:
        for parser in sub.choices.values():
            for flag in flags:
                if any(o in parser._option_string_actions for o in flag.option_strings):
                    continue
                shared = copy.copy(flag)
                shared.default = argparse.SUPPRESS
                parser._add_action(shared)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole interface; with ``only`` (a command's name), the flags of that command alone:
    the others keep their name and help (``tencrypt --help`` lists them all) but declare no
    flags, and their adders' imports are not paid."""
    parser = argparse.ArgumentParser(
        prog="tencrypt",
        formatter_class=HelpFormatter,
        description="Transparent, authenticated encryption of the traffic between the pods of "
        "one project. " + PSK_HELP + ".",
    )
    parser.add_argument("--version", action="version", version=f"tencrypt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, adder, handler in COMMANDS:
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        if only is None or only == name:
            adder(p)
            share_group_flags(p)
        p.set_defaults(handler=handler)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not a flag (the top level's flags,
    --help and --version, take no value), if that is a command; else None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if any(word == name for name, *_ in COMMANDS) else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` (default: the process's) parsed with the flags of the command it names only."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return build_parser(only=command_of(argv)).parse_args(argv)


# Modules a command keeps out although a library would import them if it could: `run` never
# speaks TLS, and asyncio imports ssl (about 1.3 MB of every proxy's RSS) only if it can.
KEPT_OUT = {"run": ("ssl",)}


def keep_out(command: str) -> None:
    """Make what ``KEPT_OUT`` lists for ``command`` unimportable: ``sys.modules[name] = None``
    turns an import into ImportError, which asyncio takes for a Python built without ssl.
    A module already loaded stays loaded. Call before the command's module is imported."""
    for name in KEPT_OUT.get(command, ()):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the command ``argv`` names. ``parser``: one ``build_parser`` made already for that
    command (the zygote's, tencrypt/zygotecmd.py: built once, shared by every forked proxy)."""
    args = parse_args(argv) if parser is None else parser.parse_args(argv)
    keep_out(args.command)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module, func = args.handler.split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except TencryptError as exc:
        print(f"tencrypt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
