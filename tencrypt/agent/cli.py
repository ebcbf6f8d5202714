"""``tencrypt agent``: flags and the entry point (``tencrypt.agent.cli:main``).

Runs until SIGTERM/SIGINT. What happens to the proxies then is ``--on-exit``:
- ``keep`` (default): they keep running and the next agent adopts them from its records, so
  an agent restart (an upgrade, a crash) cuts no tunnel. A crash cannot unpatch anything
  anyway: adoption has to exist, and a clean stop uses the same path.
- ``unpatch``: every proxy is stopped and its pod undone — before removing Tencrypt from a
  node, or where the proxies would not outlive the agent anyway: in a ``hostPID`` container,
  the runtime SIGKILLs every process left in the container's cgroup when it stops (runc's
  ``destroy``), which would leave pods with a dead DNS proxy and a Service route into a
  TUN device nobody reads (scripts/k8s/README.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tencrypt import argtypes
from tencrypt.errors import UsageError
from tencrypt.kube.objects import add_kubeconfig_argument

if TYPE_CHECKING:
    from tencrypt.linux.zygote import Zygote

log = logging.getLogger("tencrypt.agent")
STATE_DIR = "/run/tencrypt-agent"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node",
        default=os.environ.get("NODE_NAME"),
        help="this node's name, as in the Pods' spec.nodeName (default: $NODE_NAME)",
    )
    add_kubeconfig_argument(p)
    p.add_argument(
        "--state-dir",
        default=STATE_DIR,
        help=f"keys (0600 in 0700), per-pod logs and records (default: {STATE_DIR})",
    )
    p.add_argument(
        "--sandbox",
        default="auto",
        choices=["auto", "cri", "proc", "annotation"],
        help="how to find a pod's sandbox PID: the CRI runtime (crictl), a /proc "
        "cgroup scan, auto = cri if crictl and a runtime socket are there, else "
        "proc; 'annotation' trusts the pod's tencrypt.io/sandbox-pid annotation "
        "(lab and tests only: never on a real cluster)",
    )
    p.add_argument(
        "--cri-endpoint",
        metavar="URL",
        help="CRI runtime endpoint for crictl (default: the first socket found of "
        "containerd, CRI-O, cri-dockerd)",
    )
    p.add_argument("--crictl", default="crictl", help="crictl binary (default: crictl on PATH)")
    p.add_argument(
        "--launcher",
        metavar="PATH",
        help="tencrypt-nsenter.sh (default: the source tree's scripts/, else PATH)",
    )
    p.add_argument(
        "--tencrypt-bin",
        metavar="PATH",
        help="the tencrypt the launcher runs (default: the one beside this Python, else PATH)",
    )
    p.add_argument(
        "--setup-args",
        default="",
        metavar="WORDS",
        help="extra words for `tencrypt setup` in every pod, e.g. "
        '"--service-cidr 10.96.0.0/12" (TENCRYPT_SETUP_ARGS)',
    )
    p.add_argument(
        "--setup-state-dir",
        default="/run/tencrypt",
        metavar="DIR",
        help="where `tencrypt setup` keeps per-namespace state (passed to setup, "
        "run and undo in every pod; cleaned up when a pod's namespace vanished "
        "before it could be undone; default: /run/tencrypt)",
    )
    p.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="run the proxies with --no-strict (accept plaintext from the project)",
    )
    p.add_argument(
        "--proxy-metrics",
        type=argtypes.address,
        metavar="ADDR:PORT",
        help="each proxy serves Prometheus metrics at this address inside its pod, "
        "e.g. 127.0.0.1:9137 (default: off)",
    )
    p.add_argument(
        "--metrics",
        type=argtypes.address,
        metavar="ADDR:PORT",
        help="serve the node's Prometheus metrics at http://ADDR:PORT/metrics: the agent's "
        "own (proxies by phase, starts, exits, passes) and every ready proxy's of this node, "
        "labelled namespace and pod (read from each proxy's socket); and the kubelet's "
        "probes: /healthz (the agent's loop turns), /readyz (the cluster listed and this "
        "node reconciled; 503 with the reason otherwise) (default: off; daemonset.yaml: the "
        "node's IP, port 9138)",
    )
    p.add_argument(
        "--ready-timeout",
        type=argtypes.seconds,
        default=30.0,
        metavar="SECONDS",
        help="a proxy not ready by then is killed and restarted (default: 30)",
    )
    p.add_argument(
        "--restart-backoff",
        type=argtypes.seconds,
        default=1.0,
        metavar="SECONDS",
        help="first delay before restarting a proxy that died; doubles per "
        "consecutive failure (default: 1)",
    )
    p.add_argument(
        "--restart-backoff-max",
        type=argtypes.seconds,
        default=60.0,
        metavar="SECONDS",
        help="longest delay between restarts (default: 60)",
    )
    p.add_argument(
        "--proxy-cgroup",
        default="agent",
        choices=["agent", "sandbox"],
        help="where a proxy runs: agent = in this agent's cgroup, so it stops with the agent "
        "container; sandbox = moved, before it starts, into its pod's sandbox cgroups "
        "(charged to the pod, stopped with the pod; needs the node's cgroupfs, at "
        "/host/sys/fs/cgroup in a container), so an agent restart or upgrade leaves it "
        "running for the next agent to adopt (use with --on-exit keep; daemonset.yaml does) "
        "(default: agent)",
    )
    p.add_argument(
        "--fork-proxies",
        action="store_true",
        help="fork every proxy from one warm parent (a zygote that imported what a proxy "
        "runs and froze its heap) instead of starting a Python of its own: the pages it "
        "imported are shared by every proxy of the node (bench/results/idle.md); setup "
        "still runs through the launcher (--setup-only) (default: off)",
    )
    p.add_argument(
        "--on-exit",
        default="keep",
        choices=["keep", "unpatch"],
        help="on SIGTERM: keep the proxies running for the next agent to adopt "
        "(default), or stop them and undo every pod",
    )
    p.add_argument(
        "--report-namespace",
        default=os.environ.get("POD_NAMESPACE", "tencrypt-system"),
        help="where to publish the ConfigMap tencrypt-keys-<node> listing the key "
        "rings this node's proxies loaded, which `tencrypt key rotate` waits on "
        "(default: $POD_NAMESPACE, else tencrypt-system)",
    )
    p.add_argument(
        "--no-key-report",
        dest="key_report",
        action="store_false",
        help="do not publish it (a rotation then cannot see this node catch up)",
    )
    p.add_argument(
        "--service-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="the cluster's Service CIDR(s), over what is discovered (ServiceCIDR objects, "
        "OpenShift's Network config); repeat for several; handed to every proxy and its setup",
    )
    p.add_argument(
        "--pod-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="the cluster's pod network, over what is discovered (OpenShift's Network "
        "config, the Nodes' podCIDRs); needed where pod IPs come from CNI IPAM blocks no "
        "API object names (e.g. Calico's IP pools); repeat for several",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level",
    )


def start_zygote() -> Zygote:
    """The proxies' warm parent (linux/zygote.py), output on this agent's stderr; it exits
    when this agent does (its socket closes), and the proxies it forked run on."""
    from tencrypt.linux.zygote import Zygote

    return Zygote()


def main(args: argparse.Namespace) -> int:
    from tencrypt.agent.agent import Agent, start_discovery, start_reflectors
    from tencrypt.agent.cidrs import discover
    from tencrypt.agent.reconcile import Policy
    from tencrypt.agent.resolver import Resolver
    from tencrypt.agent.supervisor import Supervisor
    from tencrypt.kube.client import new_api_client
    from tencrypt.kube.reflector import WATCH_TIMEOUT

    if not args.node:
        raise UsageError(
            "which node is this? pass --node NAME or set NODE_NAME (the "
            "DaemonSet sets it from spec.nodeName)"
        )
    if "--state-dir" in shlex.split(args.setup_args):
        raise UsageError(
            "give setup's state directory as --setup-state-dir DIR, not in "
            "--setup-args: the proxies and undos must use the same one"
        )
    if "--members-file" in shlex.split(args.setup_args):
        raise UsageError(
            "--members-file in --setup-args: the agent hands every pod its own membership file"
        )
    check_setup_args(args.setup_args)
    spaced = [d for d in (args.state_dir, args.setup_state_dir) if any(c.isspace() for c in d)]
    if spaced:
        raise UsageError(
            f"{spaced[0]!r}: the launcher splits TENCRYPT_SETUP_ARGS, which names it, on "
            "white space: choose a directory without any"
        )
    flags = (args.service_cidr, args.pod_cidr)
    given = discover(args.node, *flags)
    if given.skipped:
        raise UsageError(f"--service-cidr/--pod-cidr: not a CIDR in {' '.join(sum(flags, []))}")
    if os.geteuid() != 0:
        raise UsageError("needs root on the node (it enters pod network namespaces)")
    if min(args.restart_backoff, args.restart_backoff_max, args.ready_timeout) <= 0:
        raise UsageError(
            "--restart-backoff, --restart-backoff-max and --ready-timeout must be positive"
        )
    supervisor = Supervisor(
        Path(args.state_dir),
        launcher(args.launcher),
        tencrypt_bin(args.tencrypt_bin),
        run_args(args),
        setup_args=" ".join(shlex.split(args.setup_args)),
        setup_state_dir=Path(args.setup_state_dir),
        proxy_cgroup=args.proxy_cgroup,
        zygote=start_zygote() if args.fork_proxies else None,
    )
    resolver = Resolver(args.sandbox, crictl=args.crictl, endpoint=args.cri_endpoint)
    policy = Policy(
        ready_timeout=args.ready_timeout,
        backoff=args.restart_backoff,
        backoff_max=args.restart_backoff_max,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    api = new_api_client(args.kubeconfig)  # UsageError when no configuration is usable
    reporter = None
    if args.key_report:
        from kubernetes import client

        from tencrypt.agent.report import KeyReporter

        reporter = KeyReporter(
            client.CoreV1Api(api), args.report_namespace, args.node, Path(args.setup_state_dir)
        )
    from kubernetes import client as kube

    from tencrypt.agent.events import PodEvents

    events = PodEvents(kube.CoreV1Api(api), args.node)
    agent = Agent(args.node, supervisor, resolver, policy, reporter=reporter, events=events)
    log.info(
        "node %s: watching %s; sandboxes by %s; state in %s",
        args.node,
        api.configuration.host,
        resolver.mode,
        args.state_dir,
    )
    if args.metrics:
        from tencrypt.linux import probes

        probes.serve(
            args.metrics,
            agent.render_metrics,
            stop,
            {"/healthz": agent.health.live, "/readyz": agent.ready},
        )
    start_reflectors(api, agent.queue, stop, WATCH_TIMEOUT)
    start_discovery(api, agent.queue, stop, args.node, flags)
    agent.run(stop, unpatch_on_exit=args.on_exit == "unpatch")
    return 0


def check_setup_args(text: str) -> None:
    """--setup-args parsed by `tencrypt setup`'s own parser now, at start: a typo (an unknown
    flag, a number out of range, a malformed address) stops the agent with one line here
    instead of failing the set-up of every enabled pod of the node."""
    from tencrypt.setupflags import add_arguments as setup_flags

    parser = argparse.ArgumentParser(prog="tencrypt setup (--setup-args)")
    setup_flags(parser)
    try:
        setup = parser.parse_args(shlex.split(text))
    except SystemExit as exc:  # argparse printed what it refused
        raise UsageError(f"--setup-args {text!r}: not flags of `tencrypt setup` (above)") from exc
    if setup.undo:
        raise UsageError("--setup-args: --undo is the agent's to give, when a pod goes")
    import ipaddress

    for cidr in [setup.service_cidr, *(setup.pod_cidr or [])]:
        if cidr is None:
            continue
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise UsageError(f"--setup-args: {exc}") from None


def run_args(args: argparse.Namespace) -> list[str]:
    out = [] if args.strict else ["--no-strict"]
    if args.proxy_metrics:
        out += ["--metrics", args.proxy_metrics]
    return out


def launcher(given: str | None) -> Path:
    source_tree = Path(__file__).resolve().parents[2] / "scripts" / "tencrypt-nsenter.sh"
    found = given or (
        str(source_tree) if source_tree.exists() else shutil.which("tencrypt-nsenter.sh")
    )
    if not found or not Path(found).is_file():
        raise UsageError(
            f"launcher {found or 'tencrypt-nsenter.sh'} not found: pass --launcher "
            "PATH (scripts/tencrypt-nsenter.sh)"
        )
    return Path(found)


def tencrypt_bin(given: str | None) -> Path:
    beside = Path(sys.executable).parent / "tencrypt"
    found = given or (str(beside) if beside.exists() else shutil.which("tencrypt"))
    if not found or not os.access(found, os.X_OK):
        raise UsageError(
            f"{found or 'tencrypt'} not found or not executable: pass --tencrypt-bin PATH"
        )
    return Path(found)
