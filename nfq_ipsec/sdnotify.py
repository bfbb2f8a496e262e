"""systemd's notification protocol (sd_notify(3)), written by hand: one datagram of
``KEY=VALUE`` lines to the unix socket ``$NOTIFY_SOCKET`` names (a path, or an abstract
socket when it starts with ``@``).

The unit is ``Type=notify`` with ``WatchdogSec=``; the supervisor says:

- ``READY=1`` (with ``STATUS=``) once every worker listens and the rules are installed, so
  ``systemctl start`` returns, and ``network-pre.target`` is reached, only when traffic is
  protected;
- ``RELOADING=1`` (with ``MONOTONIC_USEC=``) when a reload starts and ``READY=1`` when it
  ends, whatever its outcome (a refused reload leaves the old configuration running);
- ``STOPPING=1`` when it starts to stop;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC``, from its loop: only while the loop turns,
  so a supervisor stuck anywhere is killed by systemd (and restarted, ``Restart=on-failure``),
  and its rules, left in place, drop the protected traffic meanwhile.

Without ``$NOTIFY_SOCKET`` (not under systemd, or another ``Type=``) nothing is sent. A
notification that can't be sent is logged at DEBUG and dropped: the socket is non-blocking,
and the supervisor never waits on systemd. ``$NOTIFY_SOCKET`` and the watchdog variables are
taken out of the environment, so the workers and the iptables commands don't inherit them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("nfq_ipsec.sdnotify")

_TAKEN = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value (None: not one we can use)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # empty, relative, or vsock: (vsock: addresses) which the daemon does not use


def watchdog_period(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, if it is for ``pid``
    (``$WATCHDOG_PID`` absent or ours); None: no watchdog."""
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2 / 1e6


class Notifier:
    """The supervisor's end of the protocol. ``environ`` (``os.environ`` by default) is read
    once, and the variables are taken out of it."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_period = watchdog_period(env, os.getpid()) if self.address else None
        for name in _TAKEN:
            env.pop(name, None)
        self.sent = 0  # datagrams sent
        self.failed = 0  # and not sent
        self._next_watchdog: float | None = None  # monotonic
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One notification of these ``KEY=VALUE`` lines; whether it went."""
        if self._sock is None or self.address is None:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            self._sock.sendto(data, self.address)
        except OSError as err:
            self.failed += 1
            log.debug("sd_notify %s: %s", lines[0].split("=", 1)[0], err)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: closing the rules, stopping the workers")

    def watchdog(self, now: float | None = None, force: bool = False) -> None:
        """Called from every round of the supervisor's loop: ``WATCHDOG=1`` when it is due
        (``force``: now, as a reload begins, which holds the loop until it ends)."""
        if self.watchdog_period is None:
            return
        now = time.monotonic() if now is None else now
        if force or self._next_watchdog is None or now >= self._next_watchdog:
            self.send("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog_period

    def next_watchdog(self, now: float) -> float | None:
        """Seconds until the next ``WATCHDOG=1`` is due (None: no watchdog)."""
        if self.watchdog_period is None:
            return None
        if self._next_watchdog is None:
            return 0.0
        return max(0.0, self._next_watchdog - now)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
