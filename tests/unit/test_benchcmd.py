"""`tencrypt bench` runs the checkout's bench/ and, from an installed wheel, says what to do."""

from __future__ import annotations

from pathlib import Path

import tencrypt
from tencrypt import benchcmd, cli

REPO = Path(__file__).resolve().parents[2]


def test_checkout_root_is_the_repository_beside_the_package():
    assert benchcmd.checkout_root() == REPO == Path(tencrypt.__file__).resolve().parents[1]


def test_no_bench_beside_an_installed_package(tmp_path):
    package = tmp_path / "site-packages" / "tencrypt"
    package.mkdir(parents=True)
    assert benchcmd.checkout_root(package) is None
    (tmp_path / "site-packages" / "bench").mkdir()  # a package without harness.py: not ours
    assert benchcmd.checkout_root(package) is None


def test_cli_explains_where_the_benchmark_lives(monkeypatch, capsys):
    monkeypatch.setattr(benchcmd, "checkout_root", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "tencrypt bench: error:" in err and "bench/ of the source repository" in err
    assert "scripts/install.sh" in err
