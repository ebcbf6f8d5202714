"""A setup state directory belongs to one network namespace's life (core/netnsid.py): the rule,
the kernel's identity of this namespace (linux/netnsid.py), and how setup's state, `run` and
`setup --undo` use them (linux/podnet.py) — without root: the state directory is pytest's.

The namespace tests (tests/netns/test_statedir.py) make a namespace that really reuses a dead
one's inode number.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import socket

import pytest

from tencrypt import cli, runcmd
from tencrypt.core.netnsid import NetnsId, belongs
from tencrypt.core.podconfig import PodConfig, render_resolv_conf
from tencrypt.errors import SetupError, UsageError
from tencrypt.linux import netnsid, podnet

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


# -- setup's state --------------------------------------------------------------------------


CONFIG = PodConfig(
    pod_ip="10.128.0.5",
    dev="eth0",
    gateway="10.128.0.1",
    dns="172.30.0.2",
    domain="shop.svc.cluster.local",
    search=("shop.svc.cluster.local", "svc.cluster.local"),
    cluster_domain="cluster.local",
)


def recorded(tmp_path, netns, resolv_text=None, members_file=None):
    """Setup's state for this namespace in ``tmp_path`` recorded with identity ``netns``;
    its resolv.conf holds ``resolv_text`` (None: no such file)."""
    resolv = tmp_path / "resolv.conf"
    if resolv_text is not None:
        resolv.write_text(resolv_text)
    directory = podnet.namespace_state_dir(tmp_path)
    podnet.SetupState(CONFIG, str(resolv), RESOLV, netns, members_file).save(directory)
    return directory


def test_setup_state_records_the_identity_and_the_members_file(tmp_path):
    directory = recorded(tmp_path, HERE, members_file="/run/agent/pods/u1/members.json")
    state = podnet.SetupState.load(directory)
    assert state.netns == HERE and state.members_file == "/run/agent/pods/u1/members.json"
    assert json.loads((directory / podnet.STATE_FILE).read_text())["netns"] == {
        "boot": BOOT,
        "cookie": 4242,
    }


def test_a_setup_json_of_the_previous_format_loads_without_an_identity(tmp_path):
    directory = recorded(tmp_path, HERE)
    d = json.loads((directory / podnet.STATE_FILE).read_text())
    del d["netns"], d["members_file"]
    (directory / podnet.STATE_FILE).write_text(json.dumps(d))
    state = podnet.SetupState.load(directory)
    assert state.netns is None and state.members_file is None and state.config == CONFIG
    assert state.replaced_routes == [] and state.kept_rules == []  # nothing to put back


def test_setup_state_records_what_setup_replaced(tmp_path):
    directory = recorded(tmp_path, HERE)
    state = podnet.SetupState.load(directory)
    route = {"dst": "172.30.0.0/16", "table": 254, "dev": "eth0", "gateway": None, "src": None}
    state.replaced_routes, state.kept_rules = [route], [0x1337]
    state.save(directory)
    again = podnet.SetupState.load(directory)
    assert again.replaced_routes == [route] and again.kept_rules == [0x1337]


@pytest.mark.parametrize(
    "change",
    [
        {"netns": {"cookie": "x"}},
        {"members_file": 7},
        {"config": None},
        {"resolv_conf": None},
        {"replaced_routes": ["172.30.0.0/16"]},
        {"replaced_routes": 3},
        {"kept_rules": ["0x1337"]},
    ],
)
def test_a_damaged_setup_json_is_one_clear_error(tmp_path, change):
    directory = recorded(tmp_path, HERE)
    d = {**json.loads((directory / podnet.STATE_FILE).read_text()), **change}
    if change.get("resolv_conf", 0) is None:
        del d["resolv_conf"]
    (directory / podnet.STATE_FILE).write_text(json.dumps(d))
    with pytest.raises(SetupError, match="unreadable setup state .* remove"):
        podnet.SetupState.load(directory)


def test_run_starts_only_on_this_namespaces_state(tmp_path, monkeypatch):
    monkeypatch.setattr(netnsid, "current", lambda: HERE)
    with pytest.raises(UsageError, match="not set up: run `tencrypt setup` first"):
        podnet.load_state(tmp_path)
    recorded(tmp_path, HERE)
    assert podnet.load_state(tmp_path).config == CONFIG
    recorded(tmp_path, NetnsId(BOOT, 17))  # a dead namespace's, under this inode number
    with pytest.raises(UsageError, match="no longer exists .*: run `tencrypt setup` first") as e:
        podnet.load_state(tmp_path)
    assert e.value.exit_code == 2
    with pytest.raises(UsageError):
        podnet.load_config(tmp_path)  # `tencrypt dns` takes this for "not set up"


def test_the_upgrade_an_older_setups_state_is_used_while_its_resolv_conf_is_rewritten(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(netnsid, "current", lambda: HERE)
    recorded(tmp_path, None, render_resolv_conf(RESOLV))  # a live pod set up before
    assert podnet.load_state(tmp_path).config == CONFIG
    recorded(tmp_path, None, RESOLV)  # a dead pod's: its file restored, or gone
    with pytest.raises(UsageError, match="no longer exists"):
        podnet.load_state(tmp_path)
    recorded(tmp_path, None)
    with pytest.raises(UsageError, match="no longer exists"):
        podnet.load_state(tmp_path)


def run_args(tmp_path, *extra):
    return cli.build_parser(only="run").parse_args(["run", "--state-dir", str(tmp_path), *extra])


def test_tencrypt_run_refuses_a_dead_namespaces_state_before_it_opens_anything(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(netnsid, "current", lambda: HERE)
    directory = recorded(tmp_path, NetnsId(BOOT, 17), members_file=str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text('{"format": "tencrypt-members/1", "project": "shop"}')
    with pytest.raises(UsageError, match="run `tencrypt setup` first"):
        runcmd.main(run_args(tmp_path))
    assert sorted(p.name for p in directory.iterdir()) == [podnet.STATE_FILE]  # untouched


def test_undo_of_a_dead_namespaces_state_removes_it_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(netnsid, "current", lambda: HERE)
    directory = recorded(tmp_path, NetnsId(BOOT, 17), render_resolv_conf(RESOLV))
    for name in (podnet.PID_FILE, "keys-loaded.json", "members.json"):
        (directory / name).write_text("left by the dead pod\n")
    resolv_before = (tmp_path / "resolv.conf").read_text()

    def touched(*args, **kwargs):
        raise AssertionError("undo of a stale state changed the namespace")

    from tencrypt.linux import firewall, netlink, nfqueue

    for module, names in (
        (firewall, ("remove_table",)),
        (nfqueue, ("remove_rules",)),
        (netlink, ("remove_rule", "remove_routes_by_proto", "remove_link")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, touched)
    assert podnet.undo(str(tmp_path)) is podnet.Undone.STALE
    assert not directory.exists()
    # the resolv.conf it names is not this namespace's: left as it is, rewritten or not
    assert (tmp_path / "resolv.conf").read_text() == resolv_before
    assert podnet.undo(str(tmp_path)) is podnet.Undone.NOTHING


def test_setup_reads_the_cluster_ranges_from_the_members_file_it_is_given(tmp_path, caplog):
    members = tmp_path / "members.json"
    members.write_text(
        json.dumps(
            {
                "format": "tencrypt-members/2",
                "project": "shop",
                "generation": 1,
                "pods": [],
                "services": [],
                "serviceCIDRs": ["fd00:30::/112", "10.96.0.0/12"],
                "podCIDRs": ["10.128.0.0/14"],
            }
        )
    )
    args = argparse.Namespace(
        service_cidr=None, pod_cidr=None, members_file=str(members), state_dir=str(tmp_path)
    )
    # one range per family, the IPv6 one second whatever the file's order
    assert podnet._cluster_ranges(args) == ("10.96.0.0/12", "fd00:30::/112", ("10.128.0.0/14",))
    # nothing is read from the state directory, whatever a dead namespace left there
    podnet.namespace_state_dir(tmp_path).mkdir(parents=True)
    (podnet.namespace_state_dir(tmp_path) / "members.json").write_text(members.read_text())
    args.members_file = None
    with caplog.at_level(logging.WARNING):
        assert podnet._cluster_ranges(args) == (podnet.DEFAULT_SERVICE_CIDR, "", ())
    args.members_file = str(tmp_path / "not-yet.json")
    with caplog.at_level(logging.WARNING):
        assert podnet._cluster_ranges(args) == (podnet.DEFAULT_SERVICE_CIDR, "", ())
    assert "not-yet.json not found (yet)" in caplog.text
