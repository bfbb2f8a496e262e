"""Stand-ins for the daemon's processes, for tests of the supervisor without root or queues."""

from __future__ import annotations

import os
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
