"""Which backend runs the data path's loops: the compiled ``tencrypt._fastpath`` when it was
built (setup.py: optional) and not turned off, else the pure-Python ``core.fastpath`` — the
same API, the same bytes (tests/unit/test_fastpath.py holds them to that).

Environment, read once at start (``select``):
- ``TENCRYPT_FASTPATH=0``: the pure-Python backend even when the extension is there (to
  compare the two, or to rule the extension out);
- ``TENCRYPT_REQUIRE_FASTPATH=1``: a missing extension is an error, not a fallback (CI sets
  it, so the compiled path is the one tested). The two together are a contradiction: error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from tencrypt.core import fastpath as pure
from tencrypt.core.fastpath import Backend
from tencrypt.errors import UsageError

__all__ = ["Backend", "built", "compiled", "describe", "select"]


def compiled() -> Backend | None:
    """The extension module, or None when it was not built (or cannot load its libcrypto)."""
    try:
        from tencrypt import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    return cast(Backend, _fastpath)


def built() -> str:
    """``c`` when the extension is built, else ``python``: the build info of the processes
    that carry no data path (node-sync, the agent); a proxy says the backend it runs."""
    return "c" if compiled() is not None else "python"


def select(env: Mapping[str, str]) -> Backend:
    """The backend the environment asks for (module docstring)."""
    require = env.get("TENCRYPT_REQUIRE_FASTPATH", "") == "1"
    if env.get("TENCRYPT_FASTPATH", "") == "0":
        if require:
            raise UsageError("TENCRYPT_FASTPATH=0 and TENCRYPT_REQUIRE_FASTPATH=1 contradict")
        return cast(Backend, pure)
    backend = compiled()
    if backend is None:
        if require:
            raise UsageError(
                "TENCRYPT_REQUIRE_FASTPATH=1 but tencrypt._fastpath is not built "
                "(install gcc, python3-dev and libssl-dev, then reinstall)"
            )
        return cast(Backend, pure)
    return backend


def describe(backend: Backend) -> str:
    """For the start-up log line."""
    if backend.NAME == "c":
        return f"C (tencrypt._fastpath, {getattr(backend, 'OPENSSL', 'libcrypto')})"
    return "pure Python (tencrypt.core.fastpath)"
