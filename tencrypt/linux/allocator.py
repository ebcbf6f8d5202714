"""glibc's allocator told to keep its heap between super-packets (``tune``, called once by
``tencrypt run`` before the first packet).

By default glibc gives the top of its heap back to the kernel as soon as more than 128 KiB of
it is free, and its mmap threshold moves with the sizes it has seen. The data path allocates
and frees a few 64 KiB buffers per super-packet (sealed runs, opened segments, coalesced
frames), so each one was faulted in page by page again: measured on the lab at 2.7 Gbit/s,
the receiving proxy took about 130,000 minor page faults a second and the sending one about
30,000; with the thresholds below, under 200 a second, and the same single-stream iperf3 went
from 2.6-2.7 to 3.6-3.9 Gbit/s (bench/results/latest.md has the committed figures).

The cost is memory that stays mapped after a burst: at most TRIM_BYTES of free heap top per
arena. Elsewhere than glibc (musl has no ``mallopt``) nothing changes and ``tune`` says so.
"""

from __future__ import annotations

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 8 << 20  # free heap kept before it is given back
MMAP_BYTES = 1 << 20  # allocations below this come from the heap, never their own mmap


def tune() -> str | None:
    """Set both thresholds; a note for the log, or None where there is no glibc mallopt."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return None
    if not (mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) and mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)):
        return None
    return f"heap kept up to {TRIM_BYTES >> 20} MiB free, mmap only above {MMAP_BYTES >> 20} MiB"
