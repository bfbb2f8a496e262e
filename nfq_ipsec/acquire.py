"""Acquires (``start_action = "trap"``): the data plane asking the keying agent for a Child SA.

A trap connection's protect policy sends its packets to one worker while it has no SA
(``rules``: ``trap_queue``); the worker drops each one as ``acquire`` and tells the supervisor,
which tells the agent, which initiates. A packet stream would otherwise tell it once per
packet: ``Limiter`` lets one acquire per connection through per ``INTERVAL``, and the agent
ignores an acquire for a connection whose IKE SA is up or on its way anyway.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

INTERVAL = 1.0  # seconds: at most one acquire per connection this often
_MAX_NAMES = 1024  # a bound on what the limiter remembers


def trap_queue(connection: str, queues: Sequence[int]) -> int:
    """The queue whose worker takes a trap connection's packets while it has no Child SA
    (the same one for a connection on every start: a hash of its name)."""
    return queues[zlib.crc32(connection.encode()) % len(queues)]


class Limiter:
    """At most one acquire per connection per ``interval`` seconds."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self.suppressed = 0  # acquires not passed on: one was sent less than interval ago

    def due(self, connection: str, now: float) -> bool:
        last = self._last.get(connection)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        if len(self._last) >= _MAX_NAMES:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            if len(self._last) >= _MAX_NAMES:
                self._last.clear()
        self._last[connection] = now
        return True
