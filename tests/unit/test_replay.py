"""Anti-replay window (RFC 4303 section 3.4.3, RFC 6479) and ESN inference (RFC 4303 A2.2).

The window is compared with a plain set-based model: a sequence number is acceptable iff it
is not 0, not already accepted, and greater than (highest accepted - window size).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nfq_ipsec.core.replay import MAX_WINDOW, MIN_WINDOW, ReplayWindow


class ModelWindow:
    """The RFC 4303 3.4.3 rule, written the obvious way."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.accepted: set[int] = set()
        self.top = 0

    def check(self, seq: int) -> bool:
        return seq != 0 and seq not in self.accepted and seq > self.top - self.size

    def update(self, seq: int) -> None:
        self.accepted.add(seq)
        self.top = max(self.top, seq)


# --- examples -------------------------------------------------------------------------------


def test_basic_rules() -> None:
    w = ReplayWindow(64)
    assert not w.check(0)  # RFC 4303: the first packet has sequence number 1
    assert w.check(1)
    w.update(1)
    assert not w.check(1)
    w.update(100)
    assert w.check(99) and w.check(37)  # 100 - 64 + 1 = 37: the left edge is inside
    assert not w.check(36)  # just outside
    w.update(37)
    assert not w.check(37)
    assert w.seen(37) and w.seen(100) and not w.seen(38)


def test_check_changes_nothing() -> None:
    w = ReplayWindow(128)
    for s in (5, 7, 300):
        w.update(s)
    before = (w.top, [w.seen(s) for s in range(0, 400)])
    for s in range(0, 1000):
        w.check(s)
    assert (w.top, [w.seen(s) for s in range(0, 400)]) == before


def test_big_jump_forgets_everything() -> None:
    w = ReplayWindow(64)
    for s in range(1, 65):
        w.update(s)
    w.update(10_000)
    assert all(not w.seen(s) for s in range(1, 65))
    assert all(w.check(s) for s in range(10_000 - 63, 10_000))
    assert not w.check(10_000 - 64)


def test_jump_by_exactly_the_ring_clears_stale_bits() -> None:
    # Moving forward by a multiple of the ring must not leave old bits that alias new seqs.
    for size in (32, 64, 100, 1024):
        w = ReplayWindow(size)
        ring = w._nblocks * 32
        for s in range(1, size + 1):
            w.update(s)
        w.update(size + ring)
        for s in range(size + ring - size + 1, size + ring):
            assert w.check(s), (size, s)


@pytest.mark.parametrize("size", [MIN_WINDOW - 1, 0, -5, MAX_WINDOW + 1])
def test_window_size_limits(size: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size)
    ReplayWindow(MIN_WINDOW)
    ReplayWindow(MAX_WINDOW)


# --- ESN inference, RFC 4303 Appendix A2.2 --------------------------------------------------


def test_esn_case_a_window_in_one_subspace() -> None:
    w = ReplayWindow(64, esn=True)
    w.update((3 << 32) | 1000)  # Tl = 1000 >= W - 1
    assert w.infer(1000) == (3 << 32) | 1000
    assert w.infer(1000 - 63) == (3 << 32) | 937  # left edge: same subspace
    assert w.infer(1000 - 64) == (4 << 32) | 936  # below the window: next subspace
    assert w.infer(0xFFFFFFFF) == (3 << 32) | 0xFFFFFFFF


def test_esn_case_b_window_spans_two_subspaces() -> None:
    w = ReplayWindow(64, esn=True)
    w.update((3 << 32) | 10)  # Tl = 10 < W - 1: the window reaches back into subspace 2
    assert w.infer(10) == (3 << 32) | 10
    assert w.infer(0) == 3 << 32
    assert w.infer(20) == (3 << 32) | 20
    bl = (10 - 64 + 1) & 0xFFFFFFFF
    assert w.infer(bl) == (2 << 32) | bl
    assert w.infer(0xFFFFFFFF) == (2 << 32) | 0xFFFFFFFF
    assert w.infer(bl - 1) == (3 << 32) | (bl - 1)


def test_esn_start_of_life() -> None:
    w = ReplayWindow(64, esn=True)
    assert w.infer(1) == 1
    w.update(1)
    assert w.infer(2) == 2
    # Nothing can come from "subspace -1"; the number is taken in subspace 0.
    assert w.infer(0xFFFFFFF0) >> 32 == 0


def test_esn_end_of_the_number_space() -> None:
    # The last subspace has no successor: a low number left of the window is old, never
    # (2**32 << 32) | lo, which is not a 64-bit sequence number at all.
    w = ReplayWindow(64, esn=True)
    w.update(2**64 - 3)
    assert w.infer(5) == (0xFFFFFFFF << 32) | 5
    assert not w.check(w.infer(5))
    assert w.infer(0xFFFFFFFF) == 2**64 - 1 and w.check(2**64 - 1)


def test_without_esn_infer_is_identity() -> None:
    w = ReplayWindow(64)
    w.update(0xFFFFFFF0)
    assert w.infer(5) == 5
    assert not w.check(5)


# --- model-based ----------------------------------------------------------------------------


@st.composite
def traffic(draw: st.DrawFn) -> tuple[int, list[tuple[int, bool]]]:
    """A window size and packets (seq, authenticates): mostly advancing, with reordering,
    duplicates, jumps and forgeries (packets that fail their ICV and must not count)."""
    size = draw(st.sampled_from([32, 33, 64, 100, 128, 500, 1024, 4096]))
    steps = draw(st.lists(st.tuples(
        st.sampled_from(["next", "back", "dup", "step", "jump", "tiny"]),
        st.integers(0, 2 * size + 70), st.integers(0, 9),
    ), min_size=1, max_size=120))
    packets: list[tuple[int, bool]] = []
    top = 0
    for kind, n, forged in steps:
        if kind == "next":
            seq = top + 1 + n % 3
        elif kind == "back":
            seq = max(0, top - n)
        elif kind == "dup" and packets:
            seq = packets[n % len(packets)][0]
        elif kind == "step":  # forward by up to two windows: moves the window part way
            seq = top + n
        elif kind == "jump":
            seq = top + n * 37
        else:
            seq = n % 4
        ok = forged != 0  # one in ten fails its ICV
        packets.append((seq, ok))
        if ok:
            top = max(top, seq)
    return size, packets


@settings(max_examples=300, deadline=None)
@given(traffic())
@example((64, [(10, True), (69, True), (10, True)]))  # 10 is still inside the window
@example((32, [(1, True), (31, True), (32, True), (2, True)]))
def test_window_agrees_with_set_model(case: tuple[int, list[tuple[int, bool]]]) -> None:
    size, packets = case
    window, model = ReplayWindow(size), ModelWindow(size)
    for seq, authenticates in packets:
        verdict = window.check(seq)
        assert verdict == model.check(seq), (seq, window.top, model.top)
        if verdict and authenticates:  # the update happens only after the ICV passed
            window.update(seq)
            model.update(seq)
        assert window.top == model.top
    for seq in range(max(0, model.top - size - 3), model.top + 3):
        assert window.check(seq) == model.check(seq), seq


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([32, 64, 128, 1024, 4096]),
    st.one_of(st.integers(0, 5), st.sampled_from([0xFFFFFFFE, 0xFFFFFFFF])),
    st.integers(0, 0xFFFFFFFF),
    st.lists(st.integers(-4200, 4200), min_size=1, max_size=60),
)
def test_esn_window_agrees_with_set_model(size: int, hi: int, lo: int, moves: list[int]) -> None:
    """With ESN: the sender's true 64-bit numbers wander around a point near (or across) a
    2**32 boundary; the receiver sees only the low 32 bits and must infer the rest."""
    start = max(1, (hi << 32) | lo)
    window, model = ReplayWindow(size, esn=True), ModelWindow(size)
    window.update(start)
    model.update(start)
    for move in moves:
        true_seq = model.top + move
        if not 0 < true_seq < 2**64:
            continue
        inferred = window.infer(true_seq & 0xFFFFFFFF)
        assert 0 <= inferred < 2**64
        if true_seq > model.top - size:
            # RFC 4303 A2.2 guarantees the right high half for anything not left of the window.
            assert inferred == true_seq, (hex(true_seq), hex(window.top))
            assert window.check(inferred) == model.check(true_seq)
            if model.check(true_seq):
                window.update(inferred)
                model.update(true_seq)
        else:
            # Left of the window: whatever high half is inferred, the packet is not accepted as
            # new unless it decrypts, and with a wrong high half the ICV fails (RFC 4303 A2.2).
            assert inferred != true_seq or not window.check(inferred)
        assert window.top == model.top
