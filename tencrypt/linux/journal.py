"""Setup's changes to a pod's namespace: applied in order, undone in reverse if one fails.

Stages (``apply``; podnet.py's module docstring says why each is there):
 1. the TUN ``tenc0``, up, with the config's MTU;
 2. the routes of ``planned_routes``: the Service CIDR into tenc0 and the DNS server's /32
    (/128) by the uplink (main table); the uplink's subnet and a default route (the fwmark
    table), in the pod's primary family (IPv6 on an IPv6-only pod) and IPv6 on a dual one;
 3. the rules ``ip [-6] rule fwmark <mark> lookup <table>`` (the proxy's and the DNS
    upstream's marks), of each family ``rule_versions`` names;
 4. the firewall table ``inet tencrypt``;
 5. resolv.conf rewritten in place.

Rules:
- Before a step changes an object it reads what is there (the link, the route its replace
  would replace, the rule, the table, the file's text) and registers how to put exactly that
  back, *then* applies: a step that fails half-way (a write cut short) is reverted too, and a
  revert where nothing changed is harmless.
- If a step raises (netlink, nft, the file system), every registered revert runs, last first;
  ``Failed`` then says which step failed and why, and whether the namespace is as it was.
- The routes a setup replaces that are not Tencrypt's (a CNI's Service route, a /32 to the
  DNS server) are read before anything changes (``replaced_routes``) and kept in setup.json,
  so that `--undo` puts them back after sweeping Tencrypt's own (``restore``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tencrypt.core.podconfig import PodConfig, dns_address, in_cidr
from tencrypt.errors import TencryptError
from tencrypt.linux import firewall, netlink
from tencrypt.linux.kernel import RT_TABLE_MAIN

RULE_PRIORITY = 1000


@dataclass(frozen=True, slots=True)
class PlannedRoute:
    dst: str  # "a.b.c.d/len"
    dev: str
    gateway: str | None
    src: str
    table: int = RT_TABLE_MAIN
    scope_link: bool = False

    def apply(self) -> None:
        netlink.ensure_route(
            self.dst,
            dev=self.dev,
            gateway=self.gateway,
            src=self.src,
            table=self.table,
            scope_link=self.scope_link,
        )


class Failed(Exception):
    """A step failed; ``complete``: every step before it was reverted."""

    def __init__(self, message: str, complete: bool) -> None:
        super().__init__(message)
        self.complete = complete


def planned_routes(
    c: PodConfig, on_link: str | None, on_link6: str | None = None
) -> list[PlannedRoute]:
    """The routes of stage 2, in the pod's primary family (``c.version``; ``on_link`` is the
    uplink's subnet of that family); a dual-stack pod (``c.pod_ip6``) gets the IPv6 twins:
    its Service CIDR into tenc0 (when known) and the fwmark table's on-link subnet and
    default route, so that what the proxy sends marked (the clear, the DNS upstream) leaves
    by the uplink in both families. An IPv6-only pod's are all IPv6: the DNS server's /128,
    ``::/0``; IPv6 routes have no link scope (the kernel keeps every one universe)."""
    dns = dns_address(c.dns)
    dns_gateway = None if on_link and in_cidr(dns, on_link) else c.gateway
    v6 = c.version == 6
    plan = [
        PlannedRoute(c.service_cidr, c.tun, None, c.pod_ip),
        PlannedRoute(f"{dns}/128" if ":" in dns else f"{dns}/32", c.dev, dns_gateway, c.pod_ip),
    ]
    if on_link:
        plan.append(PlannedRoute(on_link, c.dev, None, c.pod_ip, c.table, scope_link=not v6))
    plan.append(PlannedRoute("::/0" if v6 else "0.0.0.0/0", c.dev, c.gateway, c.pod_ip, c.table))
    if c.pod_ip6:
        if c.service_cidr6:
            plan.append(PlannedRoute(c.service_cidr6, c.tun, None, c.pod_ip6))
        if on_link6:
            plan.append(PlannedRoute(on_link6, c.dev, None, c.pod_ip6, c.table))
        if c.gateway6:
            plan.append(PlannedRoute("::/0", c.dev, c.gateway6, c.pod_ip6, c.table))
    return plan


def replaced_routes(plan: list[PlannedRoute]) -> list[netlink.Route]:
    """The routes not Tencrypt's that applying ``plan`` would replace."""
    found = (netlink.route_at(r.dst, r.table) for r in plan)
    return [r for r in found if r is not None and r.proto != netlink.RTPROT_TENCRYPT]


def marks(c: PodConfig) -> tuple[int, int]:
    return c.fwmark, c.dns_mark


def rule_versions(c: PodConfig) -> tuple[int, ...]:
    """The IP versions whose fwmark rules setup adds: the primary family's (IPv4, IPv6 on an
    IPv6-only pod), and IPv6 beside IPv4 on a dual-stack pod. Rules of the primary family
    found before a first setup are someone else's (``present_rules``, kept by `--undo`);
    a dual-stack pod's IPv6 rules of these marks are always Tencrypt's."""
    return (4, 6) if c.pod_ip6 else (c.version,)


def present_rules(c: PodConfig) -> list[int]:
    """The marks of ``marks(c)`` whose rule (of the primary family) is there already, but none
    in a namespace that shows a setup whose state is lost (tenc0, a route of ours): those
    rules are Tencrypt's."""
    if netlink.link(c.tun) is not None or netlink.routes(
        None, netlink.RTPROT_TENCRYPT, version=None
    ):
        return []
    return [
        m
        for m in marks(c)
        if netlink.has_rule(fwmark=m, table=c.table, priority=RULE_PRIORITY, version=c.version)
    ]


def removed_rules(c: PodConfig, kept: list[int]) -> list[tuple[int, int]]:
    """The (mark, version) rules `--undo` removes: every one setup adds but those of the
    primary family that were there before it (``kept``)."""
    return [
        (mark, version)
        for version in rule_versions(c)
        for mark in marks(c)
        if not (version == c.version and mark in kept)
    ]


def apply(c: PodConfig, plan: list[PlannedRoute], resolv_conf: str, resolv_text: str) -> None:
    """Stages 1-5, or none of them: ``Failed`` after the rollback."""
    reverts: list[tuple[str, Callable[[], None]]] = []

    def step(what: str, do: Callable[[], None], undo: Callable[[], None]) -> None:
        reverts.append((what, undo))
        try:
            do()
        except (TencryptError, OSError) as exc:
            raise _StepFailed(what, exc) from exc

    try:
        tun = netlink.link(c.tun)
        step(
            f"creating {c.tun} (mtu {c.mtu})",
            partial(netlink.ensure_tun, c.tun, c.mtu),
            partial(netlink.remove_link, c.tun)
            if tun is None
            else partial(netlink.ensure_tun, c.tun, tun.mtu),
        )
        for r in plan:
            before = netlink.route_at(r.dst, r.table)
            step(
                f"routing {r.dst} dev {r.dev} (table {r.table})",
                r.apply,
                partial(_put_back, r, before),
            )
        for version in rule_versions(c):
            for mark in marks(c):
                rule = {
                    "fwmark": mark,
                    "table": c.table,
                    "priority": RULE_PRIORITY,
                    "version": version,
                }
                had = netlink.has_rule(**rule)
                step(
                    f"adding rule fwmark {mark:#x} lookup {c.table} (IPv{version})",
                    partial(netlink.ensure_rule, **rule),
                    _nothing if had else partial(netlink.remove_rule, **rule),
                )
        # strict mode's boundary is in place before any proxy reads a packet (DESIGN §1a); its
        # sets start empty and the proxy fills them; `run --no-strict` removes it
        table_there = firewall.exists()
        step(
            f"installing the firewall table {firewall.FAMILY} {firewall.TABLE}",
            partial(firewall.install, c.dev, c.port, c.fwmark),
            _nothing if table_there else firewall.remove_table,
        )
        current = Path(resolv_conf).read_text()
        step(
            f"rewriting {resolv_conf}",
            partial(write_in_place, resolv_conf, resolv_text),
            partial(write_in_place, resolv_conf, current),
        )
    except _StepFailed as failed:
        raise Failed(*_rollback(failed.what, failed.cause, reverts)) from failed.cause
    except (TencryptError, OSError) as exc:  # reading what a step would change
        raise Failed(*_rollback("reading the namespace", exc, reverts)) from exc


def _nothing() -> None:
    """The revert of a step that found its object there already: it stays."""


class _StepFailed(Exception):
    def __init__(self, what: str, cause: Exception) -> None:
        self.what, self.cause = what, cause


def _put_back(planned: PlannedRoute, before: netlink.Route | None) -> None:
    if before is None:
        netlink.remove_route(
            planned.dst,
            table=planned.table,
            scope=netlink.RT_SCOPE_LINK if planned.scope_link else netlink.RT_SCOPE_UNIVERSE,
            proto=netlink.RTPROT_TENCRYPT,
        )
    else:
        netlink.restore_route(before)


def _rollback(
    what: str, cause: Exception, reverts: list[tuple[str, Callable[[], None]]]
) -> tuple[str, bool]:
    left = []
    for step, revert in reversed(reverts):
        try:
            revert()
        except (TencryptError, OSError) as exc:
            left.append(f"{step}: {exc}")
    message = f"{what} failed: {_reason(cause)}; "
    if left:
        return message + "could not undo " + "; ".join(left), False
    return message + "every change undone, the namespace is as it was", True


def _reason(exc: Exception) -> str:
    """One line: nft's refusals go on with the script's lines it points at."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def restore(routes: list[netlink.Route]) -> list[str]:
    """Put back the routes a setup replaced (after `--undo` swept Tencrypt's); what could not
    be put back, and why."""
    failed = []
    for route in routes:
        try:
            netlink.restore_route(route)
        except TencryptError as exc:
            failed.append(f"{route.dst} (table {route.table}): {exc}")
    return failed


def write_in_place(path: str, text: str) -> None:
    """Overwrite the file's contents keeping its inode (bind mounts survive)."""
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()
