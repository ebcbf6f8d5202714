import pytest

from tencrypt.core.exposition import render_prometheus
from tencrypt.core.stats import NODESYNC_COUNTERS, PROXY_COUNTERS, Counter, DropReason, Stats, merge


def test_counters_and_drops_render_as_prometheus_text():
    s = Stats()
    s.inc(Counter.PACKETS_SEALED, 3)
    s.drop(DropReason.REPLAY)
    s.drop(DropReason.REPLAY)
    text = render_prometheus(s, {"sessions": 2, "flow_table_entries": 0.5})
    assert "tencrypt_packets_sealed_total 3\n" in text
    assert 'tencrypt_drops_total{reason="replay"} 2\n' in text
    assert 'tencrypt_drops_total{reason="bad_tag"} 0\n' in text
    assert "tencrypt_sessions 2\n" in text
    assert "tencrypt_flow_table_entries 0.5\n" in text


def test_merge_adds_up():
    a, b = Stats(), Stats()
    a.inc(Counter.REKEYS)
    b.inc(Counter.REKEYS, 4)
    b.drop(DropReason.SHORT)
    m = merge([a, b])
    assert m.get("rekeys") == 5
    assert m.dropped(DropReason.SHORT) == 1 and m.dropped(DropReason.REPLAY) == 0


def test_counting_an_undeclared_counter_or_reason_fails_loudly():
    s = Stats()
    with pytest.raises(AssertionError, match="undeclared counter 'packets_sealed'"):
        s.inc("packets_sealed")  # type: ignore[arg-type]  # a str, not Counter.PACKETS_SEALED
    with pytest.raises(AssertionError, match="undeclared drop reason 'replay'"):
        s.drop("replay")  # type: ignore[arg-type]
    assert s.counters == {} and s.drops == {}


def test_every_counter_has_a_help_sentence_and_one_owner():
    for counter in Counter:
        assert counter.help.endswith(".") and counter.help[0].isupper(), counter
        assert counter.help != counter.value
    owned = set(PROXY_COUNTERS) | set(NODESYNC_COUNTERS)
    assert not set(PROXY_COUNTERS) & set(NODESYNC_COUNTERS)
    assert {c for c in Counter if c not in owned} == {c for c in Counter if c.startswith("agent_")}
