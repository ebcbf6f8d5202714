"""linux/watch.py: inotify on a file's directory sees the ways the agent and Kubernetes replace
files (an atomic rename, a ConfigMap/Secret volume's ``..data`` symlink swap), and the key
file then reads the new ring; where inotify cannot be used, ``start`` says so."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

from tencrypt.core.psk import KeySet, parse_psk
from tencrypt.core.stats import Stats
from tencrypt.linux import watch
from tencrypt.linux.files import write_atomic
from tencrypt.linux.keyfile import KeyFile, write_key_file
from tencrypt.linux.watch import DirWatch
from tests.unit.fakes import until

KEY1, KEY2 = (KeySet(parse_psk(base64.b64encode(bytes([n]) * 32).decode())) for n in (1, 2))


def watched(path: Path, change) -> tuple[int, bool]:  # type: ignore[no-untyped-def]
    """Events heard while ``change()`` replaces ``path``; and whether none came before it."""

    async def main() -> tuple[int, bool]:
        heard: list[int] = []
        w = DirWatch([path], lambda: heard.append(1))
        assert w.start()
        try:
            for _ in range(5):
                await asyncio.sleep(0)
            quiet = not heard
            change()
            await until(lambda: bool(heard), rounds=1000)
            return len(heard), quiet
        finally:
            w.close()

    return asyncio.run(main())


def test_an_atomic_rename_over_the_file_is_an_event(tmp_path):
    path = tmp_path / "members.json"
    path.write_text("old")
    count, quiet = watched(path, lambda: write_atomic(path, "new"))
    assert quiet and count >= 1


def test_a_configmap_style_data_symlink_swap_is_an_event_and_the_new_ring_is_read(tmp_path):
    """The kubelet writes ``..2026_x/psk``, points ``..data_tmp`` at it and renames it over
    ``..data``; ``psk`` is a symlink to ``..data/psk`` that never changes."""
    old, new = tmp_path / "..2026_1", tmp_path / "..2026_2"
    old.mkdir(mode=0o700)
    write_key_file(old / "psk", KEY1)
    os.symlink(old.name, tmp_path / "..data")
    os.symlink("..data/psk", tmp_path / "psk")
    keyfile = KeyFile(tmp_path / "psk", Stats())
    assert keyfile.load() == KEY1

    def swap() -> None:
        new.mkdir(mode=0o700)
        write_key_file(new / "psk", KEY2)
        os.symlink(new.name, tmp_path / "..data_tmp")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")

    count, quiet = watched(tmp_path / "psk", swap)
    assert quiet and count >= 1
    assert keyfile.poll() == KEY2


def test_a_rewrite_in_place_is_an_event(tmp_path):
    path = tmp_path / "keys"
    path.write_text("a")
    count, _ = watched(path, lambda: path.write_text("b"))
    assert count >= 1


def test_a_missing_directory_or_no_inotify_is_refused_for_the_poll(tmp_path, monkeypatch, caplog):
    async def start(files: list[Path]) -> bool:
        w = DirWatch(files, lambda: None)
        ok = w.start()
        assert w.active is ok
        w.close()
        return ok

    assert asyncio.run(start([tmp_path / "f"]))
    assert not asyncio.run(start([tmp_path / "gone" / "f"]))
    monkeypatch.setattr(watch, "_libc", lambda: None)
    assert not asyncio.run(start([tmp_path / "f"]))
    assert "polling" in caplog.text


def test_a_deleted_directory_ends_the_watch_and_says_so(tmp_path):
    d = tmp_path / "d"
    d.mkdir()

    async def main() -> tuple[bool, int]:
        heard: list[int] = []
        w = DirWatch([d / "f"], lambda: heard.append(1))
        assert w.start()
        d.rmdir()
        await until(lambda: not w.active, rounds=1000)
        return w.active, len(heard)

    active, heard = asyncio.run(main())
    assert not active and heard >= 1  # the caller is woken and polls from now on
