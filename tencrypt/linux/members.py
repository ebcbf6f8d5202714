"""The membership file on disk (core.membership): written atomically by the agent or the lab,
watched by the proxy.

Rules (core.membership rules 2-3):
- ``write_members`` writes a temporary file beside the target and renames it over: a reader
  sees the old file or the new one, never half of one.
- ``MembersFile.poll`` costs one ``stat`` when nothing changed (the proxy calls it when
  inotify reports a change in the file's directory, and as a safety poll once a minute, or
  every second where inotify cannot be used: linux/watch.py, control.py rule 4d); a changed
  file is read and parsed; a file that does not parse, or whose generation
  is older than the one loaded, is refused with one log line per change and the last good
  membership kept. A file that does not parse while none was ever loaded leaves ``broken``
  set (the reason): the proxy then refuses what it cannot classify instead of falling back to
  standalone's weaker evidence (DESIGN §1a; control.py). A file that disappears keeps the last membership too: only a new file may
  remove members (a deleted file is an operator's or a crash's doing, not the cluster API's).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tencrypt.core.membership import (
    FILE_NAME,
    Members,
    MembershipError,
    parse_members,
    render_members,
)
from tencrypt.linux.files import write_atomic

log = logging.getLogger("tencrypt.members")


def write_members(directory: str | Path, members: Members) -> Path:
    """Replace ``directory/members.json`` atomically; returns its path."""
    return write_atomic(Path(directory) / FILE_NAME, render_members(members))


class MembersFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.loaded: Members | None = None
        self.broken: str | None = None  # why the file was refused, while none was ever loaded
        self._seen: tuple[int, int, int] | None = None  # inode, size, mtime_ns

    def poll(self) -> Members | None:
        """A new membership to apply, or None (unchanged, missing or refused)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot stat %s: %s", self.path, exc)
            return None
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            members = parse_members(self.path.read_bytes())
        except (OSError, MembershipError) as exc:
            if self.loaded is None:
                self.broken = str(exc)
                log.error(
                    "membership file %s refused (%s) and none was ever loaded: strict mode "
                    "refuses every address of the Service CIDR and the pod network that is "
                    "not known to be the project's, until a good file comes",
                    self.path,
                    exc,
                )
            else:
                log.error(
                    "membership file %s refused (%s): keeping the last good membership "
                    "(generation %d)",
                    self.path,
                    exc,
                    self.loaded.generation,
                )
            return None
        self.broken = None
        if self.loaded is not None and members.generation < self.loaded.generation:
            log.error(
                "membership file %s has generation %d, older than the loaded %d: ignored",
                self.path,
                members.generation,
                self.loaded.generation,
            )
            return None
        self.loaded = members
        return members
