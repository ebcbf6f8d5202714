"""What every Tencrypt process adds to its metrics: ``tencrypt_build_info`` and the ``process_*``
families, read from /proc/self at request time the way the official Prometheus client's process
collector reads them (no dependency: core/exposition.py writes the text). A /proc that cannot
be read leaves the families without samples, never fails the request."""

from __future__ import annotations

import os
import platform

import tencrypt
from tencrypt.core import exposition
from tencrypt.core.exposition import ProcessSample


def read_process(proc: str = "/proc") -> ProcessSample | None:
    try:
        with open(f"{proc}/self/stat") as f:
            stat = f.read()
        with open(f"{proc}/stat") as f:
            boot = exposition.parse_boot_time(f.read())
        with open(f"{proc}/self/limits") as f:
            max_fds = exposition.parse_max_fds(f.read())
        open_fds = len(os.listdir(f"{proc}/self/fd"))
        cpu, rss, vsize, start = exposition.parse_stat(
            stat, boot, os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        )
    except (OSError, ValueError, IndexError):
        return None
    return ProcessSample(cpu, rss, vsize, start, open_fds, max_fds)


def render_runtime(fastpath: str) -> str:
    """Build info (``fastpath``: ``c`` or ``python``, the data path's loops) and process."""
    return exposition.text(
        exposition.render_build_info(tencrypt.__version__, platform.python_version(), fastpath)
        + exposition.render_process(read_process())
    )
