"""When each SA last carried a packet, as the status answer's ``sas[].last_packet_age`` says it
(like swanctl's "in 5s ago").

The data path does not stamp packets with the time: the supervisor sees an SA's packet count
grow in the counts its queue's worker reports (with every answer to the watchdog's ping, every
``watchdog / 4`` seconds or 2.5 s with the watchdog off, and with every status snapshot), and
takes the time of that report as the SA's last packet. So the age shown is at most one report
interval short of the truth, never longer; and it costs the workers nothing.

One :class:`SaActivity` per queue, kept across its workers' restarts: a new worker counts from
zero, so ``restart`` forgets the counts but not the times.
"""

from __future__ import annotations

from .status import Counts


class SaActivity:
    def __init__(self) -> None:
        self._packets: dict[str, int] = {}  # by SA name: the current worker's last count
        self._last: dict[str, float] = {}  # by SA name: monotonic time the count last grew

    def restart(self) -> None:
        """A new worker process: its counts start from zero."""
        self._packets = {}

    def update(self, counts: Counts, now: float) -> None:
        """A report of the current worker's counts, received at ``now`` (monotonic)."""
        for name, c in counts["sas"].items():
            if c["packets"] > self._packets.get(name, 0):
                self._last[name] = now
            self._packets[name] = c["packets"]

    def age(self, name: str, now: float) -> float | None:
        """Seconds since the report in which SA ``name`` was last seen to carry a packet;
        None if it never was (since the daemon started)."""
        last = self._last.get(name)
        return None if last is None else max(0.0, now - last)
