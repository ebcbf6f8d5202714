"""agent/cgroups.py: a ready proxy joins its pod's cgroups, every hierarchy of them, through
the node's cgroupfs (issue 25, item 5). The pure part here; the move itself, a container
stopped around its proxies, in tests/netns/test_node_image.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tencrypt.agent import cgroups

# an agent container on a cgroup v1 node (podman, cgroupfs): its own cgroupfs is rooted at
# its own cgroup; the node's, mounted at /host/sys/fs/cgroup, at /
CONTAINER = "/libpod_parent/libpod-3e16"
MOUNTINFO_V1 = f"""93 85 0:47 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
94 93 0:29 {CONTAINER} /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
97 93 0:32 {CONTAINER} /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
102 93 0:37 {CONTAINER} /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
110 85 0:28 / /host/sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
111 110 0:29 / /host/sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
112 110 0:32 / /host/sys/fs/cgroup/memory rw - cgroup cgroup rw,memory,clone_children
113 110 0:37 / /host/sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
114 110 0:40 / /host/sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
115 110 0:38 / /host/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
116 85 0:50 / /mnt/with\\040space rw - ext4 /dev/vda rw
"""
SANDBOX_V1 = """9:name=systemd:/kubepods/pod1234/abc
4:memory:/kubepods/pod1234/abc
1:cpu:/kubepods/pod1234/abc
2:cpu,cpuacct:/kubepods/pod1234/abc
0::/kubepods/pod1234/abc
7:net_cls:/
"""
# a cgroup v2 node (systemd driver), the agent under nsenter in the node's cgroupns
MOUNTINFO_V2 = """30 25 0:26 /kubepods.slice/agent.scope /sys/fs/cgroup rw - cgroup2 cgroup2 rw
40 25 0:26 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
SANDBOX_V2 = "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-9f.scope\n"


def test_every_hierarchy_of_the_sandbox_is_found_through_the_nodes_cgroupfs() -> None:
    mounts = cgroups.parse_mounts(MOUNTINFO_V1)
    assert [m.point for m in mounts] == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/systemd",
        "/host/sys/fs/cgroup/cpu",
        "/host/sys/fs/cgroup/memory",
        "/host/sys/fs/cgroup/systemd",
        "/host/sys/fs/cgroup/cpu,cpuacct",
        "/host/sys/fs/cgroup/unified",
    ]
    assert mounts[4].controllers == {"memory"}  # clone_children is an option, not a controller
    assert mounts[5].controllers == {"name=systemd"} and mounts[7].v2
    assert cgroups.targets(SANDBOX_V1, mounts) == [
        "/host/sys/fs/cgroup/systemd/kubepods/pod1234/abc",
        "/host/sys/fs/cgroup/memory/kubepods/pod1234/abc",
        "/host/sys/fs/cgroup/cpu/kubepods/pod1234/abc",
        "/host/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1234/abc",
        "/host/sys/fs/cgroup/unified/kubepods/pod1234/abc",
        # net_cls is mounted nowhere here: skipped
    ]


def test_a_container_sees_only_its_own_subtree_without_the_nodes_cgroupfs() -> None:
    own = [m for m in cgroups.parse_mounts(MOUNTINFO_V1) if m.point.startswith("/sys/")]
    assert cgroups.targets(SANDBOX_V1, own) == []  # the pod is not under the agent's cgroup
    inside = f"4:memory:{CONTAINER}/child\n"  # a path under the container's own root
    assert cgroups.targets(inside, own) == ["/sys/fs/cgroup/memory/child"]


def test_cgroup_v2_with_the_nodes_tree_mounted() -> None:
    mounts = cgroups.parse_mounts(MOUNTINFO_V2)
    assert cgroups.targets(SANDBOX_V2, mounts) == [
        "/host/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cri-containerd-9f.scope"
    ]


def test_mountinfo_escapes_and_odd_lines() -> None:
    assert cgroups.parse_mounts("garbage\n\n1 2 3\n") == []
    [m] = cgroups.parse_mounts(r"5 1 0:1 /a\040b /mnt/c\040d rw - cgroup2 cgroup2 rw" + "\n")
    assert (m.point, m.root, m.v2) == ("/mnt/c d", "/a b", True)


def test_the_module_moves_a_process_and_reports_what_it_cannot(tmp_path: Path) -> None:
    """The child the launcher and the agent run: a real process into this process's own
    cgroups (a no-op move that the kernel still checks), and a clear refusal otherwise."""
    import sys

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        me = str(os.getpid())
        done = subprocess.run(
            [sys.executable, "-m", "tencrypt.agent.cgroups", str(sleeper.pid), me],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:  # root on a node: joined every hierarchy this test is in
            assert (
                Path(f"/proc/{sleeper.pid}/cgroup").read_text()
                == Path("/proc/self/cgroup").read_text()
            )
        else:  # without the right to move (not root): said in one line
            assert done.stderr.startswith("cannot move the proxy:"), done.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "tencrypt.agent.cgroups", "x"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 1 and bad.stderr.startswith("cannot move the proxy:")
        via = subprocess.run(
            [sys.executable, "-m", "tencrypt.agent.cgroups", "--via-node", "x"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert via.returncode == 2 and "usage" in via.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_alike_compares_what_both_processes_read(tmp_path: Path) -> None:
    for pid, text in ((10, "0::/kubepods/pod1/abc\n"), (11, "0::/kubepods/pod1/abc\n")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "cgroup").write_text("0::/kubepods/tencrypt-agent\n")
    assert cgroups.alike(10, 11, tmp_path)  # already there: no move, no child started
    assert not cgroups.alike(12, 11, tmp_path)
    assert not cgroups.alike(13, 11, tmp_path)  # a process gone: not alike, a move is tried
    assert cgroups.alike(os.getpid(), os.getpid())  # the real /proc
