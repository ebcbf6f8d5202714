"""The checks' configuration means what it says (pyproject.toml; scripts/check.sh runs them).

- mypy: --strict's checks on ``tencrypt.core.*`` and only there. ``strict = true`` inside
  ``[[tool.mypy.overrides]]`` would turn strict on for every module (python/mypy#11401), so the
  override spells out each per-module flag that the installed mypy's ``--strict`` enables, and
  the global-only ones sit in ``[tool.mypy]``. If a mypy upgrade adds a flag to --strict, this
  test names it.
- coverage: branch coverage of tencrypt/core/ with a floor of at least 90 %.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())


def strict_flags() -> list[str]:
    """The command-line flags ``mypy --help`` lists as enabled by --strict."""
    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--help"], check=True, capture_output=True, text=True
    ).stdout
    para = re.search(r"--strict\s+Strict mode; enables the following flags:(.*?)\n  -", out, re.S)
    assert para, "mypy --help no longer describes --strict"
    text = re.sub(r"-\n\s+", "-", para.group(1))  # flags wrapped at a hyphen
    return re.findall(r"--[a-z-]+", text)


def as_option(flag: str) -> tuple[str, bool]:
    """``--no-implicit-reexport`` -> (``implicit_reexport``, False); else (name, True)."""
    name = flag.removeprefix("--").replace("-", "_")
    if name.startswith("no_"):
        return name.removeprefix("no_"), False
    return name, True


def test_mypy_strict_on_core_only():
    from mypy.options import PER_MODULE_OPTIONS

    mypy = CONFIG["tool"]["mypy"]
    assert "strict" not in mypy, "strict = true would apply to the whole package"
    (core,) = [o for o in mypy["overrides"] if o["module"] == "tencrypt.core.*"]
    assert "strict" not in core, "strict = true in an override turns it on globally (mypy#11401)"
    flags = strict_flags()
    assert len(flags) >= 10
    for flag in flags:
        name, value = as_option(flag)
        where = core if name in PER_MODULE_OPTIONS else mypy
        assert where.get(name) is value, f"{flag} ({name} = {value}) missing"
    for other in mypy["overrides"]:
        if other is not core:
            assert not set(other) & {as_option(f)[0] for f in flags}, other["module"]


def test_coverage_floor():
    cov = CONFIG["tool"]["coverage"]
    assert cov["run"]["source"] == ["tencrypt/core"] and cov["run"]["branch"] is True
    assert cov["report"]["fail_under"] >= 90
    assert "pytest-cov" in " ".join(CONFIG["project"]["optional-dependencies"]["test"])
