from tencrypt.core.stats import DropReason, Stats, merge, render_prometheus


def test_counters_and_drops_render_as_prometheus_text():
    s = Stats()
    s.inc("packets_sealed", 3)
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
    a.inc("x")
    b.inc("x", 4)
    b.drop(DropReason.SHORT)
    m = merge([a, b])
    assert (
        m.get("x") == 5 and m.dropped(DropReason.SHORT) == 1 and m.dropped(DropReason.REPLAY) == 0
    )
