"""bench.micro's sections run and measure what they claim: each raises if a benchmark packet
was dropped, so a run that returns figures moved every packet end to end."""

from __future__ import annotations

from bench import micro
from tencrypt import fastpath


def test_the_hop_section_delivers_every_packet_through_both_proxies(monkeypatch):
    monkeypatch.setattr(micro, "COLD_SAMPLES", 2)
    monkeypatch.setattr(micro, "IDLE_S", 0.001)
    got = micro.bench_hops(1, 5)
    backends = ["python"] + (["c"] if fastpath.compiled() is not None else [])
    assert len(got) == 4 * len(backends)
    for name in backends:
        assert {k for k in got if k.endswith(f"[{name}]")} == {
            f"out hop, hot [{name}]",
            f"in hop, hot [{name}]",
            f"out hop, after 1 ms idle [{name}]",
            f"in hop, after 1 ms idle [{name}]",
        }
    assert all(us > 0 for us in got.values())


def test_the_super_packet_section_covers_every_backend():
    got = micro.bench_super_packets(1, 1)
    names = ["one AEAD call per packet", "python"] + (
        ["c"] if fastpath.compiled() is not None else []
    )
    for name in names:
        assert f"send_batch x{micro.SEGMENTS} [{name}]" in got
        assert f"receive_batch x{micro.SEGMENTS} [{name}]" in got


def test_the_cluster_section_delivers_requests_and_replies_with_and_without_a_policy():
    got = micro.bench_cluster_hops(1, 5)
    assert set(got) == {
        f"{way} hop, hot, {mode}"
        for way in ("out", "in")
        for mode in ("cluster", "cluster + NetworkPolicy")
    }
    assert all(us > 0 for us in got.values())
