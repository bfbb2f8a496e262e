"""The drop log (``daemon.drop_log``, opt-in): one line for an inbound ESP packet dropped as
``unknown_spi``, ``integrity``, ``replay`` or ``policy_mismatch``, naming its SPI and where it
came from, rate-limited per reason.

An operator chasing "everything is dropped" needs to know which SPI a peer sends and from
where; the counters say only how many. So a worker logs (logger ``nfq_ipsec.drops``, INFO) at
most ``PER_SECOND`` lines per reason in each second, then one line saying how many more it did
not log (``suppressed K``) once that second is over. A flood of forged packets costs a few
lines a second, not a line a packet.

Only the source address, the SPI and, for ESP in UDP, the source port are read from the packet,
never anything else of it (no payload, no sequence number an attacker chose to show). The
lines are built only for a dropped packet of these reasons: the accept path does not see this
module.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address

from . import journal
from .core.errors import DropReason

LOGGED = frozenset({DropReason.UNKNOWN_SPI, DropReason.INTEGRITY, DropReason.REPLAY,
                    DropReason.POLICY_MISMATCH})
PER_SECOND = 5  # lines per reason per second; the rest counted in one "suppressed" line
WINDOW = 1.0  # seconds

_ESP, _UDP = 50, 17

log = logging.getLogger("nfq_ipsec.drops")


def spi_and_source(packet: bytes) -> tuple[int | None, str]:
    """The SPI of an inbound ESP packet (None: not in its bytes) and where it came from:
    ``ADDRESS`` (``ADDRESS:PORT`` for ESP in UDP, ``[ADDRESS]`` for IPv6; ``?``: not in them)."""
    source, spi = "?", None
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        source = str(IPv4Address(bytes(packet[12:16])))
        proto, offset = packet[9], ihl
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        source = f"[{IPv6Address(bytes(packet[8:24]))}]"
        proto, offset = packet[6], 40  # ESP right after the fixed header, or UDP then ESP
    else:
        return None, "?"
    if proto == _UDP and len(packet) >= offset + 8:
        port = int.from_bytes(packet[offset:offset + 2], "big")
        source = f"{source}:{port}"
        offset += 8
        proto = _ESP
    if proto == _ESP and len(packet) >= offset + 4:
        spi = int.from_bytes(packet[offset:offset + 4], "big")
    return spi, source


class DropLog:
    """Rate-limited drop lines for one worker. ``note`` for each dropped packet of a
    ``LOGGED`` reason; ``flush`` now and then (the worker's event tick), so the count of the
    suppressed lines of a quiet second is said too."""

    def __init__(self, logger: logging.Logger = log, per_second: int = PER_SECOND,
                 window: float = WINDOW) -> None:
        self.logger = logger
        self.per_second = per_second
        self.window = window
        self._start: dict[DropReason, float] = {}  # the current window's start, per reason
        self._logged: dict[DropReason, int] = {}  # lines in it
        self._suppressed: dict[DropReason, int] = {}  # drops not logged in it

    def note(self, reason: DropReason, packet: bytes, now: float) -> None:
        if reason not in LOGGED or not self.logger.isEnabledFor(logging.INFO):
            return
        start = self._start.get(reason)
        if start is None or now - start >= self.window:
            self._close(reason)
            self._start[reason] = now
            self._logged[reason] = 0
        if self._logged[reason] < self.per_second:
            self._logged[reason] += 1
            spi, source = spi_and_source(packet)
            self.logger.info("dropped (%s): SPI %s from %s", reason.value,
                             "?" if spi is None else f"0x{spi:08x}", source,
                             extra=journal.fields(spi=spi, reason=reason.value))
        else:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1

    def flush(self, now: float) -> None:
        """Say the suppressed count of every window that is over."""
        for reason, start in list(self._start.items()):
            if now - start >= self.window:
                self._close(reason)
                del self._start[reason]

    def _close(self, reason: DropReason) -> None:
        n = self._suppressed.pop(reason, 0)
        if n:
            self.logger.info("dropped (%s): suppressed %d more line(s) in %g s (at most %d a "
                             "second are logged)", reason.value, n, self.window, self.per_second)
