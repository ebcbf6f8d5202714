"""The anti-replay window against a set-based model, including far jumps and very old counters."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.core.replay import WINDOW, ReplayWindow

MAX = 2**64 - 1


class Model:
    """Fresh = never accepted before and within WINDOW of the highest accepted counter."""

    def __init__(self):
        self.seen = set()
        self.top = -1

    def check(self, counter):
        return counter not in self.seen and self.top - counter < WINDOW

    def update(self, counter):
        self.seen.add(counter)
        self.top = max(self.top, counter)


def _steps():
    """Counters relative to the last one: in order, reordered, duplicated, far ahead, ancient."""
    return st.one_of(
        st.integers(-3, 3),
        st.integers(-WINDOW - 2, -WINDOW + 2),
        st.integers(-2 * WINDOW, 2 * WINDOW),
        st.integers(WINDOW - 2, WINDOW + 2),
        st.integers(0, 2**63),
        st.just(-(2**63)),
    )


@settings(max_examples=300)
@given(st.lists(st.tuples(_steps(), st.booleans()), max_size=120), st.integers(0, MAX))
def test_window_agrees_with_the_set_model(steps, start):
    window, model = ReplayWindow(), Model()
    counter = start
    for step, authenticated in steps:
        counter = min(max(counter + step, 0), MAX)
        fresh = window.check(counter)
        assert fresh == model.check(counter), (counter, model.top)
        # Mark only what "authenticated": a forged datagram must not move the window.
        if fresh and authenticated:
            window.update(counter)
            model.update(counter)
        assert len(window.ring) == 128 and all(0 <= w < 2**64 for w in window.ring)


@given(st.lists(st.integers(0, 3 * WINDOW), max_size=300))
def test_check_and_update_accepts_each_counter_once(counters):
    window, model = ReplayWindow(), Model()
    for counter in counters:
        expected = model.check(counter)
        if expected:
            model.update(counter)
        assert window.check_and_update(counter) == expected


def test_width_is_at_least_2048_and_exactly_window():
    assert WINDOW >= 2048
    window = ReplayWindow()
    window.update(10_000)
    assert window.check(10_000 - (WINDOW - 1))
    assert not window.check(10_000 - WINDOW)
    assert not window.check(10_000)


def test_full_reordering_inside_the_window_is_accepted():
    window = ReplayWindow()
    counters = list(range(WINDOW))
    counters.reverse()  # the newest first, then everything older
    assert all(window.check_and_update(c) for c in counters)
    assert not any(window.check(c) for c in counters)


def test_check_alone_marks_nothing():
    window = ReplayWindow()
    window.update(5)
    assert window.check(2**60) and window.check(4)
    assert window.check(4) and window.top == 5  # a forged "2**60" did not slide the window


def test_far_jump_forgets_the_past_without_a_huge_shift():
    window = ReplayWindow()
    for c in range(100):
        window.update(c)
    window.update(MAX)
    assert sum(bin(w).count("1") for w in window.ring) == 1
    assert not window.check(MAX) and not window.check(50) and window.check(MAX - 1)


def test_in_order_counters_clear_each_block_they_move_into_after_the_ring_went_round():
    """RFC 6479: the ring holds 128 blocks = 8,192 counters. Counting in order, the window
    moves one block at a time, and the block it moves into was last used 8,192 counters
    ago: its old bits must go. (The random steps of the model test never get that far in
    order.) Counter 8195 is fresh after 0..8191 and 8200, whose bits share ring slot 0."""
    window = ReplayWindow()
    for c in range(128 * 64):
        assert window.check_and_update(c)
    window.update(128 * 64 + 8)  # into block 128: ring slot 0, last used by counters 0..63
    assert window.check(128 * 64 + 3) and window.check(128 * 64 + 63)
    assert not window.check(128 * 64 + 8)
    model = Model()
    for c in [*range(128 * 64), 128 * 64 + 8]:
        model.update(c)
    assert all(window.check(c) == model.check(c) for c in range(120 * 64, 129 * 64 + 64))
