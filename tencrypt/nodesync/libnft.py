"""nft transactions through libnftables in this process: what ``nft -f -`` does, without a
process per transaction.

Why: on this kind of node one ``nft -f`` run costs ~3 ms to start, and ~13 ms more at its
exit whenever its transaction deleted something (the kernel's release of its netlink socket:
measured with strace on Linux 6.18, nft 1.0.6, in an empty namespace as at 10,000 Services)
— that is every changed endpoint. A context kept for the life of the applier pays neither:
the transaction has returned when the kernel acknowledged the commit.

Rules:
- ``Library.open(netns)`` loads ``libnftables.so.1`` (installed with nft) with ctypes and
  makes one context; ``None`` if the library cannot be loaded or used, and the caller runs
  ``nft -f`` instead. With ``netns``, the context is made and every command is run with this
  thread inside that namespace (``linux.netns.entered``), so its netlink socket — made now
  or reopened later by the library — is always the namespace's.
- ``run(text)``: one transaction, atomically, as ``nft -f``; a refused one is a
  ``SetupError`` with nft's own message, and changes nothing.
- One owner (the syncer's thread); not for concurrent use.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

from tencrypt.errors import SetupError
from tencrypt.linux import netns as nsutil

log = logging.getLogger(__name__)

SONAME = "libnftables.so.1"


class Library:
    def __init__(self, lib: ctypes.CDLL, ctx: int, netns: str | None) -> None:
        self._lib, self._ctx, self.netns = lib, ctx, netns

    @classmethod
    def open(cls, netns: str | None = None) -> Library | None:
        try:
            lib = ctypes.CDLL(SONAME, use_errno=True)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            with _inside(netns):
                ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        except (OSError, AttributeError) as exc:
            log.info("libnftables not usable (%s): running nft -f per transaction", exc)
            return None
        if not ctx:
            return None
        lib.nft_ctx_buffer_output(ctx)  # nothing of nft's goes to our stdout/stderr
        lib.nft_ctx_buffer_error(ctx)
        return cls(lib, ctx, netns)

    def run(self, text: str) -> None:
        """One ``nft -f`` transaction; SetupError (nft's message) if it is refused."""
        with _inside(self.netns):
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        self._lib.nft_ctx_get_output_buffer(self._ctx)  # drained: it would only grow
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise SetupError(f"nft refused the transaction:\n{error.strip()[-2000:]}")

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = 0


@contextlib.contextmanager
def _inside(netns: str | None) -> Iterator[None]:
    if netns is None:
        yield
    else:
        with nsutil.entered(netns):
            yield
