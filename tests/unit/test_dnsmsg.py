"""The pending-query table (core.dnsmsg): ID re-mapping, matching, deadlines, bad input."""

import random
import struct

from dnslib import QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.dnsmsg import (
    HEADER_LEN,
    MAX_QUERY,
    PendingTable,
    QueryVerdict,
    build_servfail,
    check_answer,
    parse_message,
)
from tencrypt.core.stats import DropReason, Stats

NAME = "web.myproject.svc.cluster.local"


def query(name=NAME, qtype="A", qid=0x1234, rd=1):
    q = DNSRecord.question(name, qtype)
    q.header.id, q.header.rd = qid, rd
    return q.pack()


def answer_to(upstream_query: bytes, ip="172.30.1.10", name=None, ttl=30, rcode=0):
    """What an upstream server would answer to the datagram we forwarded."""
    q = DNSRecord.parse(upstream_query)
    reply = q.reply()
    if name is not None:
        reply.questions[0].qname = name
    if ip:
        reply.add_answer(RR(str(reply.q.qname), QTYPE.A, rdata=A(ip), ttl=ttl))
    reply.header.rcode = rcode
    return reply.pack()


def ids(*values):
    """A rand16 that returns ``values`` in order (then repeats the last one)."""
    it = iter(values)
    last = [values[-1]]

    def draw():
        last[0] = next(it, last[0])
        return last[0]

    return draw


def test_forward_replaces_only_the_id_and_answer_restores_it_byte_for_byte():
    stats = Stats()
    t = PendingTable(stats, rand16=ids(0xBEEF))
    data = query(qid=0x1234)
    out = t.on_query(data, ("127.0.0.1", 5555), now=0)
    assert out.verdict is QueryVerdict.FORWARD
    assert out.data == b"\xbe\xef" + data[2:]
    upstream_answer = answer_to(out.data)
    got = t.on_answer(upstream_answer)
    assert got.client == ("127.0.0.1", 5555)
    assert got.reply == b"\x12\x34" + upstream_answer[2:]
    assert str(got.record.rr[0].rdata) == "172.30.1.10"
    assert len(t) == 0 and stats.get("dns_queries") == 1 and stats.get("dns_answers") == 1


def test_ids_never_collide_with_in_flight_ones():
    # The random source keeps proposing taken IDs first: each must be skipped.
    t = PendingTable(Stats(), rand16=ids(7, 7, 7, 8, 7, 8, 9))
    upstream_ids = []
    for client in range(3):
        out = t.on_query(query(qid=1), ("127.0.0.1", 1000 + client), now=0)
        upstream_ids.append(struct.unpack("!H", out.data[:2])[0])
    assert upstream_ids == [7, 8, 9]
    assert t.in_flight() == {7, 8, 9}


def test_many_clients_same_client_id_get_their_own_answers():
    rng = random.Random(4)
    t = PendingTable(Stats(), max_pending=5000, rand16=lambda: rng.getrandbits(16))
    forwarded = {}
    for n in range(2000):
        name = f"svc{n}.myproject.svc.cluster.local"
        out = t.on_query(query(name, qid=42), ("127.0.0.1", 10000 + n), now=0)
        forwarded[n] = out.data
    assert len(t.in_flight()) == 2000
    order = list(forwarded)
    rng.shuffle(order)
    for n in order:
        got = t.on_answer(answer_to(forwarded[n], ip=f"10.1.{n // 256}.{n % 256}"))
        assert got.client == ("127.0.0.1", 10000 + n)
        assert got.reply[:2] == b"\x00\x2a"
        assert str(got.record.rr[0].rdata) == f"10.1.{n // 256}.{n % 256}"
        assert str(got.record.q.qname) == f"svc{n}.myproject.svc.cluster.local."
    assert len(t) == 0


def test_answer_must_match_question_too():
    stats = Stats()
    t = PendingTable(stats, rand16=ids(100))
    out = t.on_query(query(), "client", now=0)
    spoof = answer_to(out.data, name="evil.project2.svc.cluster.local")
    assert t.on_answer(spoof) is None
    assert stats.dropped(DropReason.DNS_WRONG_QUESTION) == 1
    assert len(t) == 1  # still waiting for the real answer
    # The name compares case-insensitively (0x20 mixing, RFC 4343).
    assert t.on_answer(answer_to(out.data, name=NAME.upper())) is not None


def test_answers_to_unknown_ids_are_counted_and_dropped():
    stats = Stats()
    t = PendingTable(stats, rand16=ids(100))
    out = t.on_query(query(), "client", now=0)
    good = answer_to(out.data)
    assert t.on_answer(b"\x00\x65" + good[2:]) is None  # id 101: nobody asked
    assert stats.dropped(DropReason.DNS_UNKNOWN_ID) == 1
    assert t.on_answer(good) is not None
    assert t.on_answer(good) is None  # a duplicate: its query is answered already
    assert stats.dropped(DropReason.DNS_UNKNOWN_ID) == 2


def test_error_answer_without_question_matches_on_id():
    t = PendingTable(Stats(), rand16=ids(100))
    out = t.on_query(query(), "client", now=0)
    formerr = DNSRecord(DNSHeader(id=100, qr=1, rcode=RCODE.FORMERR)).pack()
    noerror = DNSRecord(DNSHeader(id=100, qr=1, rcode=RCODE.NOERROR)).pack()
    assert t.on_answer(noerror) is None  # NOERROR must carry the question
    got = t.on_answer(formerr)
    assert got.client == "client" and got.reply == b"\x12\x34" + formerr[2:]
    assert out.verdict is QueryVerdict.FORWARD


def test_timeout_answers_servfail_with_the_clients_id_and_question():
    stats = Stats()
    t = PendingTable(stats, timeout=2.0, rand16=ids(1, 2))
    t.on_query(query(qid=0xAAAA, rd=1), "c1", now=10.0)
    t.on_query(query("x.project2.svc.cluster.local", "AAAA", qid=0xBBBB, rd=0), "c2", now=11.0)
    assert t.next_deadline() == 12.0
    assert t.on_timer(11.99) == []
    [(client, data)] = t.on_timer(12.0)
    assert client == "c1"
    rec = DNSRecord.parse(data)
    assert rec.header.id == 0xAAAA and rec.header.qr == 1 and rec.header.rd == 1
    assert rec.header.rcode == RCODE.SERVFAIL
    assert rec.q == DNSQuestion(NAME, QTYPE.A)
    [(client, data)] = t.on_timer(100)
    rec = DNSRecord.parse(data)
    assert client == "c2" and rec.header.id == 0xBBBB and rec.header.rd == 0
    assert rec.q == DNSQuestion("x.project2.svc.cluster.local", QTYPE.AAAA)
    assert stats.dropped(DropReason.DNS_UPSTREAM_TIMEOUT) == 2
    assert t.next_deadline() is None and len(t) == 0


def test_late_answer_after_timeout_is_an_unknown_id():
    stats = Stats()
    t = PendingTable(stats, timeout=1.0, rand16=ids(5))
    out = t.on_query(query(), "c", now=0)
    t.on_timer(1.0)
    assert t.on_answer(answer_to(out.data)) is None
    assert stats.dropped(DropReason.DNS_UNKNOWN_ID) == 1


def test_full_table_answers_servfail_at_once():
    stats = Stats()
    rng = random.Random(1)
    t = PendingTable(stats, max_pending=3, rand16=lambda: rng.getrandbits(16))
    for i in range(3):
        assert t.on_query(query(qid=i), i, now=0).verdict is QueryVerdict.FORWARD
    out = t.on_query(query(qid=77), "late", now=0)
    assert out.verdict is QueryVerdict.REPLY
    rec = DNSRecord.parse(out.data)
    assert rec.header.id == 77 and rec.header.rcode == RCODE.SERVFAIL and rec.q.qname == NAME
    assert stats.dropped(DropReason.DNS_TOO_MANY_PENDING) == 1


def test_id_space_exhaustion_by_an_adversarial_random_source_is_bounded():
    stats = Stats()
    t = PendingTable(stats, rand16=ids(9))  # always the same ID
    assert t.on_query(query(), "a", now=0).verdict is QueryVerdict.FORWARD
    out = t.on_query(query(), "b", now=0)
    assert out.verdict is QueryVerdict.REPLY
    assert stats.dropped(DropReason.DNS_TOO_MANY_PENDING) == 1


def test_malformed_queries():
    stats = Stats()
    t = PendingTable(stats)
    # Shorter than a header, or a response sent to us: dropped without a word.
    assert t.on_query(b"\x01\x02\x03", "c", 0).verdict is QueryVerdict.DROP
    assert t.on_query(answer_to(query()), "c", 0).verdict is QueryVerdict.DROP
    # A readable header with a broken body, two questions, no question: FORMERR.
    two = DNSRecord.question(NAME)
    two.add_question(DNSQuestion("b.myproject.svc.cluster.local"))
    bad_bodies = [
        query(qid=9)[:-3],
        two.pack(),
        DNSRecord(DNSHeader(id=9)).pack(),
        query(qid=9)[:HEADER_LEN] + b"\xff" * 20,
    ]
    for data in bad_bodies:
        out = t.on_query(data, "c", 0)
        assert out.verdict is QueryVerdict.REPLY, data
        rec = DNSRecord.parse(out.data)
        assert rec.header.rcode == RCODE.FORMERR and rec.header.qr == 1
        assert rec.header.id == struct.unpack("!H", data[:2])[0]
    # Oversized.
    assert t.on_query(query() + b"\x00" * MAX_QUERY, "c", 0).verdict is QueryVerdict.DROP
    assert stats.dropped(DropReason.DNS_MALFORMED_QUERY) == 2 + len(bad_bodies)
    assert stats.dropped(DropReason.DNS_TOO_BIG) == 1
    assert len(t) == 0


def test_malformed_answers():
    stats = Stats()
    t = PendingTable(stats, rand16=ids(300))
    out = t.on_query(query(), "c", 0)
    good = answer_to(out.data)
    assert t.on_answer(b"\x01") is None
    assert t.on_answer(out.data) is None  # QR=0: a query, not an answer
    assert stats.dropped(DropReason.DNS_MALFORMED_ANSWER) == 2
    # Right ID and question but a body that does not parse: the client gets SERVFAIL.
    got = t.on_answer(good[:-2])
    rec = DNSRecord.parse(got.reply)
    assert got.record is None and rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 0x1234
    assert stats.dropped(DropReason.DNS_MALFORMED_ANSWER) == 3


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_no_input_escapes_as_an_exception(data, as_answer):
    t = PendingTable(Stats(), rand16=ids(0x4142))
    if as_answer:
        t.on_query(query(), "c", 0)
        t.on_answer(data)
        t.on_answer(b"\x41\x42" + data)
    else:
        out = t.on_query(data, "c", 0)
        assert out.verdict in QueryVerdict
    parse_message(data)
    build_servfail(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255), st.integers(1, 6))
def test_mutated_answers_never_raise(pos, byte, count):
    t = PendingTable(Stats(), rand16=ids(0x4142))
    out = t.on_query(query(), "c", 0)
    data = bytearray(answer_to(out.data))
    for k in range(count):
        data[(pos + 37 * k) % len(data)] = (byte + k) % 256
    t.on_answer(bytes(data))


def test_build_servfail_and_check_answer():
    q = query(qid=5)
    rec = DNSRecord.parse(build_servfail(q))
    assert rec.header.id == 5 and rec.header.rcode == RCODE.SERVFAIL and rec.q.qname == NAME
    assert build_servfail(b"xx") is None
    sent = parse_message(q)
    parsed, ok = check_answer(sent, answer_to(q))
    assert ok and str(parsed.record.rr[0].rdata) == "172.30.1.10"
    assert not check_answer(sent, answer_to(query(qid=6)))[1]
    assert not check_answer(sent, answer_to(q, name="other.example"))[1]
    assert not check_answer(sent, q)[1]
