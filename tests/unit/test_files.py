"""linux.files.write_atomic: the one way files other processes read are replaced."""

from __future__ import annotations

import os
import stat

import pytest

from tencrypt.linux.files import write_atomic


def test_replaces_with_the_mode_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "new" / "keys.psk"
    write_atomic(target, "one\n", 0o600)
    write_atomic(target, "two\n", 0o600)
    assert target.read_text() == "two\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert os.listdir(target.parent) == ["keys.psk"]


def test_never_writes_through_a_link_and_cleans_up_on_failure(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "members.json"
    (tmp_path / f".members.json.{os.getpid()}.tmp").symlink_to(victim)
    write_atomic(target, "new")  # the stale link is removed, not followed
    assert victim.read_text() == "untouched" and target.read_text() == "new"
    with pytest.raises(TypeError):
        write_atomic(target, b"not text")  # type: ignore[arg-type]
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["members.json", "victim"]
