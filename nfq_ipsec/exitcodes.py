"""The exit codes of every ``nfq-ipsec`` command, in one place (the README's table lists them).

A leaf: it imports nothing, so any layer may use it without climbing up to the commands.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
FAILURE: Final = 1  # a command we ran failed, the daemon stopped on an error, a reload refused
CONFIG: Final = 2  # usage error or invalid configuration: nothing was changed
NOT_RUNNING: Final = 3  # the daemon is not running or not reachable (status, stop, reload)
DECODE_DROPS: Final = 4  # an offline decode found packets that failed
STATE: Final = 5  # run: an SA's saved state is unusable; nothing was started
BUSY: Final = 75  # bench: another benchmark is running (EX_TEMPFAIL); nothing was measured
INTERRUPTED: Final = 130  # lab, bench: stopped by Ctrl-C (128 + SIGINT), everything torn down

MEANING: Final = {
    OK: "success",
    FAILURE: "runtime failure",
    CONFIG: "usage error or invalid configuration",
    NOT_RUNNING: "the daemon is not running or not reachable",
    DECODE_DROPS: "an offline decode found packets that failed",
    STATE: "an SA's saved state is unusable",
    BUSY: "another benchmark is running",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
