"""Netlink, behind small typed idempotent functions: the only module that imports pyroute2.

Rules:
- Every function acts on the network namespace the process is in, opens its own short-lived
  netlink socket (about 1 ms) and leaves nothing open: callers need no handle.
- ``ensure_*`` replace or create and never fail because the object already exists;
  ``remove_*`` never fail because it is already gone.
- Routes Tencrypt adds carry protocol ``RTPROT_TENCRYPT``, so that `setup --undo` can sweep
  every one of them (also those the proxy added for peers and bypasses) and nothing else.
- Kernel refusals become ``SetupError`` naming the object and the kernel's reason.

pyroute2 is pinned below 0.8: from 0.8 on its synchronous API drives an asyncio loop of its own,
which fails inside a running event loop (the agent's, the proxy's).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tencrypt.errors import SetupError
from tencrypt.linux.kernel import RT_TABLE_MAIN
from tencrypt.linux.rtnl import host_prefix

RTPROT_TENCRYPT = 137  # ours: unassigned in linux/rtnetlink.h and iproute2's rt_protos
RTN_UNICAST = 1  # linux/rtnetlink.h
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253  # linux/rtnetlink.h
RTNH_F_ONLINK = 4  # linux/rtnetlink.h: the gateway is on-link whatever the routes say


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    mtu: int
    up: bool
    kind: str | None


@dataclass(frozen=True, slots=True)
class Route:
    dst: str  # "a.b.c.d/len" or "v6::/len"
    table: int
    dev: str | None
    gateway: str | None
    src: str | None
    proto: int
    scope: int
    metric: int = 0
    type: int = RTN_UNICAST
    onlink: bool = False


@contextmanager
def _ipr(what: str) -> Iterator[IPRoute]:
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise SetupError(f"netlink refused {what}: {exc.args[-1] if exc.args else exc}") from exc


def _index(ipr: IPRoute, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise SetupError(f"no network interface {dev!r} in this namespace")
    return int(found[0])


def link(dev: str) -> Link | None:
    with _ipr(f"reading link {dev}") as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return None
        msg = ipr.get_links(found[0])[0]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        return Link(found[0], dev, int(msg.get_attr("IFLA_MTU")), bool(msg["flags"] & 1), kind)


IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x08, 0x20, 0x40  # linux/if_addr.h
DEFAULT_METRIC = {4: 0, 6: 1024}  # what the kernel gives a route added without a metric


def ipv6_address(dev: str) -> tuple[str, int] | None:
    """The first usable global IPv6 address of ``dev`` (not link-local, not tentative, not
    deprecated, not failed DAD) and its prefix length."""
    bad = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
    with _ipr(f"reading addresses of {dev}") as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET6, index=_index(ipr, dev)):
            flags = int(msg.get_attr("IFA_FLAGS") or msg["flags"])
            if msg["scope"] == RT_SCOPE_UNIVERSE and not flags & bad:
                return str(msg.get_attr("IFA_ADDRESS")), int(msg["prefixlen"])
    return None


def ipv4_address(dev: str) -> tuple[str, int] | None:
    """The first IPv4 address of ``dev`` and its prefix length."""
    with _ipr(f"reading addresses of {dev}") as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET, index=_index(ipr, dev)):
            return str(msg.get_attr("IFA_ADDRESS")), int(msg["prefixlen"])
    return None


def ensure_tun(name: str, mtu: int) -> None:
    """A persistent TUN device (no packet-info header), up, with ``mtu``. It sends no IPv6
    router solicitation: no router is behind it, and the kernel's default (solicit forever,
    with back-off) would wake an idle proxy for each one (issue 26, bench/results/idle.md)."""
    with _ipr(f"creating TUN {name}") as ipr:
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="tuntap", mode="tun", ifr={"no_pi": True})
        no_router_solicitations(name)
        ipr.link("set", index=_index(ipr, name), mtu=mtu, state="up")


def no_router_solicitations(name: str) -> None:
    """``net.ipv6.conf.<name>.router_solicitations = 0`` in this namespace; nothing where
    IPv6 is off (no such file)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/router_solicitations", "w") as f:
            f.write("0\n")
    except OSError:
        pass


def remove_link(name: str) -> None:
    with _ipr(f"removing link {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def routes(
    table: int | None = RT_TABLE_MAIN, proto: int | None = None, version: int | None = 4
) -> list[Route]:
    """Routes of ``table`` (None: every table) of IP ``version`` (4, 6; None: both),
    optionally only those of ``proto``. IPv6's local and multicast table entries the kernel
    makes for every interface are not listed unless asked for by ``proto``."""
    families = {4: (socket.AF_INET,), 6: (socket.AF_INET6,)}.get(
        version or 0, (socket.AF_INET, socket.AF_INET6)
    )
    with _ipr("listing routes") as ipr:
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
        out = []
        for family, msg in ((f, m) for f in families for m in ipr.get_routes(family=f)):
            tab = int(msg.get_attr("RTA_TABLE") or msg["table"])
            if (table is not None and tab != table) or (
                proto is not None and msg["proto"] != proto
            ):
                continue
            unspecified = "::" if family == socket.AF_INET6 else "0.0.0.0"
            dst = f"{msg.get_attr('RTA_DST') or unspecified}/{msg['dst_len']}"
            out.append(
                Route(
                    dst,
                    tab,
                    names.get(msg.get_attr("RTA_OIF")),
                    msg.get_attr("RTA_GATEWAY"),
                    msg.get_attr("RTA_PREFSRC"),
                    msg["proto"],
                    msg["scope"],
                    int(msg.get_attr("RTA_PRIORITY") or 0),
                    msg["type"],
                    bool(msg["flags"] & RTNH_F_ONLINK),
                )
            )
        return out


def route_at(dst: str, table: int = RT_TABLE_MAIN) -> Route | None:
    """The route that ``ensure_route(dst, table=table)`` would replace (the kernel replaces
    the route of the same destination, TOS 0 and metric 0), if there is one."""
    dst = host_prefix(dst)
    version = 6 if ":" in dst else 4
    metric = DEFAULT_METRIC[version]
    return next(
        (r for r in routes(table, version=version) if r.dst == dst and r.metric == metric), None
    )


def restore_route(route: Route) -> None:
    """Put ``route`` (as ``routes`` read it) back, replacing whatever holds its place."""
    kwargs: dict[str, object] = {
        "dst": route.dst,
        "table": route.table,
        "proto": route.proto,
        "scope": route.scope,
        "type": route.type,
    }
    for key, value in (
        ("gateway", route.gateway),
        ("prefsrc", route.src),
        ("priority", route.metric),
        ("flags", RTNH_F_ONLINK if route.onlink else 0),
    ):
        if value:
            kwargs[key] = value
    with _ipr(f"restoring route {route.dst} table {route.table}") as ipr:
        if route.dev is not None:
            kwargs["oif"] = _index(ipr, route.dev)
        ipr.route("replace", **kwargs)


def default_gateway(dev: str | None = None, version: int = 4) -> str | None:
    """The next hop of the main table's default route of IP ``version`` (via ``dev``)."""
    default = "::/0" if version == 6 else "0.0.0.0/0"
    for r in routes(version=version):
        if r.dst == default and r.gateway and (dev is None or r.dev == dev):
            return r.gateway
    return None


def ensure_route(
    dst: str,
    *,
    dev: str,
    gateway: str | None = None,
    src: str | None = None,
    table: int | None = None,
    scope_link: bool = False,
) -> None:
    """Create or replace the route to ``dst`` (an address or a CIDR, either family) in ``table``
    (default main)."""
    dst = host_prefix(dst)
    kwargs: dict[str, object] = {"dst": dst, "proto": RTPROT_TENCRYPT}
    if gateway:
        kwargs["gateway"] = gateway
    if src:
        kwargs["prefsrc"] = src
    if table is not None:
        kwargs["table"] = table
    if scope_link:
        kwargs["scope"] = RT_SCOPE_LINK
    with _ipr(f"route {dst} dev {dev}") as ipr:
        ipr.route("replace", oif=_index(ipr, dev), **kwargs)


def remove_route(
    dst: str, *, table: int | None = None, scope: int | None = None, proto: int | None = None
) -> None:
    """Remove the route to ``dst``; with ``proto``, only a route of that protocol (the kernel
    matches it on delete: a route of another owner to the same destination stays)."""
    dst = host_prefix(dst)
    kwargs: dict[str, object] = {"dst": dst}
    if table is not None:
        kwargs["table"] = table
    if scope is not None:
        kwargs["scope"] = scope  # the kernel matches a route's scope on delete
    if proto is not None:
        kwargs["proto"] = proto
    try:
        with IPRoute() as ipr:
            ipr.route("del", **kwargs)
    except NetlinkError as exc:
        if exc.code not in (errno.ESRCH, errno.ENOENT):
            raise SetupError(f"netlink refused removing route {dst}: {exc}") from exc


def remove_routes_by_proto(proto: int = RTPROT_TENCRYPT) -> int:
    """Remove every route (any table, both families) of ``proto``; returns how many."""
    gone = 0
    for r in routes(table=None, proto=proto, version=None):
        remove_route(r.dst, table=r.table, scope=r.scope, proto=proto)
        gone += 1
    return gone


def _rule_family(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def has_rule(*, fwmark: int, table: int, priority: int, version: int = 4) -> bool:
    with _ipr(f"reading rule fwmark {fwmark:#x}") as ipr:
        return any(
            msg.get_attr("FRA_FWMARK") == fwmark
            and msg.get_attr("FRA_TABLE") == table
            and msg.get_attr("FRA_PRIORITY") == priority
            for msg in ipr.get_rules(family=_rule_family(version))
        )


def ensure_rule(*, fwmark: int, table: int, priority: int, version: int = 4) -> None:
    """``ip [-6] rule add fwmark <fwmark> lookup <table> priority <priority>``, once."""
    if has_rule(fwmark=fwmark, table=table, priority=priority, version=version):
        return
    family = _rule_family(version)
    with _ipr(f"rule fwmark {fwmark:#x} lookup {table} (IPv{version})") as ipr:
        ipr.rule("add", fwmark=fwmark, table=table, priority=priority, family=family)


def remove_rule(*, fwmark: int, table: int, priority: int, version: int = 4) -> None:
    family = _rule_family(version)
    with _ipr(f"removing rule fwmark {fwmark:#x} (IPv{version})") as ipr:
        for msg in ipr.get_rules(family=family):
            if (
                msg.get_attr("FRA_FWMARK") == fwmark
                and msg.get_attr("FRA_TABLE") == table
                and msg.get_attr("FRA_PRIORITY") == priority
            ):
                ipr.rule("del", fwmark=fwmark, table=table, priority=priority, family=family)
