"""Setup's state belongs to one namespace's life (core/netnsid.py): a namespace that the kernel
gives a dead one's inode number starts clean.

    [ sdaNNN ]  "shop", dead: eth0 10.128.0.5/23 via 10.128.0.1; DNS 172.30.0.10
                set up with shop's membership file; its proxy ran and was killed; the
                namespace deleted without an undo (a pod that died): <state>/netns-<inode>
                keeps setup.json, run.pid, keys-loaded.json and a members.json (where an
                agent before this change wrote it)
    [ sdbNNN ]  "blog", new: namespaces made and deleted until one gets that inode number
                (at most REUSE_TRIES; the kernel frees it a moment after the deletion and
                hands it out again), then eth0 10.129.0.7/23 via 10.129.0.1; DNS 172.31.0.10

In the new one: `run` refuses the dead state, `setup --undo` removes it and nothing else,
`setup` removes it and records this namespace, and the proxy starts with no membership (not
shop's) and this pod's own resolv.conf. Each namespace's veth peer stays inside it; the state
directory is pytest's (never /run/tencrypt, which other pods' tests share); every namespace
and process is removed afterwards, also after a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tencrypt.core.membership import Members, render_members
from tencrypt.linux import netns
from tests.netns.conftest import standalone_pod
from tests.netns.test_setup import snapshot

TENCRYPT = str(Path(sys.executable).parent / "tencrypt")
REUSE_TRIES = 200  # namespaces made at most to meet a dead one's inode number again
RESOLV_SHOP = (
    "nameserver 172.30.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\n"
    "options ndots:5\n"
)
RESOLV_BLOG = "nameserver 172.31.0.10\nsearch blog.svc.cluster.local svc.cluster.local\n"
METRICS = "127.0.0.1:9137"
READY_WAIT = 60.0  # seconds: a proxy's start on a loaded 2-core machine


def tencrypt(ns, *args, check=True, timeout=60):
    return netns.run(ns, [TENCRYPT, *args], check=check, timeout=timeout)


def inode(ns: str) -> int:
    return os.stat(netns.NETNS_DIR / ns).st_ino


def identity(ns: str) -> dict[str, object]:
    """The identity `tencrypt setup` records for namespace ``ns`` (linux/netnsid.py)."""
    code = "import json; from tencrypt.linux import netnsid as n; print(json.dumps(n.current().to_dict()))"
    return json.loads(netns.run(ns, [sys.executable, "-c", code]).stdout)


@contextmanager
def proxy(ns: str, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`tencrypt run ARGS` in ``ns`` until it is ready; SIGKILLed afterwards if still alive."""
    proc = netns.spawn(ns, [TENCRYPT, "run", "--metrics", METRICS, *args], log=log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return "tencrypt: ready" in log.read_text()

        netns.wait_for(ready, timeout=READY_WAIT, interval=0.1, what=f"the proxy in {ns}")
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def namespace_with_inode(target: int, prefix: str) -> Iterator[tuple[str, int]]:
    """A new named namespace holding inode number ``target`` and the number of namespaces
    made to get it; after REUSE_TRIES without, a new namespace anyway and 0. Every other
    namespace made is deleted at once, this one afterwards."""
    made: list[str] = []
    try:
        for tries in range(1, REUSE_TRIES + 1):
            name = f"{prefix}{netns.unique_suffix()}"
            made.append(name)
            netns.create(name)
            if inode(name) == target:
                yield name, tries
                return
            netns.delete(name)
        name = f"{prefix}{netns.unique_suffix()}"
        made.append(name)
        netns.create(name)
        yield name, 0
    finally:
        for name in made:
            netns.delete(name)


def shop_members(path: Path) -> Path:
    members = Members(
        "shop",
        7,
        frozenset({"10.128.0.5", "10.128.0.6"}),
        frozenset({"172.30.0.20"}),
        (),
        ("172.30.0.0/16",),
        ("10.128.0.0/14",),
    )
    path.write_text(render_members(members))
    return path


def test_a_namespace_reusing_a_dead_ones_inode_starts_clean(tmp_path):
    state = tmp_path / "state"
    key = tmp_path / "psk"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    members = shop_members(tmp_path / "shop-members.json")
    common = ("--state-dir", str(state))

    # 1. the dead pod: set up, its proxy ran with shop's membership, then it died
    with standalone_pod("sda", "10.128.0.5/23", "10.128.0.1", RESOLV_SHOP) as dead:
        tencrypt(dead, "setup", *common, "--members-file", str(members))
        dead_inode, dead_id = inode(dead), identity(dead)
        directory = state / f"netns-{dead_inode}"
        shop_log = tmp_path / "shop-proxy.log"
        with proxy(dead, shop_log, *common, "--psk-file", str(key)) as shop:
            assert "membership of project shop" in shop_log.read_text()
            os.killpg(shop.pid, signal.SIGKILL)  # a pod's processes die with it
            shop.wait()
        shutil.copy(members, directory / "members.json")  # as an agent before this wrote it
    left = sorted(p.name for p in directory.iterdir())
    assert left == ["keys-loaded.json", "members.json", "metrics.sock", "run.pid", "setup.json"]
    kept = tmp_path / "dead-state"
    shutil.copytree(directory, kept, ignore=shutil.ignore_patterns("metrics.sock"))  # a socket

    # 2. a new namespace with the dead one's inode number
    with namespace_with_inode(dead_inode, "sdb") as (name, tries):
        if tries == 0:  # the kernel did not give it out again: the situation is made by hand
            warnings.warn(
                f"no namespace got inode {dead_inode} in {REUSE_TRIES} tries: the dead "
                "state was copied under the new namespace's inode number instead",
                stacklevel=1,
            )
            directory = state / f"netns-{inode(name)}"
            shutil.copytree(kept, directory)
        else:
            print(f"inode {dead_inode} given to a new namespace after {tries} tries")
        with standalone_pod("sdb", "10.129.0.7/23", "10.129.0.1", RESOLV_BLOG, name=name) as pod:
            fresh_id = identity(pod)
            assert fresh_id != dead_id
            before = snapshot(pod)

            # run: refused, nothing touched
            refused = tencrypt(pod, "run", *common, "--psk-file", str(key), check=False, timeout=30)
            assert refused.returncode == 2, refused.stderr
            assert "no longer exists" in refused.stderr
            assert "run `tencrypt setup` first" in refused.stderr
            assert "Traceback" not in refused.stderr
            assert sorted(p.name for p in directory.iterdir()) == left

            # undo: the dead state goes, nothing of this namespace is touched — not even what
            # a wrongful undo would take: a route of Tencrypt's protocol, a table of its name
            netns.run(pod, ["ip", "route", "add", "10.99.0.0/16", "dev", "eth0", "proto", "137"])
            netns.run(pod, ["nft", "add", "table", "inet", "tencrypt"])
            tripwired = snapshot(pod)
            undone = tencrypt(pod, "setup", "--undo", *common)
            assert "no longer exists" in undone.stdout
            assert "removed it; nothing in this namespace was changed" in undone.stdout
            assert not directory.exists()
            assert snapshot(pod) == tripwired
            assert "table inet tencrypt" in netns.run(pod, ["nft", "list", "tables"]).stdout
            netns.run(pod, ["nft", "delete", "table", "inet", "tencrypt"])
            netns.run(pod, ["ip", "route", "del", "10.99.0.0/16", "proto", "137"])
            assert snapshot(pod) == before

            # setup: the dead state goes, this namespace's is recorded
            shutil.copytree(kept, directory)
            done = tencrypt(pod, "setup", *common)
            assert "no longer exists" in done.stderr and "removed" in done.stderr
            assert "project domain blog.svc.cluster.local" in done.stdout
            assert sorted(p.name for p in directory.iterdir()) == ["setup.json"]
            recorded = json.loads((directory / "setup.json").read_text())
            assert recorded["netns"] == fresh_id and recorded["members_file"] is None
            assert recorded["resolv_original"] == RESOLV_BLOG
            assert recorded["config"]["dns"] == "172.31.0.10"

            # run: no membership at all, shop's least of all
            blog_log = tmp_path / "blog-proxy.log"
            with proxy(pod, blog_log, *common, "--psk-file", str(key)) as blog:
                status = netns.run(
                    pod, ["curl", "-sS", "--max-time", "5", f"http://{METRICS}/status"]
                )
                assert json.loads(status.stdout)["membership"] is None
                text = blog_log.read_text()
                assert "membership of project" not in text and "shop" not in text
                assert "no membership file (none given)" in text
                blog.send_signal(signal.SIGTERM)
                assert blog.wait(timeout=30) == 0

            undone = tencrypt(pod, "setup", "--undo", *common)
            assert "namespace restored" in undone.stdout
            assert snapshot(pod) == before and not directory.exists()
            assert (Path("/etc/netns") / pod / "resolv.conf").read_text() == RESOLV_BLOG


def test_an_older_setups_state_is_undone_and_a_lost_one_recovered_from_resolv_conf(tmp_path):
    """The upgrade: a setup.json without an identity (the format before) in a namespace whose
    resolv.conf is rewritten is this namespace's, and undone; a rewritten resolv.conf whose
    state is lost gives its original back itself."""
    common = ("--state-dir", str(tmp_path / "state"))
    with standalone_pod("sdo", "10.128.0.5/23", "10.128.0.1", RESOLV_SHOP) as pod:
        before = snapshot(pod)
        directory = tmp_path / "state" / f"netns-{inode(pod)}"
        tencrypt(pod, "setup", *common)
        older = json.loads((directory / "setup.json").read_text())
        del older["netns"], older["members_file"]
        (directory / "setup.json").write_text(json.dumps(older))
        again = tencrypt(pod, "setup", *common)  # the older state is kept: it is this pod's
        assert "no longer exists" not in again.stderr and "recovered" not in again.stderr
        assert json.loads((directory / "setup.json").read_text())["netns"] == identity(pod)
        (directory / "setup.json").write_text(json.dumps(older))
        assert "namespace restored" in tencrypt(pod, "setup", "--undo", *common).stdout
        assert snapshot(pod) == before and not directory.exists()

        tencrypt(pod, "setup", *common)
        shutil.rmtree(directory)  # the state lost, resolv.conf still rewritten
        lost = tencrypt(pod, "setup", *common)
        assert "recovered from the file (nameservers 172.30.0.10)" in lost.stderr
        assert "namespace restored" in tencrypt(pod, "setup", "--undo", *common).stdout
        assert snapshot(pod) == before
