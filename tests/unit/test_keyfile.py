"""The key file a running proxy watches (linux/keyfile.py): atomic 0600 writes, a cheap poll,
malformed rings refused and counted with the loaded ring kept, and `tencrypt run`'s sources."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import stat

import pytest

from tencrypt.core.psk import KeySet, fingerprint
from tencrypt.core.stats import Stats
from tencrypt.errors import UsageError
from tencrypt.linux.keyfile import KeyFile, describe, read_keys, write_key_file

K1, K2, K3 = bytes(range(1, 33)), bytes(range(2, 34)), bytes(range(3, 35))


def test_write_is_0600_in_a_0700_directory_and_leaves_no_temporary(tmp_path):
    path = write_key_file(tmp_path / "keys" / "shop.psk", KeySet(K1, next=K2))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["shop.psk"]


def test_poll_applies_a_new_ring_once_and_counts_it(tmp_path):
    path = write_key_file(tmp_path / "k", KeySet(K1))
    stats = Stats()
    kf = KeyFile(path, stats)
    assert kf.load() == KeySet(K1)
    assert kf.poll() is None  # unchanged: one stat
    write_key_file(path, KeySet(K1, next=K2))
    assert kf.poll() == KeySet(K1, next=K2) and kf.poll() is None
    write_key_file(path, KeySet(K1, next=K2))  # rewritten with the same keys: no change
    assert kf.poll() is None
    assert stats.get("key_reloads") == 1 and stats.get("key_reload_refusals") == 0


def test_a_malformed_file_is_refused_logged_counted_and_the_ring_kept(tmp_path, caplog):
    path = write_key_file(tmp_path / "k", KeySet(K1, next=K2))
    stats = Stats()
    kf = KeyFile(path, stats)
    kf.load()
    secret = base64.b64encode(K3).decode()
    path.write_text(f"current {secret}\ncurrent {secret}\n")
    with caplog.at_level(logging.ERROR, "tencrypt.keys"):
        assert kf.poll() is None
    assert kf.loaded == KeySet(K1, next=K2) and stats.get("key_reload_refusals") == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert "refused" in line and str(path) in line and fingerprint(K1) in line
    assert secret[:8] not in line
    assert kf.poll() is None and stats.get("key_reload_refusals") == 1  # once per change
    write_key_file(path, KeySet(K2, previous=K1))  # the next good file is taken
    assert kf.poll() == KeySet(K2, previous=K1)


def test_a_missing_file_keeps_the_ring_and_force_rereads(tmp_path):
    path = write_key_file(tmp_path / "k", KeySet(K1))
    stats = Stats()
    kf = KeyFile(path, stats)
    kf.load()
    path.unlink()
    assert kf.poll() is None and kf.poll(force=True) is None and kf.loaded == KeySet(K1)
    write_key_file(path, KeySet(K2, previous=K1))
    assert kf.poll(force=True) == KeySet(K2, previous=K1) and stats.get("key_reloads") == 1


def test_load_refuses_an_unreadable_or_malformed_file_clearly(tmp_path):
    with pytest.raises(UsageError, match="cannot read --psk-file"):
        KeyFile(tmp_path / "none", Stats()).load()
    bad = tmp_path / "bad"
    bad.write_text("next " + base64.b64encode(K1).decode() + "\n")
    with pytest.raises(UsageError, match="no `current KEY` line"):
        KeyFile(bad, Stats()).load()


def test_run_reads_a_ring_file_a_legacy_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TENCRYPT_PROJECT_PSK", raising=False)
    legacy = tmp_path / "legacy"
    legacy.write_text(base64.b64encode(K1).decode() + "\n")
    keys, kf = read_keys(argparse.Namespace(psk_file=str(legacy)), Stats())
    assert keys == KeySet(K1) and kf is not None and kf.path == legacy
    ring = write_key_file(tmp_path / "ring", KeySet(K2, previous=K1))
    assert read_keys(argparse.Namespace(psk_file=str(ring)), Stats())[0] == KeySet(K2, None, K1)
    monkeypatch.setenv("TENCRYPT_PROJECT_PSK", base64.b64encode(K3).decode())
    assert read_keys(argparse.Namespace(psk_file=None), Stats()) == (KeySet(K3), None)
    monkeypatch.delenv("TENCRYPT_PROJECT_PSK")
    with pytest.raises(UsageError, match="no project key"):
        read_keys(argparse.Namespace(psk_file=None), Stats())


def test_describe_names_keys_by_fingerprint():
    assert describe(KeySet(K2, previous=K1)) == (
        f"current {fingerprint(K2)}, previous {fingerprint(K1)}"
    )


def test_the_loaded_ring_is_recorded_by_fingerprint_only(tmp_path):
    from tencrypt.linux.keyfile import LOADED_FILE, read_loaded, write_loaded

    assert read_loaded(tmp_path) is None
    write_loaded(tmp_path, KeySet(K2, previous=K1))
    assert read_loaded(tmp_path) == f"current={fingerprint(K2)},previous={fingerprint(K1)}"
    text = (tmp_path / LOADED_FILE).read_text()
    assert base64.b64encode(K2).decode()[:8] not in text and K2.hex()[:8] not in text
    write_loaded(tmp_path / "missing", KeySet(K1))  # logged, not raised
    (tmp_path / LOADED_FILE).write_text("{not json")
    assert read_loaded(tmp_path) is None
