"""The wheel is the product only: no test doubles, no tests, no benchmark.

Built offline from a copy of the checkout's files (tracked, and new files not ignored), exactly
as ``pip install .`` builds it for the node image (scripts/k8s/Dockerfile): ``pip wheel
--no-deps --no-build-isolation --no-index`` with the setuptools and wheel of the running
environment (the test extra installs them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    pytest.importorskip("wheel", reason="the test extra installs wheel (pip wheel needs it)")
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "out"
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (whl,) = out.glob("tencrypt-*.whl")
    with zipfile.ZipFile(whl) as zf:
        return zf.namelist()


def test_wheel_holds_the_package_and_its_metadata_only(wheel_names: list[str]) -> None:
    tops = {PurePosixPath(n).parts[0] for n in wheel_names}
    assert "tencrypt" in tops
    assert {t for t in tops if t != "tencrypt" and not t.endswith(".dist-info")} == set()
    assert "tencrypt/core/session.py" in wheel_names
    assert "tencrypt/benchcmd.py" in wheel_names  # `tencrypt bench` says where bench/ lives


def test_wheel_has_no_tests_or_bench(wheel_names: list[str]) -> None:
    parts = [PurePosixPath(n).parts for n in wheel_names]
    assert not [
        n
        for n, p in zip(wheel_names, parts, strict=True)
        if {"tests", "test", "bench", "conftest.py"} & set(p)
        or any(x.startswith("test_") for x in p)
    ]


def test_wheel_has_no_test_doubles(wheel_names: list[str]) -> None:
    fakes = [
        n
        for n in wheel_names
        if any(p.startswith(("fake", "mock", "stub")) for p in PurePosixPath(n).parts)
    ]
    assert fakes == []
