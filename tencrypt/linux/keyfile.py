"""The project key file on disk (core.psk ``parse_key_file``): written atomically by the agent or
the lab, watched by the proxy, so that a key rotation never restarts a proxy.

Rules:
- ``write_key_file`` writes a 0600 temporary file beside the target (in a 0700 directory) and
  renames it over: a reader sees the old ring or the new one, never half of one, and no other
  user can read either.
- ``KeyFile.poll`` costs one ``stat`` when nothing changed (the proxy calls it when inotify
  reports a change in the file's directory, once a minute as a safety poll, or every second
  where inotify cannot be used: linux/watch.py, control.py rule 4d; ``force`` re-reads
  anyway, for SIGHUP). A changed file is read and parsed; one that does not
  parse is refused with one log line naming the file and what was wrong (never key
  material), counted as ``key_reload_refusals``, and the loaded ring kept. A file that
  disappears keeps the loaded ring too (an operator's or a crash's doing).
- A new ring is counted as ``key_reloads`` and returned; a rewrite with the same keys is not
  a change.
- The proxy states what it has loaded in ``LOADED_FILE`` in its setup state directory (the
  node's ``/run/tencrypt/netns-<inode>``, which the agent reads to report it; core.rotation
  rule 3): JSON ``{"ring": "current=ab12cd34,...", "at": UNIX}``, fingerprints only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from tencrypt.core.psk import KeySet, parse_key_file, parse_psk, render_key_file, ring_label
from tencrypt.core.stats import Counter, Stats
from tencrypt.errors import UsageError
from tencrypt.linux.files import write_atomic

log = logging.getLogger("tencrypt.keys")
LOADED_FILE = "keys-loaded.json"


def write_key_file(path: str | Path, keys: KeySet) -> Path:
    """Replace ``path`` with the ring form of ``keys``, atomically and mode 0600."""
    return write_atomic(path, render_key_file(keys), 0o600)


def write_loaded(directory: Path, keys: KeySet) -> None:
    """Record, atomically, which ring the proxy runs with (fingerprints only). A failure is
    logged, never raised: the proxy runs on; its agent reports it as not caught up."""
    try:
        write_atomic(
            directory / LOADED_FILE,
            json.dumps({"ring": ring_label(keys.fingerprints()), "at": time.time()}),
        )
    except OSError as exc:
        log.error("cannot record the loaded keys in %s: %s", directory, exc)


def read_loaded(directory: Path) -> str | None:
    """The ring label a proxy recorded in ``directory``, or None (none, or unreadable)."""
    try:
        ring = json.loads((directory / LOADED_FILE).read_text()).get("ring")
    except (OSError, ValueError, AttributeError):
        return None
    return ring if isinstance(ring, str) else None


def describe(keys: KeySet) -> str:
    """``current ab12cd34, next 9f00e1c2``: a ring by its fingerprints, for log lines."""
    return ", ".join(f"{role} {fp}" for role, fp in keys.fingerprints().items())


class KeyFile:
    """The key file a running proxy watches; see the module rules."""

    def __init__(self, path: Path, stats: Stats) -> None:
        self.path = path
        self.stats = stats
        self.loaded: KeySet | None = None
        self._seen: tuple[int, int, int] | None = None  # inode, size, mtime_ns

    def load(self) -> KeySet:
        """The ring at start: a file that cannot be read or parsed is a ``UsageError``."""
        try:
            self._seen = self._stat()
            text = self.path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --psk-file {self.path}: {exc.strerror}") from exc
        try:
            self.loaded = parse_key_file(text)
        except UsageError as exc:
            raise UsageError(f"--psk-file {self.path}: {exc}") from None
        return self.loaded

    def poll(self, force: bool = False) -> KeySet | None:
        """A new ring to apply, or None (unchanged, missing or refused)."""
        try:
            seen = self._stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot stat key file %s: %s", self.path, exc)
            return None
        if seen == self._seen and not force:
            return None
        self._seen = seen
        try:
            keys = parse_key_file(self.path.read_bytes())
        except (OSError, UsageError) as exc:
            self.stats.inc(Counter.KEY_RELOAD_REFUSALS)
            log.error(
                "key file %s refused (%s): keeping the loaded keys (%s)",
                self.path,
                exc,
                describe(self.loaded) if self.loaded else "none",
            )
            return None
        if keys == self.loaded:
            return None
        self.loaded = keys
        self.stats.inc(Counter.KEY_RELOADS)
        return keys

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns


def read_keys(args: argparse.Namespace, stats: Stats) -> tuple[KeySet, KeyFile | None]:
    """The project keys from --psk-file (one key, or a ring: core.psk.parse_key_file; watched
    for changes) or TENCRYPT_PROJECT_PSK (one key, fixed), never argv."""
    if args.psk_file:
        keyfile = KeyFile(Path(args.psk_file), stats)
        return keyfile.load(), keyfile
    env = os.environ.get("TENCRYPT_PROJECT_PSK")
    if not env:
        raise UsageError("no project key: pass --psk-file FILE or set TENCRYPT_PROJECT_PSK")
    return KeySet(parse_psk(env)), None
