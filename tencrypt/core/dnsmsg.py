"""DNS messages through the proxy: query-ID re-mapping, deadlines, and the errors we answer.

Rules:
1. A client's query is forwarded byte for byte except its ID, which is replaced by a fresh
   random 16-bit ID that no in-flight query holds (RFC 5452 §9.2: unpredictable IDs), so any
   number of clients, each choosing its own IDs, never receive each other's answers.
2. An upstream answer is matched on its ID *and* its question (name case-insensitively, type,
   class; RFC 5452 §9.1). The client gets the upstream's bytes with only its own ID restored.
   An error answer without a question section (RFC 1035 §4.1.1 allows it for FORMERR and the
   like) is matched on the ID alone.
3. A query that is not a well-formed message with exactly one question is answered FORMERR
   (RFC 1035 §4.1.1) when its 12-byte header is readable and it is a query, else dropped; a
   message with QR=1 sent to us is never answered (no reflection loops).
4. A query still unanswered at its deadline is answered SERVFAIL (RFC 1035 §4.1.1), built from
   the client's own ID, opcode, RD bit and question.
5. The table is bounded: past ``max_pending`` in-flight queries a new one is answered
   SERVFAIL at once and counted (DropReason.DNS_TOO_MANY_PENDING).
6. Nothing here raises on bad input: each bad message is a counted drop (core.stats).
7. With a ``cache`` (core/dnscache.py), a client's query (``on_query(..., cache=True)``) is
   answered from it when it holds a live answer (CACHED: counted ``dns_cache_hits``, never
   forwarded), and the upstream's answers to client queries are offered to it.

Pure: ``now`` is passed in, randomness is injected (``rand16``), and the caller owns the sockets.
All deadlines are ``now + timeout`` with one timeout, so insertion order is deadline order and
the earliest deadline is the first entry.
"""

from __future__ import annotations

import enum
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dnslib import RCODE, DNSError, DNSHeader, DNSQuestion, DNSRecord
from dnslib.label import DNSBuffer

from tencrypt.core.stats import Counter, DropReason, Stats

HEADER_LEN = 12  # RFC 1035 §4.1.1
MAX_QUERY = 4096  # a one-question query with EDNS options is far below this
MAX_MESSAGE = 65535  # the 16-bit length prefix of DNS over TCP (RFC 1035 §4.2.2)
ID_TRIES = 64  # random draws before giving up; the table is at most half full (rule 5)

# What dnslib raises on malformed input (see parse_message).
PARSE_ERRORS = (DNSError, ValueError, IndexError, UnicodeError, struct.error)

QuestionKey = tuple[tuple[bytes, ...], int, int]


class QueryVerdict(enum.Enum):
    FORWARD = "forward"  # send ``data`` upstream
    REPLY = "reply"  # send ``data`` back to the client (an error we answer ourselves)
    CACHED = "cached"  # send ``data`` back to the client: a live answer from the cache
    DROP = "drop"  # counted, nothing to send


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    verdict: QueryVerdict
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Parsed:
    """The parts of a message the proxy reads: header, first question, and the whole record."""

    header: DNSHeader
    question: DNSQuestion | None
    record: DNSRecord | None  # None when only the header and question could be read


@dataclass(frozen=True, slots=True)
class Answered:
    """An upstream answer matched to its query: ``reply`` goes to ``client``."""

    client: object
    reply: bytes
    record: DNSRecord | None  # the parsed answer, for classification; None if unreadable


class Cache(Protocol):
    """What rule 7 needs of a cache: core/dnscache.py's ``AnswerCache``."""

    def lookup(
        self, query: Parsed, client_id: int, now: float, wire: bytes | None = None
    ) -> bytes | None: ...
    def lookup_wire(self, wire: bytes, now: float) -> bytes | None: ...
    def store(self, query: Parsed, answer: bytes, record: DNSRecord, now: float) -> bool: ...
    def expire(self, now: float) -> int: ...
    def next_expiry(self) -> float | None: ...
    def __len__(self) -> int: ...


@dataclass(slots=True)
class Pending:
    client: object  # opaque to this module: a socket address, or a lookup of the proxy's own
    client_id: int
    header: DNSHeader
    question: DNSQuestion
    deadline: float
    query: Parsed | None = None  # kept for the cache (rule 7): the client's parsed query


def question_key(q: DNSQuestion) -> QuestionKey:
    return tuple(p.lower() for p in q.qname.label), int(q.qtype), int(q.qclass)


def parse_message(data: bytes) -> Parsed | None:
    """Header, first question and full record of ``data``; None if not even the header reads.

    dnslib reports malformed input as DNSError; the few built-in errors its record parsers may
    let through on hostile input are caught too, so that a parse error never escapes into the
    proxy's loop (fuzzing in tests/unit/test_dnsmsg.py). Anything else is a bug and shows.
    """
    if len(data) < HEADER_LEN:
        return None
    try:
        buf = DNSBuffer(data)
        header = DNSHeader.parse(buf)
    except PARSE_ERRORS:
        return None
    try:
        question = DNSQuestion.parse(buf) if header.q else None
    except PARSE_ERRORS:
        return Parsed(header, None, None)
    try:
        record: DNSRecord | None = DNSRecord.parse(data)
    except PARSE_ERRORS:
        record = None
    return Parsed(header, question, record)


def build_error(header: DNSHeader, question: DNSQuestion | None, rcode: int) -> bytes:
    """An error answer (rule 3/4) echoing the query's ID, opcode, RD bit and question."""
    reply = DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, ra=1, rcode=rcode)
    record = DNSRecord(reply, q=question) if question else DNSRecord(reply)
    return bytes(record.pack())


def build_servfail(query: bytes) -> bytes | None:
    """SERVFAIL for a raw query (None if the query is unreadable)."""
    parsed = parse_message(query)
    if parsed is None:
        return None
    return build_error(parsed.header, parsed.question, RCODE.SERVFAIL)


def check_query(data: bytes, stats: Stats) -> tuple[Parsed | None, QueryOutcome | None]:
    """Rule 3: ``(parsed, None)`` for a query fit to forward, else ``(None, what to do)``."""
    if len(data) > MAX_QUERY:
        stats.drop(DropReason.DNS_TOO_BIG)
        return None, QueryOutcome(QueryVerdict.DROP)
    parsed = parse_message(data)
    if parsed is None or parsed.header.qr:
        stats.drop(DropReason.DNS_MALFORMED_QUERY)
        return None, QueryOutcome(QueryVerdict.DROP)
    if parsed.record is None or parsed.question is None or parsed.header.q != 1:
        stats.drop(DropReason.DNS_MALFORMED_QUERY)
        return None, QueryOutcome(
            QueryVerdict.REPLY, build_error(parsed.header, None, RCODE.FORMERR)
        )
    return parsed, None


def rewrite_id(data: bytes, new_id: int) -> bytes:
    return struct.pack("!H", new_id) + data[2:]


def _default_rand16() -> int:
    return secrets.randbits(16)


@dataclass(slots=True)
class PendingTable:
    """In-flight upstream queries by upstream ID. Owner of ID allocation (one per upstream)."""

    stats: Stats
    timeout: float = 2.0
    max_pending: int = 4096
    rand16: Callable[[], int] = _default_rand16
    cache: Cache | None = None
    _by_id: dict[int, Pending] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Rule 5 keeps the table at most half of the ID space, so a random draw finds a free
        # ID with probability >= 1/2 and ID_TRIES draws fail with probability <= 2**-64.
        self.max_pending = max(1, min(self.max_pending, 32768))

    def __len__(self) -> int:
        return len(self._by_id)

    def on_query(
        self, data: bytes, client: object, now: float, cache: bool = False
    ) -> QueryOutcome:
        """A client's query: forward it under a fresh ID, or answer it ourselves (rules 1,3,5),
        from the cache when ``cache`` (rule 7; a repeated query without parsing it again)."""
        store = self.cache if cache else None
        if store is not None and len(data) <= MAX_QUERY:
            hit = store.lookup_wire(data, now)
            if hit is not None:
                self.stats.inc(Counter.DNS_CACHE_HITS)
                return QueryOutcome(QueryVerdict.CACHED, hit)
        parsed, refused = check_query(data, self.stats)
        if parsed is None or parsed.question is None:
            return refused or QueryOutcome(QueryVerdict.DROP)
        if store is not None:
            hit = store.lookup(parsed, parsed.header.id, now, data)
            if hit is not None:
                self.stats.inc(Counter.DNS_CACHE_HITS)
                return QueryOutcome(QueryVerdict.CACHED, hit)
        upstream_id = self._free_id()
        if upstream_id is None:
            self.stats.drop(DropReason.DNS_TOO_MANY_PENDING)
            return QueryOutcome(
                QueryVerdict.REPLY, build_error(parsed.header, parsed.question, RCODE.SERVFAIL)
            )
        self._by_id[upstream_id] = Pending(
            client,
            parsed.header.id,
            parsed.header,
            parsed.question,
            now + self.timeout,
            parsed if store is not None else None,
        )
        self.stats.inc(Counter.DNS_QUERIES)
        return QueryOutcome(QueryVerdict.FORWARD, rewrite_id(data, upstream_id))

    def on_answer(self, data: bytes, now: float | None = None) -> Answered | None:
        """An upstream datagram: the client it answers and the bytes it gets (rule 2); with
        ``now``, an answer to a client's query is offered to the cache (rule 7)."""
        if len(data) > MAX_MESSAGE:
            self.stats.drop(DropReason.DNS_TOO_BIG)
            return None
        parsed = parse_message(data)
        if parsed is None or not parsed.header.qr:
            self.stats.drop(DropReason.DNS_MALFORMED_ANSWER)
            return None
        pending = self._by_id.get(parsed.header.id)
        if pending is None:
            self.stats.drop(DropReason.DNS_UNKNOWN_ID)
            return None
        if not self._same_question(pending, parsed):
            self.stats.drop(DropReason.DNS_WRONG_QUESTION)
            return None
        del self._by_id[parsed.header.id]
        if parsed.record is None:
            # The ID and question match but the rest is unreadable: the client gets an error
            # it can act on rather than bytes that we could not classify.
            self.stats.drop(DropReason.DNS_MALFORMED_ANSWER)
            return Answered(
                pending.client, build_error(pending.header, pending.question, RCODE.SERVFAIL), None
            )
        self.stats.inc(Counter.DNS_ANSWERS)
        if self.cache is not None and pending.query is not None and now is not None:
            self.cache.store(pending.query, data, parsed.record, now)
        return Answered(pending.client, rewrite_id(data, pending.client_id), parsed.record)

    def on_timer(self, now: float) -> list[tuple[object, bytes]]:
        """Rule 4: SERVFAIL, per client, for every query whose deadline has passed."""
        expired = []
        while self._by_id:
            upstream_id, pending = next(iter(self._by_id.items()))
            if pending.deadline > now:
                break
            del self._by_id[upstream_id]
            self.stats.drop(DropReason.DNS_UPSTREAM_TIMEOUT)
            expired.append(
                (pending.client, build_error(pending.header, pending.question, RCODE.SERVFAIL))
            )
        return expired

    def next_deadline(self) -> float | None:
        return next(iter(self._by_id.values())).deadline if self._by_id else None

    def in_flight(self) -> frozenset[int]:
        return frozenset(self._by_id)

    def _free_id(self) -> int | None:
        if len(self._by_id) >= self.max_pending:
            return None
        for _ in range(ID_TRIES):
            candidate = self.rand16() & 0xFFFF
            if candidate not in self._by_id:
                return candidate
        return None

    @staticmethod
    def _same_question(pending: Pending, parsed: Parsed) -> bool:
        if parsed.question is None:
            return bool(parsed.header.q == 0 and parsed.header.rcode != RCODE.NOERROR)
        return question_key(parsed.question) == question_key(pending.question)


def check_answer(query: Parsed, data: bytes) -> tuple[Parsed | None, bool]:
    """For a private (TCP) exchange: the parsed answer, and whether it answers ``query``."""
    parsed = parse_message(data)
    if parsed is None or not parsed.header.qr or parsed.header.id != query.header.id:
        return parsed, False
    if parsed.question is None or query.question is None:
        return parsed, (
            parsed.question is None
            and parsed.header.q == 0
            and parsed.header.rcode != RCODE.NOERROR
        )
    return parsed, question_key(parsed.question) == question_key(query.question)


__all__ = [
    "Answered",
    "Parsed",
    "Pending",
    "PendingTable",
    "QueryOutcome",
    "QueryVerdict",
    "build_error",
    "build_servfail",
    "check_answer",
    "check_query",
    "parse_message",
    "question_key",
    "rewrite_id",
]
