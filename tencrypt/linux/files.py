"""Files other processes read while we replace them: the membership file, key rings, the
record of the ring a proxy loaded.

``write_atomic`` writes a temporary file beside the target — created exclusively with the
given mode, never through a link, flushed to disk — and renames it over the target: a reader
sees the old file or the new one, never half of one, and a key file is never readable by
anyone else, not even for an instant. The directory is created (0700) when missing.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str, mode: int = 0o644) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
