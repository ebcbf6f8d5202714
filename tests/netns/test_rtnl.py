"""linux.rtnl (the proxy's pyroute2-free route changes) leaves exactly the routes that
linux.netlink (pyroute2) leaves, in a scratch namespace:

    <tr><suffix>:  eth0 (a veth) 10.77.0.2/24,  tenc0 (a veth) up
      replace 10.77.5.5/32 dev tenc0 src 10.77.0.2               (a peer, VIA_TUN)
      replace 10.77.6.6/32 dev eth0 via 10.77.0.1 src 10.77.0.2  (a bypass, VIA_UPLINK)
      and their IPv6 twins (/128, src fd00:77::2, via a global or a link-local next hop)
      replace again (idempotent), delete, delete again (no error)
"""

from __future__ import annotations

import json
import sys

import pytest

from tencrypt.linux import netns

pytestmark = pytest.mark.netns

DRIVE = r"""
import importlib, json, sys
impl, op, dst = sys.argv[1], sys.argv[2], sys.argv[3]
mod = importlib.import_module("tencrypt.linux." + impl)  # rtnl must not bring pyroute2 in
gw = sys.argv[4] if len(sys.argv) > 4 else None
dev = "eth0" if gw else "tenc0"
try:
    if op == "replace":
        replace = mod.replace_route if impl == "rtnl" else mod.ensure_route
        replace(dst, dev=dev, gateway=gw, src="fd00:77::2" if ":" in dst else "10.77.0.2")
    else:
        (mod.delete_route if impl == "rtnl" else mod.remove_route)(dst)
    print(json.dumps({"ok": True, "pyroute2": "pyroute2" in sys.modules}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


@pytest.fixture
def scratch():
    name = f"tr{netns.unique_suffix()}"
    try:
        netns.create(name)
        for cmd in (
            ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
            ["ip", "addr", "add", "10.77.0.2/24", "dev", "eth0"],
            ["ip", "-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"],
            ["ip", "link", "add", "tenc0", "type", "veth", "peer", "name", "peer1"],
            *(["ip", "link", "set", dev, "up"] for dev in ("eth0", "peer0", "tenc0", "peer1")),
        ):
            netns.run(name, cmd)
        yield name
    finally:
        netns.delete(name)
    assert not netns.exists(name)


def drive(ns: str, impl: str, *args: str) -> dict:
    out = netns.run(ns, [sys.executable, "-c", DRIVE, impl, *args]).stdout
    return json.loads(out)


def routes(ns: str) -> str:
    return netns.run(ns, ["ip", "-d", "route", "show", "table", "all", "proto", "137"]).stdout


@pytest.mark.parametrize(
    "args",
    [
        ("10.77.5.5/32",),
        ("10.77.6.6/32", "10.77.0.1"),
        ("fd00:77:5::5/128",),  # a dual-stack pod's IPv6 peer
        ("fd00:77:6::6/128", "fd00:77::1"),
        ("fd00:77:7::7/128", "fe80::1"),  # IPv6's usual next hop: link-local
    ],
)
def test_rtnl_makes_the_routes_pyroute2_makes(scratch, args):
    assert drive(scratch, "netlink", "replace", *args)["ok"]
    by_pyroute2 = routes(scratch)
    assert args[0].split("/")[0] in by_pyroute2
    assert drive(scratch, "netlink", "delete", args[0])["ok"]
    assert routes(scratch) == ""
    done = drive(scratch, "rtnl", "replace", *args)
    assert done == {"ok": True, "pyroute2": False}
    assert routes(scratch) == by_pyroute2
    assert drive(scratch, "rtnl", "replace", *args)["ok"]  # replacing is idempotent
    assert routes(scratch) == by_pyroute2
    assert drive(scratch, "rtnl", "delete", args[0])["ok"]
    assert routes(scratch) == ""
    assert drive(scratch, "rtnl", "delete", args[0])["ok"]  # gone already: fine


def test_rtnl_refusals_are_setup_errors(scratch):
    out = drive(scratch, "rtnl", "replace", "10.77.7.7/32", "192.0.2.1")  # gateway off-link
    assert not out["ok"] and "netlink refused route 10.77.7.7/32 dev eth0" in out["error"]
