"""linux/allocator.py: glibc's mallopt is found and takes both thresholds (Debian, like CI)."""

from __future__ import annotations

import platform

import pytest

from tencrypt.linux import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_both_thresholds():
    assert allocator.tune() == "heap kept up to 8 MiB free, mmap only above 1 MiB"
