"""The DNS answer cache (core/dnscache.py) and its use by the pending table (core/dnsmsg.py
rule 7): TTL bounds, RFC 2308 negative answers, counted-down TTLs, keys, size caps."""

from __future__ import annotations

import struct

from dnslib import CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tencrypt.core.classify import MAX_TTL
from tencrypt.core.dnscache import AnswerCache, answer_lifetime, cache_key, ttl_offsets
from tencrypt.core.dnsmsg import Parsed, PendingTable, QueryVerdict, parse_message
from tencrypt.core.stats import Stats
from tests.unit.test_dnsmsg import NAME, answer_to, query


def negative(upstream_query: bytes, rcode=RCODE.NXDOMAIN, soa_ttl=300, minimum=60) -> bytes:
    reply = DNSRecord.parse(upstream_query).reply()
    reply.header.rcode = rcode
    reply.add_auth(
        RR(
            "cluster.local",
            QTYPE.SOA,
            ttl=soa_ttl,
            rdata=SOA(
                "ns.cluster.local", "hostmaster.cluster.local", (1, 7200, 1800, 86400, minimum)
            ),
        )
    )
    return reply.pack()


def table() -> PendingTable:
    ids = iter(range(1000, 60000, 7))
    return PendingTable(Stats(), rand16=lambda: next(ids), cache=AnswerCache(max_entries=4))


def ask(t: PendingTable, data: bytes, now: float, answer=None):
    """One client query at ``now``; if forwarded, the upstream answers with ``answer(q)``."""
    out = t.on_query(data, ("127.0.0.1", 5353), now, cache=True)
    if out.verdict is QueryVerdict.FORWARD and answer is not None:
        answered = t.on_answer(answer(out.data), now)
        assert answered is not None
        return out.verdict, answered.reply
    return out.verdict, out.data


def ttls(message: bytes) -> list[int]:
    return [rr.ttl for rr in DNSRecord.parse(message).rr]


def test_a_repeated_query_is_answered_from_the_cache_with_counted_down_ttls():
    t = table()
    verdict, first = ask(t, query(qid=1), 100.0, lambda q: answer_to(q, ttl=30))
    assert verdict is QueryVerdict.FORWARD and ttls(first) == [30]
    verdict, again = ask(t, query(qid=2), 112.7, None)
    assert verdict is QueryVerdict.CACHED
    assert DNSRecord.parse(again).header.id == 2 and ttls(again) == [18]
    assert again[2:] != first[2:] and DNSRecord.parse(again).rr[0].rdata == A("172.30.1.10")
    assert t.stats.get("dns_cache_hits") == 1 and t.stats.get("dns_queries") == 1


def test_never_served_at_or_past_the_ttl():
    t = table()
    ask(t, query(), 100.0, lambda q: answer_to(q, ttl=30))
    assert ask(t, query(), 129.99)[0] is QueryVerdict.CACHED
    assert ask(t, query(), 130.0)[0] is QueryVerdict.FORWARD
    assert len(t.cache) == 0


def test_the_smallest_ttl_of_answer_and_authority_bounds_the_entry():
    def two(q):
        reply = DNSRecord.parse(answer_to(q, ttl=300))
        reply.add_answer(RR(NAME, QTYPE.A, rdata=A("172.30.1.11"), ttl=7))
        return reply.pack()

    t = table()
    ask(t, query(), 0.0, two)
    assert ask(t, query(), 6.9)[0] is QueryVerdict.CACHED
    assert ask(t, query(), 7.0)[0] is QueryVerdict.FORWARD


def test_negative_answers_live_for_the_soa_minimum_rfc2308():
    t = table()
    ask(t, query(), 0.0, lambda q: negative(q, soa_ttl=300, minimum=60))
    verdict, data = ask(t, query(qid=9), 59.0)
    assert verdict is QueryVerdict.CACHED and DNSRecord.parse(data).header.rcode == RCODE.NXDOMAIN
    assert DNSRecord.parse(data).auth[0].ttl == 300 - 59
    assert ask(t, query(), 60.0)[0] is QueryVerdict.FORWARD
    t = table()  # the SOA's own TTL when it is the smaller one; NODATA alike
    ask(t, query(), 0.0, lambda q: negative(q, rcode=RCODE.NOERROR, soa_ttl=10, minimum=60))
    assert ask(t, query(), 9.0)[0] is QueryVerdict.CACHED
    assert ask(t, query(), 10.0)[0] is QueryVerdict.FORWARD


def test_what_is_never_kept():
    def truncated(q):
        r = DNSRecord.parse(answer_to(q))
        r.header.tc = 1
        return r.pack()

    cases = [
        lambda q: answer_to(q, rcode=RCODE.SERVFAIL, ip=None),
        lambda q: answer_to(q, ip=None, rcode=RCODE.NXDOMAIN),  # no SOA: no negative TTL
        lambda q: answer_to(q, ttl=0),
        truncated,
    ]
    for answer in cases:
        t = table()
        ask(t, query(), 0.0, answer)
        assert len(t.cache) == 0 and ask(t, query(), 0.5)[0] is QueryVerdict.FORWARD


def test_queries_that_may_get_different_answers_do_not_share_an_entry():
    t = table()
    ask(t, query(), 0.0, lambda q: answer_to(q))
    assert ask(t, query(rd=0), 1.0)[0] is QueryVerdict.FORWARD
    assert ask(t, query(qtype="AAAA"), 1.0)[0] is QueryVerdict.FORWARD
    assert ask(t, query(name=NAME.upper()), 1.0)[0] is QueryVerdict.CACHED  # case-insensitive
    q = DNSRecord.parse(query())
    q.add_ar(EDNS0(udp_len=1232, flags="do"))
    assert ask(t, q.pack(), 1.0)[0] is QueryVerdict.FORWARD


def test_an_answer_too_big_for_the_client_goes_upstream():
    def big(q):
        reply = DNSRecord.parse(answer_to(q))
        for i in range(40):
            reply.add_answer(RR(NAME, QTYPE.A, rdata=A(f"172.30.2.{i}"), ttl=30))
        return reply.pack()

    t = table()
    edns = DNSRecord.parse(query())
    edns.add_ar(EDNS0(udp_len=1232))
    ask(t, edns.pack(), 0.0, big)
    assert ask(t, edns.pack(), 1.0)[0] is QueryVerdict.CACHED
    t2 = table()
    ask(t2, query(), 0.0, big)  # kept, but a 512-byte client never gets it from us
    assert len(t2.cache) == 1 and ask(t2, query(), 1.0)[0] is QueryVerdict.FORWARD


def test_the_cache_is_capped_oldest_first():
    t = table()
    names = [f"n{i}.{NAME}" for i in range(6)]
    for n in names:
        ask(t, query(name=n), 0.0, lambda q: answer_to(q))
    assert len(t.cache) == 4
    assert ask(t, query(name=names[0]), 1.0)[0] is QueryVerdict.FORWARD
    assert ask(t, query(name=names[5]), 1.0)[0] is QueryVerdict.CACHED
    assert (
        AnswerCache().store(
            parse_message(query()), bytes(5000), DNSRecord.parse(answer_to(query())), 0.0
        )
        is False
    )


def test_own_lookups_neither_read_nor_fill_the_cache():
    t = table()
    out = t.on_query(query(), object(), 0.0)  # the proxy's own (PTR) lookup: cache=False
    t.on_answer(answer_to(out.data), 0.0)
    assert len(t.cache) == 0
    ask(t, query(), 0.0, lambda q: answer_to(q))
    assert t.on_query(query(), object(), 1.0).verdict is QueryVerdict.FORWARD


def test_expire_forgets_dead_entries():
    cache = AnswerCache()
    t = PendingTable(Stats(), cache=cache)
    ask(t, query(), 0.0, lambda q: answer_to(q, ttl=5))
    assert cache.expire(4.0) == 0 and cache.expire(5.0) == 1 and len(cache) == 0


def test_lifetime_and_offsets_of_a_real_answer():
    data = negative(query(), soa_ttl=50, minimum=90)
    assert answer_lifetime(DNSRecord.parse(data)) == 50
    offsets = ttl_offsets(data)
    assert offsets is not None and [ttl for _, ttl in offsets] == [50]
    assert struct.unpack_from("!I", data, offsets[0][0])[0] == 50


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_walking_garbage_never_raises(data):
    assert ttl_offsets(data) is None or isinstance(ttl_offsets(data), list)


class NoWireIndex(AnswerCache):
    """The cache without rule 7's shortcut: every query is parsed."""

    def lookup_wire(self, wire: bytes, now: float) -> bytes | None:
        return None


def test_a_repeated_query_is_served_from_its_bytes_without_parsing_it_again(monkeypatch):
    from tencrypt.core import dnsmsg

    t = table()
    ask(t, query(qid=1), 100.0, lambda q: answer_to(q, ttl=30))
    assert ask(t, query(qid=2), 101.0)[0] is QueryVerdict.CACHED  # parsed; its bytes indexed
    parses = []
    real = dnsmsg.parse_message
    monkeypatch.setattr(dnsmsg, "parse_message", lambda data: parses.append(data) or real(data))
    verdict, again = ask(t, query(qid=3), 105.2)
    assert verdict is QueryVerdict.CACHED and parses == []
    assert DNSRecord.parse(again).header.id == 3 and ttls(again) == [25]
    assert ask(t, query(qid=4, qtype="AAAA"), 105.2)[0] is QueryVerdict.FORWARD  # other bytes
    assert len(parses) == 1
    assert ask(t, query(qid=5), 130.0)[0] is QueryVerdict.FORWARD  # expired: asked again
    assert t.stats.get("dns_cache_hits") == 2


QUERIES = [
    query(),
    query(qtype="AAAA"),
    query(name=NAME.upper()),
    query(rd=0),
    (lambda q: (q.add_ar(EDNS0(udp_len=1232)), q.pack())[1])(DNSRecord.question(NAME)),
    (lambda q: (q.add_ar(EDNS0(udp_len=512, flags="do")), q.pack())[1])(DNSRecord.question(NAME)),
]


def big_answer(q: bytes) -> bytes:
    """An answer of about 700 bytes: over 512, under an EDNS size of 1232."""
    reply = DNSRecord.parse(answer_to(q, ttl=20))
    for i in range(40):
        reply.add_answer(RR(str(reply.q.qname), QTYPE.A, rdata=A(f"172.30.2.{i}"), ttl=20 + i))
    return reply.pack()


@settings(max_examples=150, deadline=None)
@example(  # an answer too big for the indexed query replaced its entry (same key, EDNS query)
    [
        (0, 1, 0.0, False),
        (0, 2, 1.0, False),
        (4, 3, 15.0, True),
        (4, 4, 15.0, True),
        (0, 5, 1.0, False),
    ]
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(QUERIES) - 1),
            st.integers(0, 0xFFFF),
            st.floats(0.0, 15.0),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_serving_from_bytes_gives_exactly_what_parsing_gives(steps):
    """Rule 7 as a differential: the same queries at the same times get the same verdicts,
    bytes and counters with and without the shortcut."""
    ids = [iter(range(1000, 60000, 7)) for _ in range(2)]
    tables = [
        PendingTable(Stats(), rand16=lambda i=i: next(ids[i]), cache=cache)
        for i, cache in enumerate((AnswerCache(max_entries=3), NoWireIndex(max_entries=3)))
    ]
    now = 0.0
    for which, qid, advance, big in steps:
        now += advance
        data = bytearray(QUERIES[which])
        struct.pack_into("!H", data, 0, qid)
        outcomes = [ask(t, bytes(data), now, big_answer if big else answer_to) for t in tables]
        assert outcomes[0] == outcomes[1]
    assert tables[0].stats == tables[1].stats


# ---- issue 22: the TTL cap, the question, the CD bit, counted evictions -----------------------


def test_a_forged_ttl_is_served_for_a_day_at_most():
    """Rule 2: TTL 2**31 - 1 (a forged answer's) is capped at the classification's MAX_TTL:
    served, with TTLs counted down from the cap, strictly before a day, then asked again."""
    t = table()
    verdict, first = ask(t, query(), 0.0, lambda q: answer_to(q, ttl=2**31 - 1))
    assert verdict is QueryVerdict.FORWARD
    verdict, again = ask(t, query(qid=7), 3600.0)
    assert verdict is QueryVerdict.CACHED and ttls(again) == [MAX_TTL - 3600]
    assert ask(t, query(), MAX_TTL - 0.5)[0] is QueryVerdict.CACHED
    assert ask(t, query(), float(MAX_TTL))[0] is QueryVerdict.FORWARD


def test_the_cap_is_the_proxys_classification_cap():
    cache = AnswerCache(max_ttl=100)
    t = PendingTable(Stats(), cache=cache)
    ask(t, query(), 0.0, lambda q: answer_to(q, ttl=5000))
    assert cache.expire(99.9) == 0 and cache.expire(100.0) == 1


def test_a_ttl_with_its_top_bit_set_is_zero_and_not_kept():
    """RFC 2181 §8: a TTL of 2**31 or more is read as 0."""
    t = table()
    ask(t, query(), 0.0, lambda q: answer_to(q, ttl=2**31))
    assert len(t.cache) == 0 and ask(t, query(), 1.0)[0] is QueryVerdict.FORWARD
    assert answer_lifetime(DNSRecord.parse(negative(query(), soa_ttl=2**32 - 1))) == 0


def test_an_answer_to_another_question_is_never_kept():
    """Rule 1: the cache compares the answer's question with the query's itself (the pending
    table does too, but the cache must not depend on its caller for it)."""
    cache = AnswerCache()
    asked = parse_message(query(name=f"a.{NAME}"))
    other = answer_to(query(name=f"b.{NAME}"))
    assert cache.store(asked, other, DNSRecord.parse(other), 0.0) is False
    aaaa = answer_to(query(qtype="AAAA"), ip=None)
    assert cache.store(parse_message(query()), aaaa, DNSRecord.parse(aaaa), 0.0) is False
    two = DNSRecord.parse(answer_to(query()))
    two.add_question(DNSRecord.question(f"b.{NAME}").q)
    assert (
        cache.store(parse_message(query()), two.pack(), DNSRecord.parse(two.pack()), 0.0) is False
    )
    assert len(cache) == 0
    same = answer_to(query())
    assert cache.store(parse_message(query()), same, DNSRecord.parse(same), 0.0) is True


def test_checking_disabled_is_part_of_the_key():
    """Rule 4: a CD=1 query may get what a validating resolver refuses a CD=0 one (RFC 4035
    §3.2.2): they never share an entry."""
    t = table()
    ask(t, query(), 0.0, lambda q: answer_to(q))
    cd = DNSRecord.parse(query())
    cd.header.cd = 1
    assert ask(t, cd.pack(), 1.0)[0] is QueryVerdict.FORWARD
    cd2 = DNSRecord.parse(query(qid=3))
    cd2.header.cd = 1
    ask(t, cd2.pack(), 2.0, lambda q: answer_to(q))
    assert len(t.cache) == 2


def test_evictions_from_a_full_cache_are_counted():
    stats = Stats()
    t = PendingTable(stats, cache=AnswerCache(max_entries=2, stats=stats))
    for i in range(5):
        ask(t, query(name=f"n{i}.{NAME}"), 0.0, lambda q: answer_to(q))
    assert len(t.cache) == 2 and stats.get("dns_cache_evictions") == 3
    # rule 7's index of query bytes is bounded alike: three spellings of two cached names
    for name in (f"n3.{NAME}", f"N3.{NAME}", f"n4.{NAME}"):
        assert ask(t, query(name=name), 1.0)[0] is QueryVerdict.CACHED
    assert len(t.cache._by_wire) == 2 and stats.get("dns_cache_evictions") == 4


# ---- rules the mutation run found unheld -------------------------------------------------------


def padded(q: bytes, size: int, ttl: int = 30) -> bytes:
    """An answer to ``q`` of exactly ``size`` bytes: A records, then a TXT record sized to fit
    (measured, not computed: name compression decides the overhead)."""
    from dnslib import TXT

    reply = DNSRecord.parse(answer_to(q, ttl=ttl))
    i = 0
    while size - len(reply.pack()) > 200:
        reply.add_answer(RR(NAME, QTYPE.A, rdata=A(f"172.30.3.{i}"), ttl=ttl))
        i += 1
    probe = DNSRecord.parse(reply.pack())
    probe.add_answer(RR(NAME, QTYPE.TXT, rdata=TXT(""), ttl=ttl))
    reply.add_answer(RR(NAME, QTYPE.TXT, rdata=TXT("x" * (size - len(probe.pack()))), ttl=ttl))
    data = reply.pack()
    assert len(data) == size, len(data)
    return data


def test_512_bytes_is_the_limit_without_edns():
    """Rule 4, RFC 1035 §4.2.1: a cached answer of 512 bytes is served to a client without
    EDNS, one of 513 is not."""
    for size, verdict in ((512, QueryVerdict.CACHED), (513, QueryVerdict.FORWARD)):
        t = table()
        ask(t, query(), 0.0, lambda q, size=size: padded(q, size))
        assert len(t.cache) == 1 and ask(t, query(), 1.0)[0] is verdict


def test_max_bytes_is_inclusive_and_store_says_what_it_did():
    q = parse_message(query())
    for size, kept in ((600, True), (601, False)):
        data = padded(query(), size)
        cache = AnswerCache(max_bytes=600)
        assert cache.store(q, data, DNSRecord.parse(data), 0.0) is kept
        assert len(cache) == int(kept)
    assert AnswerCache().max_entries == 1024 and AnswerCache().max_bytes == 4096  # README's


def test_refused_answers_are_reported_as_not_kept():
    q = parse_message(query())
    cache = AnswerCache()
    truncated = DNSRecord.parse(answer_to(query()))
    truncated.header.tc = 1
    servfail = answer_to(query(), ip=None, rcode=RCODE.SERVFAIL)
    zero = answer_to(query(), ttl=0)
    for data in (truncated.pack(), servfail, zero):
        assert cache.store(q, data, DNSRecord.parse(data), 0.0) is False
    assert len(cache) == 0


def test_a_ttl_of_one_second_is_kept_for_that_second():
    t = table()
    ask(t, query(), 0.0, lambda q: answer_to(q, ttl=1))
    assert ask(t, query(), 0.5)[0] is QueryVerdict.CACHED
    assert ask(t, query(), 1.0)[0] is QueryVerdict.FORWARD


def test_an_answer_stored_again_is_the_newest():
    """Rule 5, oldest stored goes first: a refreshed entry is not the oldest any more."""
    t = PendingTable(Stats(), rand16=iter(range(1000, 60000, 7)).__next__, cache=AnswerCache(2))
    a, b, c = (query(name=f"{n}.{NAME}") for n in "abc")
    ask(t, a, 0.0, lambda q: answer_to(q, ttl=5))
    ask(t, b, 0.0, lambda q: answer_to(q))
    ask(t, a, 10.0, lambda q: answer_to(q))  # expired: asked again and stored again
    ask(t, c, 10.0, lambda q: answer_to(q))  # full: b is the oldest now
    assert ask(t, a, 11.0)[0] is QueryVerdict.CACHED
    assert ask(t, b, 11.0)[0] is QueryVerdict.FORWARD


def test_the_index_of_query_bytes_forgets_a_gone_entry():
    """Rule 7: a query's bytes that point at an expired entry leave the index."""
    t = table()
    ask(t, query(), 0.0, lambda q: answer_to(q, ttl=5))
    ask(t, query(qid=2), 1.0)  # a hit: its bytes indexed
    assert len(t.cache._by_wire) == 1
    assert t.cache.lookup_wire(query(qid=3), 6.0) is None
    assert len(t.cache._by_wire) == 0


def test_ttls_of_additional_records_count_down_to_zero_not_below():
    """Rule 3: the lifetime comes from the answer and authority sections; a record in the
    additional section with a shorter TTL is served with 0 once its time is up, never a
    negative (wrapped) TTL."""

    def with_glue(q):
        reply = DNSRecord.parse(answer_to(q, ttl=60))
        reply.add_ar(RR("ns.cluster.local", QTYPE.A, rdata=A("10.0.0.53"), ttl=5))
        return reply.pack()

    t = table()
    ask(t, query(), 0.0, with_glue)
    verdict, data = ask(t, query(), 10.0)
    assert verdict is QueryVerdict.CACHED
    record = DNSRecord.parse(data)
    assert record.rr[0].ttl == 50 and record.ar[0].ttl == 0


def test_an_nxdomain_after_a_cname_lives_for_the_soa_minimum():
    """Rule 2, RFC 2308 §5: a negative answer is negative even when its answer section holds
    the CNAME chain that led to the missing name."""

    def cname_then_nxdomain(q):
        reply = DNSRecord.parse(negative(q, soa_ttl=300, minimum=60))
        reply.add_answer(RR(NAME, QTYPE.CNAME, rdata=CNAME(f"gone.{NAME}"), ttl=300))
        return reply.pack()

    t = table()
    ask(t, query(), 0.0, cname_then_nxdomain)
    assert ask(t, query(), 59.0)[0] is QueryVerdict.CACHED
    assert ask(t, query(), 60.0)[0] is QueryVerdict.FORWARD


def test_an_answer_with_an_opt_record_is_kept_and_its_flags_left_alone():
    """Rule 2: OPT's TTL field is the extended RCODE and flags (RFC 6891 §6.1.3), not a TTL:
    it is walked over, not counted down."""

    def edns_answer(q):
        reply = DNSRecord.parse(answer_to(q, ttl=30))
        reply.add_ar(EDNS0(udp_len=1232, flags="do"))
        return reply.pack()

    t = table()
    edns = DNSRecord.parse(query())
    edns.add_ar(EDNS0(udp_len=1232, flags="do"))
    ask(t, edns.pack(), 0.0, edns_answer)
    verdict, data = ask(t, edns.pack(), 10.0)
    assert verdict is QueryVerdict.CACHED
    record = DNSRecord.parse(data)
    assert record.rr[0].ttl == 20 and record.ar[0].ttl == 0x8000  # DO still set


def test_a_query_without_one_readable_question_has_no_key():
    assert cache_key(Parsed(DNSRecord.question(NAME).header, None, None)) is None
    two = DNSRecord.question(NAME)
    two.add_question(DNSRecord.question(f"b.{NAME}").q)
    assert cache_key(parse_message(two.pack())) is None
    assert AnswerCache().lookup(Parsed(two.header, None, None), 1, 0.0) is None


def test_names_that_break_rfc_1035_do_not_walk():
    """RFC 1035 §2.3.4 and §4.1.4: a label type 0x40/0x80 is not a length, and a name has at
    most 127 labels; either makes the message unwalkable (None), even when the bytes would
    otherwise line up to its end."""
    header = struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0)
    reserved = header + b"\x40" + bytes(64) + b"\x00" + struct.pack("!HH", 1, 1)
    assert ttl_offsets(reserved) is None
    long_name = header + b"\x01a" * 128 + b"\x00" + struct.pack("!HH", 1, 1)
    assert ttl_offsets(long_name) is None
    fits = header + b"\x01a" * 127 + b"\x00" + struct.pack("!HH", 1, 1)
    assert ttl_offsets(fits) == []


def test_an_answer_stored_again_while_held_replaces_it_and_becomes_the_newest():
    """Rule 5: two identical queries in flight get two answers; the second replaces the
    first (evicting nothing else, even when the cache is full) and counts as stored now."""
    t = PendingTable(Stats(), rand16=iter(range(1000, 60000, 7)).__next__, cache=AnswerCache(2))
    a, b, c = (query(name=f"{n}.{NAME}") for n in "abc")
    first = t.on_query(b, "client1", 0.0, cache=True)
    second = t.on_query(b, "client2", 0.0, cache=True)
    assert first.verdict is second.verdict is QueryVerdict.FORWARD  # nothing cached yet
    ask(t, a, 0.0, lambda q: answer_to(q))
    t.on_answer(answer_to(first.data), 1.0)  # full: a, b
    t.on_answer(answer_to(second.data), 2.0)  # b again: replaces b, a stays
    assert len(t.cache) == 2 and ask(t, a, 3.0)[0] is QueryVerdict.CACHED
    ask(t, c, 4.0, lambda q: answer_to(q))  # full: the oldest stored, a, goes
    assert ask(t, b, 5.0)[0] is QueryVerdict.CACHED
    assert ask(t, a, 5.0)[0] is QueryVerdict.FORWARD


def test_names_compressed_to_an_offset_past_255_walk():
    """RFC 1035 §4.1.4: a pointer is 14 bits; in an answer longer than 256 bytes a name's
    pointer starts 0xC1 or more, and the answer is kept like any other."""

    def long(q):
        reply = DNSRecord.parse(answer_to(q, ttl=30))
        for i in range(20):
            reply.add_answer(RR(NAME, QTYPE.A, rdata=A(f"172.30.4.{i}"), ttl=30))
        for i in range(2):  # first at offset > 256, then compressed to it
            reply.add_answer(RR(f"late.{NAME}", QTYPE.A, rdata=A(f"172.30.5.{i}"), ttl=40))
        data = reply.pack()
        assert b"\xc1" in data[256:]
        return data

    t = table()
    edns = DNSRecord.parse(query())
    edns.add_ar(EDNS0(udp_len=1232))
    ask(t, edns.pack(), 0.0, long)
    verdict, data = ask(t, edns.pack(), 5.0)
    assert verdict is QueryVerdict.CACHED and ttls(data)[-1] == 35
