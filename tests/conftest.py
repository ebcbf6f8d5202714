"""Test-wide settings: namespace tests are skipped (with a reason) without root."""

import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    reason = None
    if os.geteuid() != 0:
        reason = "needs root for network namespaces"
    elif not shutil.which("ip"):
        reason = "needs iproute2"
    for item in items:
        if "tests/netns/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.netns)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
