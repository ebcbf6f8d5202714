"""The repository is self-contained: no tracked file points into a developer's machine or a
sibling checkout.

The rule, applied to every tracked text file (``git ls-files``):

- **Absolute paths** may not start in a directory that belongs to a person or a machine rather
  than to the system: ``/home``, ``/Users``, ``/root`` (home directories), ``/work``,
  ``/workspace``, ``/builds`` (where developers and CI runners keep checkouts), and the parent
  of this checkout and the running user's home directory, whatever they are called (so a new
  machine's layout is caught on that machine). Everything else is allowed, because absolute
  paths are legitimately everywhere in this code base and mean the same on every machine:
  system files (``/etc/resolv.conf``, ``/proc/PID/root``, ``/run/tencrypt``, ``/usr/sbin/nft``),
  paths inside the node image (``/opt/tencrypt``, the build stage's ``/src``), cgroup paths
  (``/kubepods/...``), API paths (``/api/v1/pods``) and synthetic mount points in tests
  (``/mnt/...``). A deny-list rather than an allow-list of roots for that reason.
- **Relative paths** may climb with ``..`` only as far as the repository's top: a ``../x``
  resolved against the directory of the file that names it must stay inside the repository
  (``$(dirname "$0")/../..`` in scripts/k8s/ is the top; ``../shared/DESIGN.md`` in README.md is
  a sibling checkout).

A path token starts after the start of a line, white space, a quote, a back-quote or one of
``=([,:`` and has at least two components (``/16`` in ``172.30.0.0/16`` and ``TCP/UDP`` are not
paths; the ``//`` of a URL is not a root). ``EXEMPT`` lists the only files allowed to break the
rule, each with its reason; keep it short.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]

PERSONAL_ROOTS = frozenset({"home", "Users", "root", "work", "workspace", "builds"})


def _this_machine() -> frozenset[str]:
    """Top-level directories of this checkout's parent and of the home directory, unless they
    are ``/`` itself (a checkout at the root of the file system)."""
    roots = set()
    for path in (REPO.parent, Path.home()):
        if len(path.parts) > 1:
            roots.add(path.parts[1])
    return frozenset(roots - {"tmp", "opt", "srv", "var", "usr"})


DENIED_ROOTS = PERSONAL_ROOTS | _this_machine()

# file (or directory prefix, ending in "/") -> why it may name paths outside the repository
EXEMPT = {
    "tests/unit/data/containerd-1.6/": "recorded verbatim on a containerd node (/work/cri-verify "
    "was that node's containerd root); the parsers are tested "
    "on exactly these bytes",
    "tests/unit/test_self_contained.py": "this rule's own documentation and probes",
}

_LEAD = r"(?:^|(?<=[\s\"'`=(\[,:]))"
ABSOLUTE = re.compile(_LEAD + r"/([A-Za-z_][\w.-]*)/[\w.$*{<-]")
CLIMB = re.compile(_LEAD + r"(?:\$\(dirname \"\$0\"\)/)?((?:\.\./)*\.\.)(?=/|[\s\"'`)]|$)")


def tracked_text_files() -> list[tuple[str, str]]:
    """(path, text) of every tracked file that decodes as UTF-8 (PNGs and the like are skipped)."""
    names = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True)
        .stdout.decode()
        .split("\0")
    )
    files = []
    for name in filter(None, names):
        path = REPO / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        try:
            files.append((name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return files


def violations(name: str, text: str) -> list[str]:
    """Every path in ``text`` (the content of tracked file ``name``) that leaves the repository."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in ABSOLUTE.finditer(line):
            if m.group(1) in DENIED_ROOTS:
                found.append(f"{name}:{lineno}: absolute path {line[m.start() :].split()[0]!r}")
        for m in CLIMB.finditer(line):
            depth = m.group(1).count("..")
            if depth > len(PurePosixPath(name).parent.parts):
                found.append(
                    f"{name}:{lineno}: climbs out of the repository: "
                    f"{line[m.start() :].split()[0]!r}"
                )
    return found


def _exempt(name: str) -> bool:
    return any(name == key or (key.endswith("/") and name.startswith(key)) for key in EXEMPT)


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_text_files()
    assert len(files) > 50, "git ls-files found too few files: not run from a checkout?"
    bad = [v for name, text in files if not _exempt(name) for v in violations(name, text)]
    assert not bad, "paths outside the repository:\n" + "\n".join(bad)


def test_exemptions_still_exist():
    """An exemption whose file is gone is removed, so that the list cannot only grow."""
    for key in EXEMPT:
        assert (REPO / key).exists(), key


@pytest.mark.parametrize(
    "line",
    [
        'VECTORS = Path("/work/shared/vectors/noise-cacophony.json")',
        "see `../shared/DESIGN.md` for the design",
        "cp /home/alice/tencrypt/x .",
        "source=/root/.kube/config",
        "open('/Users/bob/key.b64')",
    ],
)
def test_rule_catches_developer_paths(line):
    assert violations("README.md", line)


@pytest.mark.parametrize(
    "name, line",
    [
        ("README.md", "rewrites /etc/resolv.conf in place; state in /run/tencrypt/x"),
        ("tencrypt/linux/podnet.py", 'seen = f"/proc/{pid}/root/etc/resolv.conf"'),
        ("README.md", "172.30.0.0/16 via TCP/UDP, see https://github.com/mcginty/snow/x"),
        ("scripts/k8s/build-image.sh", 'repo=$(cd "$(dirname "$0")/../.." && pwd)'),
        ("scripts/test.sh", 'cd "$(dirname "$0")/.."'),
        ("tests/unit/test_agent.py", '"0::/../../kubepods-besteffort-pod.slice/"'),
        ("scripts/k8s/Dockerfile", "COPY --from=build /opt/tencrypt /opt/tencrypt"),
        ("tencrypt/nodesync/fakeapi.py", '"/api/v1/namespaces/{ns}/pods": pods'),
        ("tests/unit/test_agent.py", '"0::/kubepods.slice/kubepods-pod.slice/crio.scope"'),
    ],
)
def test_rule_allows_system_paths_and_climbs_inside_the_repository(name, line):
    assert violations(name, line) == []
