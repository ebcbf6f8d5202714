"""A setup state directory belongs to one network namespace's life (core/netnsid.py): the rule
and the kernel's identity of this namespace (linux/netnsid.py), without root."""

from __future__ import annotations

import errno
import json
import socket

import pytest

from tencrypt.core.netnsid import NetnsId, belongs
from tencrypt.core.podconfig import render_resolv_conf
from tencrypt.linux import netnsid

BOOT = "efb21c88-26c7-4f33-a0ab-808e676d5fc9"
HERE = NetnsId(BOOT, 4242)
RESOLV = "nameserver 172.30.0.2\nsearch shop.svc.cluster.local svc.cluster.local\n"


def never() -> str | None:
    raise AssertionError("the identities decide: resolv.conf is not read")


# -- the rule (pure) ------------------------------------------------------------------------


def test_the_same_identity_is_this_namespace_and_any_other_a_dead_ones():
    assert belongs(HERE, NetnsId(BOOT, 4242), never)
    assert not belongs(HERE, NetnsId(BOOT, 4243), never)  # the inode's previous holder
    # the cookie counter starts again at each boot: the same number after a reboot is not it
    assert not belongs(HERE, NetnsId("0f00ba11-0000-4000-8000-000000000000", 4242), never)


@pytest.mark.parametrize(
    "recorded, current",
    [(None, HERE), (HERE, None), (None, None)],
    ids=["older-setup-json", "kernel-without-cookie-now", "kernel-without-cookie"],
)
def test_without_an_identity_it_is_this_namespaces_only_while_its_resolv_conf_is_rewritten(
    recorded, current
):
    assert belongs(recorded, current, lambda: render_resolv_conf(RESOLV))  # a live pod of ours
    assert not belongs(recorded, current, lambda: RESOLV)  # restored, or another pod's file
    assert not belongs(recorded, current, lambda: None)  # gone with its sandbox


def test_the_identity_round_trips_and_a_malformed_one_is_refused():
    assert NetnsId.from_dict(HERE.to_dict()) == HERE
    assert NetnsId.from_dict(json.loads(json.dumps(HERE.to_dict()))) == HERE
    assert NetnsId.from_dict(None) is None
    for bad in (
        "x",
        [],
        {},
        {"boot": BOOT},
        {"boot": "", "cookie": 1},
        {"boot": BOOT, "cookie": -1},
    ):
        with pytest.raises(ValueError):
            NetnsId.from_dict(bad)
    with pytest.raises(ValueError):
        NetnsId.from_dict({"boot": BOOT, "cookie": True})  # a bool is no cookie


# -- the kernel's identity of this namespace ------------------------------------------------


def test_this_kernel_names_this_namespace_and_the_name_is_stable():
    first, second = netnsid.current(), netnsid.current()
    assert first is not None and first == second  # Linux 5.14+ here
    assert first.cookie > 0 and first.boot == netnsid.BOOT_ID.read_text().strip()


def test_a_kernel_without_the_cookie_or_a_proc_without_the_boot_id_gives_none(
    monkeypatch, tmp_path
):
    assert netnsid.current(tmp_path / "no-boot-id") is None

    class OldKernelSocket(socket.socket):
        def getsockopt(self, *args):  # type: ignore[override]
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    monkeypatch.setattr(netnsid.socket, "socket", OldKernelSocket)
    assert netnsid.current() is None
