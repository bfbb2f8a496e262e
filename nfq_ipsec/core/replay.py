"""Anti-replay window (RFC 4303 section 3.4.3) kept as RFC 6479 bitmap blocks.

The window is a ring of 32-bit blocks. Moving the window clears whole blocks instead of
shifting a bitmap, so the cost of an update is bounded by the number of blocks, not the
distance moved or the window size. ``check`` never changes state: it runs before the ICV is
verified, ``update`` only after.
"""

from __future__ import annotations

from typing import Final

MIN_WINDOW: Final = 32
MAX_WINDOW: Final = 65536
DEFAULT_WINDOW: Final = 128
_BITS: Final = 32
_MASK32: Final = 0xFFFFFFFF


class ReplayWindow:
    def __init__(self, size: int = DEFAULT_WINDOW, esn: bool = False) -> None:
        if not MIN_WINDOW <= size <= MAX_WINDOW:
            raise ValueError(f"replay window must be {MIN_WINDOW}..{MAX_WINDOW}, got {size}")
        self.size = size
        self.esn = esn
        # One spare block so that a full window of ``size`` bits always fits (RFC 6479 §2).
        nblocks = 1
        while (nblocks - 1) * _BITS < size:
            nblocks *= 2
        self._nblocks = nblocks
        self._index_mask = nblocks - 1
        self._blocks = [0] * nblocks
        self.top = 0  # highest authenticated sequence number (full 64 bits with ESN)

    def infer(self, seq_lo: int) -> int:
        """The full sequence number for a received 32-bit one (RFC 4303 Appendix A2.2)."""
        if not self.esn:
            return seq_lo
        top_lo = self.top & _MASK32
        top_hi = self.top >> 32
        w = self.size
        if top_lo >= w - 1:  # case A: window within one subspace
            hi = top_hi if seq_lo >= top_lo - w + 1 else top_hi + 1
            if hi > _MASK32:  # there is no subspace after the last one: the number is old
                hi = top_hi
        else:  # case B: window straddles two subspaces
            hi = top_hi - 1 if seq_lo >= (top_lo - w + 1) & _MASK32 else top_hi
            if hi < 0:
                hi = 0
        return (hi << 32) | seq_lo

    def check(self, seq: int) -> bool:
        """True if ``seq`` is new and not left of the window. Changes nothing."""
        if seq == 0:
            return False
        if seq > self.top:
            return True
        if seq + self.size <= self.top:
            return False
        block = (seq >> 5) & self._index_mask
        return not (self._blocks[block] >> (seq & 31)) & 1

    def update(self, seq: int) -> None:
        """Record an authenticated ``seq`` (which passed ``check``)."""
        if seq > self.top:
            cur = self.top >> 5
            new = seq >> 5
            steps = min(new - cur, self._nblocks)
            blocks = self._blocks
            mask = self._index_mask
            for i in range(1, steps + 1):
                blocks[(cur + i) & mask] = 0
            self.top = seq
        self._blocks[(seq >> 5) & self._index_mask] |= 1 << (seq & 31)

    def restore(self, top: int) -> None:
        """Treat every number up to ``top`` as seen (after a restart, from persisted state):
        only numbers above ``top`` pass ``check``, including reordered ones right after it."""
        if top < 0:
            raise ValueError("top must be >= 0")
        self.top = top
        full = (1 << _BITS) - 1
        self._blocks = [full] * self._nblocks
        self._blocks[(top >> 5) & self._index_mask] = (1 << ((top & 31) + 1)) - 1

    def seen(self, seq: int) -> bool:
        """Whether ``seq`` is recorded (for state persistence and tests)."""
        return not self.check(seq) and seq + self.size > self.top and seq != 0
