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
    dst: str  # "a.b.c.d/len"
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


def ipv4_address(dev: str) -> tuple[str, int] | None:
    """The first IPv4 address of ``dev`` and its prefix length."""
    with _ipr(f"reading addresses of {dev}") as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET, index=_index(ipr, dev)):
            return str(msg.get_attr("IFA_ADDRESS")), int(msg["prefixlen"])
    return None


def ensure_tun(name: str, mtu: int) -> None:
    """A persistent TUN device (no packet-info header), up, with ``mtu``."""
    with _ipr(f"creating TUN {name}") as ipr:
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="tuntap", mode="tun", ifr={"no_pi": True})
        ipr.link("set", index=_index(ipr, name), mtu=mtu, state="up")


def remove_link(name: str) -> None:
    with _ipr(f"removing link {name}") as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def routes(table: int | None = RT_TABLE_MAIN, proto: int | None = None) -> list[Route]:
    """IPv4 routes of ``table`` (None: every table), optionally only those of ``proto``."""
    with _ipr("listing routes") as ipr:
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
        out = []
        for msg in ipr.get_routes(family=socket.AF_INET):
            tab = int(msg.get_attr("RTA_TABLE") or msg["table"])
            if (table is not None and tab != table) or (
                proto is not None and msg["proto"] != proto
            ):
                continue
            dst = f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}"
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
    if "/" not in dst:
        dst += "/32"
    return next((r for r in routes(table) if r.dst == dst and r.metric == 0), None)


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


def default_gateway(dev: str | None = None) -> str | None:
    for r in routes():
        if r.dst == "0.0.0.0/0" and r.gateway and (dev is None or r.dev == dev):
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
    """Create or replace the route to ``dst`` ("a.b.c.d" or CIDR) in ``table`` (default main)."""
    if "/" not in dst:
        dst += "/32"
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
    if "/" not in dst:
        dst += "/32"
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
    """Remove every IPv4 route (any table) of ``proto``; returns how many."""
    gone = 0
    for r in routes(table=None, proto=proto):
        remove_route(r.dst, table=r.table, scope=r.scope, proto=proto)
        gone += 1
    return gone


def has_rule(*, fwmark: int, table: int, priority: int) -> bool:
    with _ipr(f"reading rule fwmark {fwmark:#x}") as ipr:
        return any(
            msg.get_attr("FRA_FWMARK") == fwmark
            and msg.get_attr("FRA_TABLE") == table
            and msg.get_attr("FRA_PRIORITY") == priority
            for msg in ipr.get_rules(family=socket.AF_INET)
        )


def ensure_rule(*, fwmark: int, table: int, priority: int) -> None:
    if has_rule(fwmark=fwmark, table=table, priority=priority):
        return
    with _ipr(f"rule fwmark {fwmark:#x} lookup {table}") as ipr:
        ipr.rule("add", fwmark=fwmark, table=table, priority=priority, family=socket.AF_INET)


def remove_rule(*, fwmark: int, table: int, priority: int) -> None:
    with _ipr(f"removing rule fwmark {fwmark:#x}") as ipr:
        for msg in ipr.get_rules(family=socket.AF_INET):
            if (
                msg.get_attr("FRA_FWMARK") == fwmark
                and msg.get_attr("FRA_TABLE") == table
                and msg.get_attr("FRA_PRIORITY") == priority
            ):
                ipr.rule(
                    "del", fwmark=fwmark, table=table, priority=priority, family=socket.AF_INET
                )
