"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624), for core/packet.py
and core/batch.py (pure).

Rules:
1. ``checksum`` sums a whole region; ``csum_adjust`` applies RFC 1624 eqn. 3,
   HC' = ~(~HC + ~m + m'), for fields that changed. Eqn. 3 never yields the -0 that eqn. 2
   can, so an updated checksum is bit-identical to a full recomputation of a region whose
   checksum was right, and a wrong one stays wrong.
2. Sums are Python ints reduced mod 0xFFFF (2**16 == 1 mod 0xFFFF): a 32-bit IPv4 or 128-bit
   IPv6 address enters a sum whole, its words need not be split.
"""

from __future__ import annotations


def fold(total: int) -> int:
    """Ones' complement value of a non-negative sum of 16-bit words, in 0..0xFFFF.

    2**16 == 1 (mod 0xFFFF), so end-around carry is reduction mod 0xFFFF; a non-zero sum that
    reduces to 0 is ones' complement -0, written 0xFFFF, as the carry loop would leave it.
    """
    s = total % 0xFFFF
    return 0xFFFF if s == 0 and total else s


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of ``data`` read as big-endian 16-bit words (odd length zero-padded).

    The whole region is read as one integer: its residue mod 0xFFFF is the word sum (RFC 1071
    §2 (B)/(C)), computed in C instead of a Python loop over words.
    """
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    return fold(total)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum field value of ``data`` (plus a partial sum, e.g. pseudo-header)."""
    return ~fold(ones_sum(data) + initial) & 0xFFFF


def pseudo_sum(src: int, dst: int, proto: int, length: int) -> int:
    """Partial sum of the TCP/UDP pseudo-header (RFC 793 §3.1, RFC 768), or of IPv6's (RFC 8200
    §8.1) for 128-bit addresses: not reduced, but congruent mod 0xFFFF to the sum of its
    16-bit words (2**16 == 1 mod 0xFFFF), which is all a checksum reads of it."""
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + length


def csum_adjust(hc: int, delta: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + delta), where delta sums ``~m + m'`` of changed words.

    ``delta`` may be built from wider values: ``(old ^ 0xFFFFFFFF) + new`` for a 32-bit field is
    the same residue as its two 16-bit halves.
    """
    return ~fold((hc ^ 0xFFFF) + delta) & 0xFFFF


def csum_replace(hc: int, old: int, new: int, bits: int = 16) -> int:
    """Checksum after one aligned ``bits``-wide field (16 or 32) changed from ``old`` to ``new``."""
    return csum_adjust(hc, (old ^ ((1 << bits) - 1)) + new)
