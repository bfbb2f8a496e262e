"""The anti-replay window of RFC 4303 section 3.4.3, with the extended sequence numbers of
Appendix A.

The window is kept the way the RFC describes it: the highest number authenticated so far
(``top``) and a bitmap of the ``size`` numbers ending at it, one Python integer whose bit i
says whether ``top - i`` was seen. ``fresh`` changes nothing (it runs before the ICV is
checked); ``record`` runs only after.
"""

from __future__ import annotations

from typing import Final

SUBSPACE: Final = 1 << 32


class Window:
    def __init__(self, size: int, esn: bool) -> None:
        if not 32 <= size <= 65536:
            raise ValueError(f"replay window must be 32..65536, got {size}")
        self.size = size
        self.esn = esn
        self.top = 0
        self.bitmap = 0  # bit i: top - i was seen

    def full_number(self, low: int) -> int:
        """RFC 4303 Appendix A2.2: the 64-bit number a received low half stands for."""
        if not self.esn:
            return low
        top_low, top_high = self.top % SUBSPACE, self.top // SUBSPACE
        bottom = top_low - self.size + 1
        if bottom >= 0:  # case A: the window lies in one subspace
            high = top_high if low >= bottom else top_high + 1
            if high >= SUBSPACE:  # no subspace after the last: the number is an old one
                high = top_high
        else:  # case B: the window reaches back into the previous subspace
            high = top_high - 1 if low >= bottom % SUBSPACE else top_high
            high = max(high, 0)
        return high * SUBSPACE + low

    def fresh(self, seq: int) -> bool:
        """Not zero, not seen, not left of the window."""
        if seq == 0:
            return False
        if seq > self.top:
            return True
        behind = self.top - seq
        return behind < self.size and not (self.bitmap >> behind) & 1

    def record(self, seq: int) -> None:
        """``seq`` passed ``fresh`` and its ICV: mark it, sliding the window if it is new."""
        if seq > self.top:
            moved = seq - self.top
            self.bitmap = ((self.bitmap << moved) & ((1 << self.size) - 1)
                           if moved < self.size else 0)
            self.top = seq
        self.bitmap |= 1 << (self.top - seq)
