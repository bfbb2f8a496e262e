"""Stand-ins for the daemon's processes, for tests of the supervisor without root or queues;
and ``signals_restored``, for a test that runs ``Supervisor.run`` (which installs its own signal
handlers) in the test process."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection

from nfq_ipsec.worker import WorkerSpec


def fake_worker(spec: WorkerSpec, conn: Connection) -> None:
    """A worker that binds nothing: ready at once, answers pings and stats, stops when told."""
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "ping":
            conn.send(("pong",))
        elif msg[0] == "stats":
            conn.send(("stats", {"queue": spec.queue, "packets_in": 3, "packets_out": 3,
                                 "drops": {}, "sas": [], "core": "stand-in"}))
        elif msg[0] == "stop":
            return


@contextlib.contextmanager
def signals_restored() -> Iterator[None]:
    """The test process's SIGTERM, SIGINT and SIGHUP handlers and wakeup fd as they were."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        signal.set_wakeup_fd(-1)
        for s, h in saved.items():
            signal.signal(s, h)
