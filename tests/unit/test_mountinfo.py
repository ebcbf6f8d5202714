"""core.mountinfo: from a pod's view of a file to the node's path of it."""

from tencrypt.core.mountinfo import mount_of, node_path, parse_mountinfo

SANDBOX = "0f3c9a7e5d"
# A containerd pause container: overlay root, the sandbox's files bound from the node's disk,
# resolv.conf read-only (the shape of containerd's CRI sandbox spec).
POD = f"""\
1285 1140 0:170 / / ro,relatime master:377 - overlay overlay rw,lowerdir=/var/lib/containerd/l1
1286 1285 0:172 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1287 1285 0:173 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
1290 1285 0:174 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k
1291 1285 8:1 /var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/resolv.conf \
/etc/resolv.conf ro,nosuid,nodev,noexec,relatime - ext4 /dev/sda1 rw
1292 1285 8:1 /var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/hostname \
/etc/hostname rw,nosuid,nodev,relatime - ext4 /dev/sda1 rw
"""
NODE = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:25 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755
"""
RESOLV = f"/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/resolv.conf"


def test_parse_reads_every_field_and_skips_malformed_lines():
    mounts = parse_mountinfo(POD + "garbage line\n1 2 3\n")
    assert len(mounts) == 6
    m = mounts[4]
    assert (m.mount_id, m.parent_id, m.dev, m.root, m.mount_point) == (
        1291,
        1285,
        "8:1",
        RESOLV,
        "/etc/resolv.conf",
    )
    assert m.read_only and m.fstype == "ext4" and m.source == "/dev/sda1"
    assert not mounts[5].read_only


def test_octal_escapes_are_decoded():
    (m,) = parse_mountinfo(r"30 22 8:1 /srv/my\040dir /mnt/a\134b rw - ext4 /dev/sda1 rw")
    assert m.root == "/srv/my dir" and m.mount_point == "/mnt/a\\b"


def test_mount_of_takes_the_deepest_and_the_topmost():
    mounts = parse_mountinfo(POD)
    assert mount_of(mounts, "/etc/resolv.conf").mount_id == 1291
    assert mount_of(mounts, "/etc/passwd").mount_id == 1285  # the root
    assert mount_of(mounts, "/dev/shm/x").mount_id == 1290
    assert mount_of(mounts, "/devx").mount_id == 1285  # a name prefix is not a parent
    stacked = parse_mountinfo(NODE + "40 24 0:30 / /run rw - tmpfs tmpfs rw\n")
    assert mount_of(stacked, "/run/x").mount_id == 40
    assert mount_of([], "/etc/resolv.conf") is None


def test_node_path_of_a_read_only_bind_mount():
    assert node_path(parse_mountinfo(POD), "/etc/resolv.conf", parse_mountinfo(NODE)) == RESOLV


def test_node_path_through_a_separate_node_mount_and_a_subvolume():
    # /var/lib/containerd on its own disk (8:17): the pod's root is relative to that disk
    pod = parse_mountinfo(
        f"9 1 8:17 /io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/resolv.conf "
        "/etc/resolv.conf ro - xfs /dev/sdb1 rw\n"
    )
    node = parse_mountinfo(NODE + "50 22 8:17 / /var/lib/containerd rw - xfs /dev/sdb1 rw\n")
    assert node_path(pod, "/etc/resolv.conf", node) == RESOLV
    # btrfs: the node mounts subvolume /@ at /, and /@/var/lib as well elsewhere (longest wins)
    pod = parse_mountinfo("9 1 0:40 /@/var/lib/x/resolv.conf /etc/resolv.conf ro - btrfs d rw\n")
    node = parse_mountinfo(
        "1 0 0:40 /@ / rw - btrfs d rw\n2 1 0:40 /@/var/lib /mnt/varlib rw - btrfs d rw\n"
    )
    assert node_path(pod, "/etc/resolv.conf", node) == "/mnt/varlib/x/resolv.conf"


def test_node_path_is_none_when_the_node_shows_no_such_filesystem():
    pod = parse_mountinfo(POD)
    assert node_path(pod, "/etc/resolv.conf", parse_mountinfo(NODE.replace("8:1", "8:2"))) is None
    # the node mounts only another part of that device
    other = parse_mountinfo("22 1 8:1 /home /home rw - ext4 /dev/sda1 rw\n")
    assert node_path(pod, "/etc/resolv.conf", other) is None
    assert node_path(pod, "/etc/resolv.conf", []) is None


def test_real_containerd_sandbox_recorded_here():
    """containerd 1.6.20: the pause container's resolv.conf is read-only, the application
    container's writable, both the same node file — which node_path finds."""
    from pathlib import Path

    data = Path(__file__).parent / "data" / "containerd-1.6"
    pause, app, node = (
        parse_mountinfo((data / f"mountinfo-{n}.txt").read_text())
        for n in ("pause", "app", "host-pid1")
    )
    assert mount_of(pause, "/etc/resolv.conf").read_only
    assert not mount_of(app, "/etc/resolv.conf").read_only
    source = mount_of(pause, "/etc/resolv.conf").root
    assert source.startswith("/") and source.endswith("/resolv.conf") and "/sandboxes/" in source
    assert node_path(pause, "/etc/resolv.conf", node) == source  # root fs, mounted at /
    assert node_path(app, "/etc/resolv.conf", node) == source
