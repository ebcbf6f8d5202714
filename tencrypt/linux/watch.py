"""Watching the directories of the files a proxy reloads (the membership file, the key file)
with inotify, so that a change wakes the proxy at once and an idle proxy polls nothing.

Rules:
1. The DIRECTORY of each file is watched, not the file: the agent and the lab replace a file
   by renaming a temporary file over it (linux/files.py ``write_atomic``), and a Kubernetes
   Secret or ConfigMap volume swaps its ``..data`` symlink to a new directory; neither
   changes the inode the old name pointed at. Any event in a watched directory
   (IN_CREATE, IN_MOVED_TO, IN_MOVED_FROM, IN_CLOSE_WRITE, IN_DELETE, IN_ATTRIB, and the
   queue's overflow) calls ``on_event`` once per read of the queue; the caller then stats
   its files as it always did (linux/members.py, linux/keyfile.py): an event never carries
   content, and an event for another file of the directory costs one stat of each file.
2. inotify is a hint, never the only way: the caller keeps a slow safety poll
   (``SAFETY_POLL``) for file systems that report no events (network file systems, some
   overlay and FUSE mounts). Where inotify cannot be used (no such system call, the
   per-user watch or instance limit reached, a directory that does not exist at start, or
   one deleted later: IN_IGNORED), ``active`` is False and the caller polls every second,
   as before; that is logged once per proxy.
3. Linux only, through ctypes over the C library (no dependency): ``inotify_init1`` with
   IN_NONBLOCK|IN_CLOEXEC and ``inotify_add_watch``; the descriptor is read from the event
   loop (``loop.add_reader``) and drained to EAGAIN on each readiness.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("tencrypt.watch")

SAFETY_POLL = 60.0  # seconds between stats of a watched file when no event came

IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (
    IN_CREATE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_CLOSE_WRITE
    | IN_DELETE
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_HEADER = 16  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


class DirWatch:
    """inotify on the directories of ``files``; ``on_event()`` hears every change (rule 1).
    ``start`` registers with the running loop; ``close`` ends it. ``active`` (rule 2)."""

    def __init__(self, files: Iterable[Path], on_event: Callable[[], None]) -> None:
        self.dirs = sorted({Path(f).parent for f in files})
        self.on_event = on_event
        self.active = False
        self.events = 0  # reads of the queue that found events (tests, /status)
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Watch every directory; True: all are watched. False: the caller polls (logged)."""
        if not self.dirs:
            return False
        why = self._open()
        if why is not None:
            log.warning("%s: polling %s every second instead", why, _names(self.dirs))
            self.close()
            return False
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)
        self.active = True
        return True

    def _open(self) -> str | None:
        libc = _libc()
        if libc is None:
            return "no inotify in the C library"
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return f"inotify_init1: {os.strerror(ctypes.get_errno())}"
        self._fd = fd
        for d in self.dirs:
            if libc.inotify_add_watch(fd, os.fsencode(d), MASK) < 0:
                return f"inotify on {d}: {os.strerror(ctypes.get_errno())}"
        return None

    def _on_readable(self) -> None:
        lost = False
        seen = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("reading inotify events: %s: polling every second instead", exc)
                lost = True
                break
            if not data:
                break
            seen = True
            pos = 0
            while pos + _HEADER <= len(data):
                mask = int.from_bytes(data[pos + 4 : pos + 8], sys.byteorder)
                length = int.from_bytes(data[pos + 12 : pos + 16], sys.byteorder)
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    lost = True  # the directory itself went: its watch is gone (rule 2)
                pos += _HEADER + length
        if lost:
            log.warning("a watched directory of %s went away: polling every second", self.dirs)
            self.close()
        if seen:
            self.events += 1
        if seen or lost:
            self.on_event()

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None and self.active:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
        self._fd = -1
        self.active = False


def _names(dirs: Iterable[Path]) -> str:
    return ", ".join(str(d) for d in dirs)
