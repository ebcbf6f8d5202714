"""RateLimitedLog: one line per key per interval, and a count of what it held back."""

import logging

from tencrypt.logutil import RateLimitedLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_one_line_per_key_per_interval_with_suppressed_count(caplog):
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.rl"), per_key_interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        assert rl.warn("bad", "bad query from %s", "a")
        for i in range(500):
            clock.now = i * 0.01
            assert not rl.warn("bad", "bad query from %s", "b")
        assert rl.warn("other", "another reason")  # keys are independent
        assert rl.suppressed("bad") == 500
        clock.now = 10.0
        assert rl.warn("bad", "bad query from %s", "c")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad query from a",
        "another reason",
        "bad query from c (500 similar messages suppressed)",
    ]
    assert rl.suppressed("bad") == 0


def test_keys_are_bounded_and_disabled_levels_cost_nothing(caplog):
    clock = Clock()
    logger = logging.getLogger("t.rl2")
    rl = RateLimitedLog(logger, max_keys=8, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.rl2"):
        for i in range(100):
            rl.warn(i, "key %d", i)
        assert len(rl._keys) == 8
        assert not rl.info("quiet", "below the level")
    assert len(caplog.records) == 100
    assert "quiet" not in rl._keys
