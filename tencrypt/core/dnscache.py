"""Answers the DNS proxy may give again without asking upstream: a cache bounded by TTLs.

Rules:
1. Only a complete answer to a one-question query is kept: QR set, TC clear, RCODE NOERROR or
   NXDOMAIN, and its question the query's (name case-insensitively, type, class).
2. Lifetime (RFC 1035 §3.2.1, RFC 2181 §8): a positive answer (NOERROR with answer records)
   lives for the smallest TTL among its answer and authority records; a negative answer
   (NXDOMAIN, or NOERROR without answers: NODATA) for min(SOA TTL, SOA MINIMUM) of the SOA in
   its authority section (RFC 2308 §5) and is not kept without one. A TTL with its top bit
   set counts as 0 (RFC 2181 §8), and every lifetime is capped at ``max_ttl``, the
   classification's own cap (core/classify.py ``MAX_TTL``, a day; the proxy passes its
   table's): a forged answer with TTL 2**31 - 1 is served for a day at most, never past the
   classification it made. A lifetime of 0 is not kept. The OPT pseudo-record (EDNS, RFC
   6891) is not a record: its TTL field is flags.
3. An entry is served strictly before ``stored + lifetime``, never at or after; each record's
   TTL in the served bytes is its own, capped at ``max_ttl`` like the lifetime, decreased by
   the whole seconds elapsed (RFC 1035 §7.3: the TTL counts down in a cache), so no client
   keeps an answer past the entry's deadline.
4. The key is the question with the query's opcode, RD, CD and DNSSEC-OK bits: queries that may
   get different answers never share one. A cached answer larger than what the client can
   take over UDP (512 bytes, or its EDNS payload size) is not served: the query goes upstream.
5. Bounded: at most ``max_entries`` entries (the oldest stored goes first, counted:
   ``dns_cache_evictions``) of at most ``max_bytes`` bytes each.
6. Serving from the cache teaches the classification nothing: the original answer was
   classified when it arrived, with its own TTLs, and the cache never outlives them.
7. A query whose bytes after its ID equal those of a query already served from the cache is
   served again without being parsed (``lookup_wire``): those bytes alone decide the parse,
   the key (rule 4) and the UDP limit, so the answer is the one ``lookup`` would give. The
   index of such bytes is bounded like the entries (its oldest goes first, counted alike)
   and drops what points at a gone entry.

Pure: ``now`` (monotonic seconds) is an argument. Nothing raises on bad input: a message that
cannot be walked is simply not kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, DNSRecord

from tencrypt.core.classify import MAX_TTL, ttl_seconds
from tencrypt.core.dnsmsg import Parsed, question_key
from tencrypt.core.stats import Counter, Stats

CacheKey = tuple[object, ...]
_OPT = 41  # RFC 6891
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_MAX_UDP_NO_EDNS = 512  # RFC 1035 §4.2.1


@dataclass(slots=True)
class Entry:
    answer: bytearray  # the upstream's bytes (its ID in the first two)
    ttl_offsets: list[tuple[int, int]]  # (offset of a record's TTL, its original value)
    stored: float
    expires: float


@dataclass(slots=True)
class AnswerCache:
    """See the module rules."""

    max_entries: int = 1024
    max_bytes: int = 4096
    max_ttl: int = MAX_TTL  # rule 2
    stats: Stats | None = None  # rule 5's evictions (none: not counted)
    _entries: dict[CacheKey, Entry] = field(default_factory=dict)
    _by_wire: dict[bytes, tuple[CacheKey, int]] = field(default_factory=dict)  # rule 7

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, query: Parsed, client_id: int, now: float, wire: bytes | None = None
    ) -> bytes | None:
        """The cached answer for ``query`` with ``client_id`` and counted-down TTLs, or None.
        ``wire``, the query's bytes, is remembered on a hit for ``lookup_wire`` (rule 7)."""
        key = cache_key(query)
        if key is None:
            return None
        limit = udp_limit(query)
        answer = self._serve(key, limit, client_id, now)
        if answer is not None and wire is not None:
            rest = bytes(wire[2:])
            while rest not in self._by_wire and len(self._by_wire) >= self.max_entries:
                del self._by_wire[next(iter(self._by_wire))]
                self._evicted()
            self._by_wire[rest] = (key, limit)
        return answer

    def lookup_wire(self, wire: bytes, now: float) -> bytes | None:
        """Rule 7: the answer for a query seen before byte for byte but its ID, or None."""
        rest = bytes(wire[2:])
        known = self._by_wire.get(rest)
        if known is None:
            return None
        key, limit = known
        answer = self._serve(key, limit, _U16.unpack_from(wire)[0], now)
        if answer is None and key not in self._entries:
            del self._by_wire[rest]
        return answer

    def _serve(self, key: CacheKey, limit: int, client_id: int, now: float) -> bytes | None:
        """Rules 3 and 4: the entry under ``key`` as the client may get it, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires or now < entry.stored:
            del self._entries[key]
            return None
        if len(entry.answer) > limit:
            return None
        out = bytearray(entry.answer)
        _U16.pack_into(out, 0, client_id)
        elapsed = int(now - entry.stored)
        for offset, ttl in entry.ttl_offsets:
            _U32.pack_into(out, offset, max(0, ttl - elapsed))
        return bytes(out)

    def store(self, query: Parsed, answer: bytes, record: DNSRecord, now: float) -> bool:
        """Keep ``answer`` (rules 1, 2, 5); True when kept."""
        key = cache_key(query)
        if key is None or len(answer) > self.max_bytes or query.question is None:
            return False
        header = record.header
        if not header.qr or header.tc or header.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            return False
        if len(record.questions) != 1 or question_key(record.q) != question_key(query.question):
            return False
        lifetime = min(answer_lifetime(record), self.max_ttl)
        offsets = ttl_offsets(answer)
        if lifetime <= 0 or offsets is None:
            return False
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
            self._evicted()
        capped = [(at, min(ttl_seconds(ttl), self.max_ttl)) for at, ttl in offsets]
        self._entries[key] = Entry(bytearray(answer), capped, now, now + lifetime)
        return True

    def _evicted(self) -> None:
        if self.stats is not None:
            self.stats.inc(Counter.DNS_CACHE_EVICTIONS)

    def next_expiry(self) -> float | None:
        """When ``expire`` next has an entry to forget, or None (O(entries): the shell asks
        after a sweep, never per query). Memory only: rule 3 never serves an entry at or
        after its deadline, expired or not."""
        return min((e.expires for e in self._entries.values()), default=None)

    def expire(self, now: float) -> int:
        """Forget entries past their lifetime; how many went."""
        gone = [k for k, e in self._entries.items() if now >= e.expires]
        for k in gone:
            del self._entries[k]
        return len(gone)


def cache_key(query: Parsed) -> CacheKey | None:
    """Rule 4's key, or None for a query that is not cacheable (no single question)."""
    if query.question is None or query.record is None or query.header.q != 1:
        return None
    h = query.header
    do = any(rr.rtype == _OPT and rr.ttl & 0x8000 for rr in query.record.ar)
    return (question_key(query.question), h.opcode, h.rd, h.cd, do)


def udp_limit(query: Parsed) -> int:
    """The largest answer the client accepts over UDP (RFC 6891 §6.2.3, RFC 1035 §4.2.1)."""
    if query.record is not None:
        for rr in query.record.ar:
            if rr.rtype == _OPT:
                return max(_MAX_UDP_NO_EDNS, int(rr.rclass))
    return _MAX_UDP_NO_EDNS


def answer_lifetime(record: DNSRecord) -> int:
    """Rule 2: seconds the answer may be served, 0 when it must not be kept."""
    if record.header.rcode == RCODE.NOERROR and record.rr:
        ttls = [ttl_seconds(int(rr.ttl)) for rr in (*record.rr, *record.auth) if rr.rtype != _OPT]
        return max(0, min(ttls))
    for rr in record.auth:
        if rr.rtype == QTYPE.SOA:
            return max(0, min(ttl_seconds(int(rr.ttl)), ttl_seconds(int(rr.rdata.times[4]))))
    return 0


def ttl_offsets(message: bytes) -> list[tuple[int, int]] | None:
    """(offset, value) of the TTL field of every record but OPT, walking the wire format
    (RFC 1035 §4.1); None if the message does not walk to its end exactly."""
    try:
        qd, an, ns, ar = struct.unpack_from("!4H", message, 4)
        pos = 12
        for _ in range(qd):
            pos = _skip_name(message, pos) + 4
        out = []
        for _ in range(an + ns + ar):
            pos = _skip_name(message, pos)
            rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", message, pos)
            if rtype != _OPT:
                out.append((pos + 4, ttl))
            pos += 10 + rdlen
    except (struct.error, IndexError):
        return None
    return out if pos == len(message) else None


def _skip_name(message: bytes, pos: int) -> int:
    """The position after the (possibly compressed) name at ``pos``."""
    for _ in range(128):  # at most 127 labels in 255 bytes (RFC 1035 §2.3.4)
        length = message[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length & 0xC0:
            raise IndexError("reserved label type")
        pos += 1 + length
    raise IndexError("name too long")
