"""`tencrypt setup`: prepare the pod network namespace this process runs in, and undo it.

Stages of setup (each idempotent; setup applies all of them or none):
 1. discover: the uplink's address and MTU, the default gateway, the cluster DNS server and the
    project domain (resolv.conf's first nameserver and first `search` entry); flags override;
    every input is validated (core/podconfig.py ``validated``) before anything is touched.
    The primary family is IPv4 when the uplink has an IPv4 address; a pod with only a global
    IPv6 one (an IPv6-only cluster) is set up in IPv6: its IPv6 address, the IPv6 default
    route's next hop (often link-local), resolv.conf's first IPv6 nameserver and the IPv6
    Service CIDR (flags or membership file; never a default: refused when none is known);
 2. record the PodConfig, the original resolv.conf and what stages 3-6 will replace (routes
    that are not Tencrypt's to the same destinations; rules of its marks already there) in
    the namespace's state directory, before anything changes, so that `--undo` also cleans up
    after a setup killed half-way;
 3. create the persistent TUN `tenc0` with MTU = uplink MTU - 60 (- 80 over outer IPv6);
 4. route the Service CIDR `dev tenc0 src <pod IP>`, and the DNS server /32 (/128) via the
    uplink; on a dual-stack pod (a global IPv6 address on the uplink) the IPv6 Service CIDR
    too, `dev tenc0 src <pod IPv6>`, when the flags or the membership file name one;
 5. table <fwmark table>: the uplink's subnet and a default route via the gateway (both
    families on a dual-stack pod, IPv6 alone on an IPv6-only one), and `ip [-6] rule fwmark
    <mark> lookup <table>`, so the proxy's own marked socket leaves by the uplink even to
    addresses that tenc0 routes; then the firewall table (strict mode's boundary);
 6. rewrite resolv.conf in place (it is usually a bind mount: never replace it by rename) to
    ask the embedded DNS proxy at 127.0.0.1, keeping the search list and options.
Stages 3-6 are linux/journal.py's: if one fails, the others are undone in reverse, the state
goes back to what it was (none, or the earlier setup's), and one line says what failed.

`--undo` restores resolv.conf, removes the rules (not one that was there before setup), every
route of protocol RTPROT_TENCRYPT (also those the proxy added at run time) and tenc0, puts
back the routes setup replaced, then removes the state.

State lives in ``<state-dir>/netns-<inode of /proc/self/ns/net>/`` (setup.json, and what the
proxy adds at run time: run.pid, keys-loaded.json): /run is shared between network
namespaces, the namespace's inode number is not. The kernel hands a dead namespace's inode
number to a new one, so setup.json also records the namespace's identity (its netns cookie
and the boot: core/netnsid.py), and a directory whose identity is not this namespace's is a
dead namespace's, *stale*: setup removes it before stage 2 (its resolv.conf original is not
this pod's), `run` refuses it (``load_state``), `--undo` removes it and touches nothing else.

The membership file is not part of this state: its writer (the node agent, the lab) keeps it
where its own name for the pod does not repeat (the agent's per-pod-UID directory) and hands
its path to setup (``--members-file``, for the cluster's ranges); setup records the path and
`run` reads that file by default. A writer outside the namespace cannot know its identity,
so a file it left in this directory could not be told from a dead pod's: nothing is read
from here.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from tencrypt.core.membership import Members, MembershipError, parse_members
from tencrypt.core.mountinfo import mount_of, node_path, parse_mountinfo
from tencrypt.core.netnsid import NetnsId, belongs
from tencrypt.core.podconfig import (
    OVERHEAD,
    OVERHEAD6,
    PodConfig,
    cluster_domain_of,
    is_rewritten,
    parse_resolv_conf,
    recover_resolv_conf,
    render_resolv_conf,
    validated,
)
from tencrypt.errors import SetupError, UsageError
from tencrypt.linux import firewall, netnsid, procs

log = logging.getLogger("tencrypt.setup")
DEFAULT_SERVICE_CIDR = "172.30.0.0/16"  # OpenShift's default serviceNetwork
STATE_FILE = "setup.json"
PID_FILE = "run.pid"


def namespace_state_dir(state_dir: str | Path, netns: str | Path = "/proc/self/ns/net") -> Path:
    """Setup's directory for one network namespace: ``netns-<inode>`` under ``state_dir``.
    ``netns`` names the namespace from outside (``/proc/PID/ns/net``, ``/run/netns/NAME``);
    the default is the caller's own."""
    return Path(state_dir) / f"netns-{os.stat(netns).st_ino}"


@dataclass(slots=True)
class SetupState:
    config: PodConfig
    resolv_conf: str  # path
    resolv_original: str  # text
    netns: NetnsId | None = None  # the namespace it was recorded in (None: unknown, or older)
    members_file: str | None = None  # the membership file setup was given: `run`'s default
    # what setup replaced, for `--undo` to put back (linux/journal.py; absent in older states):
    replaced_routes: list[dict[str, Any]] = field(default_factory=list)  # netlink.Route fields
    kept_rules: list[int] = field(default_factory=list)  # marks whose rule was there before

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "config": self.config.to_dict(),
                    "resolv_conf": self.resolv_conf,
                    "resolv_original": self.resolv_original,
                    "netns": self.netns.to_dict() if self.netns else None,
                    "members_file": self.members_file,
                    "replaced_routes": self.replaced_routes,
                    "kept_rules": self.kept_rules,
                },
                indent=2,
            )
        )
        tmp.replace(directory / STATE_FILE)

    @classmethod
    def load(cls, directory: Path) -> SetupState | None:
        path = directory / STATE_FILE
        try:
            d = json.loads(path.read_text())
            members_file = d.get("members_file")
            if members_file is not None and not isinstance(members_file, str):
                raise ValueError(f"members_file is not a path: {members_file!r}")
            replaced = d.get("replaced_routes", [])
            kept = d.get("kept_rules", [])
            if not all(isinstance(r, dict) for r in replaced):
                raise ValueError(f"replaced_routes is not a list of routes: {replaced!r}")
            if not all(isinstance(m, int) for m in kept):
                raise ValueError(f"kept_rules is not a list of marks: {kept!r}")
            return cls(
                PodConfig.from_dict(d["config"]),
                d["resolv_conf"],
                d["resolv_original"],
                NetnsId.from_dict(d.get("netns")),
                members_file,
                list(replaced),
                list(kept),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SetupError(
                f"unreadable setup state {path}: {exc}; if no proxy runs in this namespace, "
                f"remove {directory} and run `tencrypt setup` again"
            ) from exc

    def belongs_to(self, here: NetnsId | None) -> bool:
        """True if this state is the namespace's whose identity is ``here`` (core/netnsid.py
        rules 2 and 3)."""
        return belongs(self.netns, here, lambda: _read_text(self.resolv_conf))


class Undone(Enum):
    RESTORED = "namespace restored"
    NOTHING = "nothing to undo (not set up)"
    STALE = "stale state of a dead namespace removed"


def stale_message(directory: Path) -> str:
    return (
        f"{directory} holds the state of a network namespace that no longer exists "
        "(this one was given its inode number)"
    )


def load_state(state_dir: str | Path) -> SetupState:
    """The state `tencrypt setup` recorded for this namespace; UsageError if there is none,
    or if it is a dead namespace's (core/netnsid.py rule 4)."""
    directory = namespace_state_dir(state_dir)
    state = SetupState.load(directory)
    if state is None:
        raise UsageError("this network namespace is not set up: run `tencrypt setup` first")
    if not state.belongs_to(netnsid.current()):
        raise UsageError(f"{stale_message(directory)}: run `tencrypt setup` first")
    return state


def load_config(state_dir: str | Path) -> PodConfig:
    """The PodConfig `tencrypt setup` recorded for this namespace (``load_state``)."""
    return load_state(state_dir).config


def discover(args: argparse.Namespace, previous: SetupState | None) -> SetupState:
    from tencrypt.linux import netlink  # pyroute2: loaded by setup, not by `run`

    dev = args.dev
    uplink = netlink.link(dev)
    if uplink is None:
        raise UsageError(f"no interface {dev!r} in this network namespace (use --dev)")
    addr, addr6 = netlink.ipv4_address(dev), netlink.ipv6_address(dev)
    # the primary family: IPv4 when eth0 has it, else IPv6 (an IPv6-only pod)
    pod_ip = args.pod_ip or (addr or addr6 or ("",))[0]
    if not pod_ip:
        raise UsageError(f"{dev} has neither an IPv4 nor a global IPv6 address; pass --pod-ip")
    version = 6 if ":" in pod_ip else 4
    gateway = args.gateway or netlink.default_gateway(dev, version=version)
    if not gateway:
        raise UsageError(f"no IPv{version} default route via {dev}; pass --gateway")
    resolv_path = args.resolv_conf or (
        resolv_conf_of(args.resolv_conf_of) if args.resolv_conf_of else "/etc/resolv.conf"
    )
    try:
        current = Path(resolv_path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {resolv_path}: {exc.strerror}") from exc
    if not os.access(resolv_path, os.W_OK):
        raise UsageError(
            f"{resolv_path} is read-only here (containerd and CRI-O mount it so into "
            "the pod's infrastructure container): run setup from the node with "
            "--resolv-conf-of PID (tencrypt-nsenter.sh does), or pass --resolv-conf FILE"
        )
    original = current
    if is_rewritten(current) and previous is not None:
        original = previous.resolv_original
    elif is_rewritten(current):  # no state of this namespace names the original: its marker
        original = recover_resolv_conf(current)
        log.warning(
            "%s is rewritten already and no setup state of this namespace holds its "
            "original: recovered from the file (nameservers %s)",
            resolv_path,
            ", ".join(parse_resolv_conf(original).nameservers) or "none",
        )
    resolv = parse_resolv_conf(original)
    usable = [ns for ns in resolv.nameservers if not ns.startswith("127.") and ns != "::1"]
    # the first of the pod's family (an IPv6-only pod reaches no IPv4 server), else the first
    dns = args.dns or next((ns for ns in usable if (":" in ns) == (version == 6)), None)
    dns = dns or (usable[0] if usable else None)
    if not dns:
        raise UsageError(f"{resolv_path} names no usable nameserver; pass --dns")
    domain = args.domain or (resolv.search[0] if resolv.search else None)
    if not domain:
        raise UsageError(
            f"{resolv_path} has no `search` line to tell the project domain; pass --domain"
        )
    service_cidr, service_cidr6, pod_cidrs = _cluster_ranges(args, version)
    pod_ip6 = addr6[0] if addr6 and version == 4 else ""  # a dual-stack pod's second family
    on_link, on_link6 = _on_link_subnets(dev, version, bool(pod_ip6))
    overhead = OVERHEAD6 if version == 6 else OVERHEAD  # the tunnel's outer family's
    config = validated(
        PodConfig(
            pod_ip=pod_ip,
            dev=dev,
            gateway=gateway,
            dns=dns,
            domain=domain.rstrip("."),
            search=resolv.search,
            cluster_domain=cluster_domain_of(domain),
            service_cidr=service_cidr,
            mtu=args.mtu if args.mtu is not None else uplink.mtu - overhead,
            pod_cidrs=pod_cidrs,
            uplink_cidrs=tuple(c for c in (on_link, on_link6) if c),
            pod_ip6=pod_ip6,
            gateway6=(netlink.default_gateway(dev, version=6) or "") if pod_ip6 else "",
            service_cidr6=service_cidr6 if pod_ip6 else "",
        ),
        uplink.mtu,
        mtu_given=args.mtu is not None,
    )
    if service_cidr6 and not pod_ip6 and version == 4:
        log.warning(
            "%s has no global IPv6 address: the IPv6 Service CIDR %s is not routed into %s "
            "(IPv6 to the project stays refused by the firewall, never sent in the clear)",
            dev,
            service_cidr6,
            config.tun,
        )
    tun = netlink.link(config.tun)
    if tun is not None and tun.kind != "tun":
        raise UsageError(
            f"a link named {config.tun} exists and is not a TUN device (kind {tun.kind}): "
            "setup would take it over and --undo delete it"
        )
    return SetupState(config, resolv_path, original)


def _cluster_ranges(args: argparse.Namespace, version: int = 4) -> tuple[str, str, tuple[str, ...]]:
    """The Service CIDRs to route into tenc0 (IPv4, and IPv6 or "") and the pod network: the
    flags (``--service-cidr V4[,V6]``, as kube-apiserver's --service-cluster-ip-range), else
    what the agent discovered (the membership file it writes before the launcher runs setup,
    given as ``--members-file``), else OpenShift's default Service CIDR, no IPv6 one and an
    unknown pod network (never eth0's subnet: core/clustershape.py rule 1).
    An IPv6-only pod (``version`` 6) routes the IPv6 one alone, as its primary (IPv6, "",
    pods); none known is a ``UsageError``: no default is assumed for IPv6."""
    members: Members | None = None
    path = getattr(args, "members_file", None)
    if path:
        try:
            members = parse_members(Path(path).read_bytes())
        except FileNotFoundError:
            log.warning("membership file %s not found (yet): its ranges are not used", path)
        except (OSError, MembershipError) as exc:
            log.warning("membership file %s unreadable (%s): its ranges are not used", path, exc)
    given = [c.strip() for c in (args.service_cidr or "").split(",") if c.strip()]
    known = given or list(members.service_cidrs if members else ())
    service = next((c for c in known if ":" not in c), None)
    service6 = next((c for c in known if ":" in c), "")
    if len(given) > 2 or (given and len([c for c in given if ":" in c]) > 1):
        raise UsageError(
            f"--service-cidr {args.service_cidr}: at most one range per family (V4[,V6])"
        )
    pods = tuple(getattr(args, "pod_cidr", None) or (members.pod_cidrs if members else ()))
    if version == 6:
        if not service6:
            raise UsageError(
                "no IPv6 Service CIDR known for this IPv6-only pod (no IPv6 range in "
                f"--service-cidr {args.service_cidr or '-'}, none in the membership file "
                f"{path or '-'}): pass --service-cidr with the cluster's IPv6 Service CIDR "
                "(kube-apiserver's --service-cluster-ip-range)"
            )
        if service is not None:
            log.warning(
                "IPv6-only pod: the IPv4 Service CIDR %s is not routed (the pod has no IPv4)",
                service,
            )
        return service6, "", pods
    if service is None:
        service = DEFAULT_SERVICE_CIDR
        log.warning(
            "no --service-cidr and no Service CIDR from the agent: assuming %s (OpenShift's "
            "default); pass --service-cidr where the cluster uses another",
            service,
        )
    return service, service6, pods


def resolv_conf_of(pid: int) -> str:
    """The file to rewrite for the resolv.conf that process ``pid`` sees: /proc/PID/root/etc/
    resolv.conf, unless that is a read-only bind mount (containerd's and CRI-O's pause
    container): then the node's file behind it. The node is PID 1's mount namespace (an agent
    in a hostPID container reaches it through /proc/1/root), else this process's own; a
    candidate counts only if it is the very file the pod sees (device and inode)."""
    seen = f"/proc/{pid}/root/etc/resolv.conf"
    try:
        pod_mounts = parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
        seen_id = _file_id(seen)
    except OSError as exc:
        raise UsageError(f"cannot read the resolv.conf of pid {pid}: {exc}") from exc
    mount = mount_of(pod_mounts, "/etc/resolv.conf")
    if mount is None or not mount.read_only:
        return seen
    for node_mountinfo, node_root in (
        ("/proc/1/mountinfo", "/proc/1/root"),
        ("/proc/self/mountinfo", ""),
    ):
        try:
            on_node = node_path(
                pod_mounts, "/etc/resolv.conf", parse_mountinfo(Path(node_mountinfo).read_text())
            )
            if on_node and _file_id(node_root + on_node) == seen_id:
                log.info(
                    "resolv.conf of pid %d is a read-only bind mount: rewriting its source "
                    "%s on the node",
                    pid,
                    on_node,
                )
                return node_root + on_node
        except OSError:
            continue
    raise UsageError(
        f"/etc/resolv.conf of pid {pid} is a read-only mount of {mount.root} "
        f"(device {mount.dev}) that this node's mounts do not show; pass "
        "--resolv-conf FILE"
    )


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def setup(args: argparse.Namespace) -> PodConfig:
    from tencrypt.linux import journal  # pyroute2: loaded by setup, not by `run`

    here = netnsid.current()
    if here is None:
        log.warning("%s", netnsid.UNKNOWN_HINT)
    directory = namespace_state_dir(args.state_dir)
    existed = directory.exists()
    previous = SetupState.load(directory)
    if previous is not None and not previous.belongs_to(here):
        # a dead namespace's: nothing of it is this pod's, least of all its resolv.conf
        log.warning("%s: removed", stale_message(directory))
        remove_state(directory)
        previous, existed = None, False
    state = discover(args, previous)  # every input validated: nothing is touched before
    state.netns = here
    members_file = getattr(args, "members_file", None)
    state.members_file = os.path.abspath(members_file) if members_file else None
    c = state.config
    plan = journal.planned_routes(c, *_on_link_subnets(c.dev, c.version, bool(c.pod_ip6)))
    state.replaced_routes = _merged(
        previous.replaced_routes if previous else [],
        [asdict(r) for r in journal.replaced_routes(plan)],
    )
    # a rule there before a first setup is someone else's; after one, it is ours
    state.kept_rules = previous.kept_rules if previous else journal.present_rules(c)
    state.save(directory)  # first: `--undo` also cleans up after a setup killed half-way
    try:
        journal.apply(c, plan, state.resolv_conf, render_resolv_conf(state.resolv_original))
    except journal.Failed as failed:
        if failed.complete:  # the namespace is as it was: so is its state
            if previous is not None:
                previous.save(directory)
            elif existed:
                (directory / STATE_FILE).unlink(missing_ok=True)
            else:
                remove_state(directory)
        raise SetupError(str(failed)) from None
    return c


def _merged(kept: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The replaced routes of an earlier setup of this namespace and those found now (a
    changed --service-cidr replaces another route); one per table and destination."""
    places = {(r.get("table"), r.get("dst")) for r in kept}
    return kept + [r for r in found if (r["table"], r["dst"]) not in places]


def undo(state_dir: str) -> Undone:
    from tencrypt.linux import (
        journal,
        netlink,  # pyroute2: loaded by setup, not by `run`
        nfqueue,  # `run` loads it in standalone strict mode only
    )

    directory = namespace_state_dir(state_dir)
    state = SetupState.load(directory)
    if state is None:
        return Undone.NOTHING
    if not state.belongs_to(netnsid.current()):
        # a dead namespace's: what it names (routes, resolv.conf, tenc0) is not this one's
        remove_state(directory)
        return Undone.STALE
    pid = _live_pid(directory / PID_FILE)
    if pid:
        raise UsageError(
            f"a tencrypt proxy (pid {pid}) still runs in this namespace: stop it first"
        )
    c = state.config
    try:
        replaced = [netlink.Route(**r) for r in state.replaced_routes]
    except TypeError as exc:
        raise SetupError(f"unreadable replaced_routes in {directory / STATE_FILE}: {exc}") from exc
    try:
        if is_rewritten(Path(state.resolv_conf).read_text()):
            journal.write_in_place(state.resolv_conf, state.resolv_original)
    except FileNotFoundError:
        log.warning("%s is gone; not restored", state.resolv_conf)
    firewall.remove_table()  # strict mode's rules stay after the proxy stops, until here
    nfqueue.remove_rules(c.dev)  # and standalone mode's queue rules
    for mark, version in journal.removed_rules(c, state.kept_rules):
        netlink.remove_rule(
            fwmark=mark, table=c.table, priority=journal.RULE_PRIORITY, version=version
        )
    netlink.remove_routes_by_proto()
    netlink.remove_link(c.tun)
    for lost in journal.restore(replaced):
        log.warning("a route setup replaced could not be put back: %s", lost)
    # setup.json, and what a (killed) proxy left: its pid file, the ring it recorded; also a
    # members.json an agent before core/netnsid.py wrote here. The membership file setup was
    # given is its writer's, who removes it.
    remove_state(directory)
    return Undone.RESTORED


def remove_state(directory: Path) -> None:
    """Remove a namespace's state directory and everything in it."""
    import shutil  # here: shutil (and bz2, lzma) would stay in every proxy's memory

    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SetupError(f"cannot remove the setup state {directory}: {exc}") from exc


def _on_link_subnets(dev: str, version: int, dual: bool) -> tuple[str | None, str | None]:
    """The uplink's on-link subnet of the pod's primary family (IPv6 on an IPv6-only pod),
    and its IPv6 subnet on a dual-stack pod (else None)."""
    if version == 6:
        return _on_link_subnet6(dev), None
    return _on_link_subnet(dev), _on_link_subnet6(dev) if dual else None


def _on_link_subnet(dev: str) -> str | None:
    from tencrypt.linux import netlink  # pyroute2: loaded by setup, not by `run`

    addr = netlink.ipv4_address(dev)
    if not addr:
        return None
    return str(ipaddress.IPv4Interface(f"{addr[0]}/{addr[1]}").network)


def _on_link_subnet6(dev: str) -> str | None:
    from tencrypt.linux import netlink  # pyroute2: loaded by setup, not by `run`

    addr = netlink.ipv6_address(dev)
    if not addr:
        return None
    return str(ipaddress.IPv6Interface(f"{addr[0]}/{addr[1]}").network)


def _live_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process still runs tencrypt in this namespace (not a
    zombie, not a reused pid: not another pod's proxy either)."""
    pid = procs.read_pid(pid_file)
    if not (pid and procs.alive(pid) and "tencrypt" in procs.cmdline(pid)):
        return None
    try:
        same = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return pid if same else None


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UsageError("needs root (CAP_NET_ADMIN) in the pod's network namespace")
    if args.undo:
        done = undo(args.state_dir)
        if done is Undone.STALE:
            print(
                f"tencrypt setup --undo: {stale_message(namespace_state_dir(args.state_dir))}: "
                "removed it; nothing in this namespace was changed"
            )
        else:
            print(f"tencrypt setup --undo: {done.value}")
        return 0
    c = setup(args)
    print(
        f"tencrypt setup: pod {' '.join(c.pod_ips)} on {c.dev} via {c.gateway}; "
        f"{c.tun} mtu {c.mtu}; {', '.join(c.service_cidrs)} -> {c.tun}; DNS {c.dns} -> {c.dev}; project domain {c.domain}; "
        f"pod network {', '.join(c.pod_cidrs) or '-'}; fwmark {c.fwmark:#x} -> table {c.table}; "
        f"firewall inet tencrypt; resolv.conf -> 127.0.0.1"
    )
    return 0
