"""The accept-only worker: the benchmark's redirect ceiling.

One process per queue, started by the benchmark in a lab namespace::

    python -m nfq_ipsec.bench.accept --queue 100 --cpu 0 --mark 0x10000000

It is the daemon's own worker (:func:`nfq_ipsec.worker.run`: CPU pinning, the NetlinkQueue
binding with its settings, the poll loop, batches of 64 packets, verdicts sent several per
``sendmsg``, SIGTERM handling) with one thing swapped: the processor accepts every packet
unchanged (a verdict with the reinject mark and no payload) instead of doing SPD, SA and ESP.
So the row measures what the queue trip and our Python loop cost, nothing else.

The swap is ``worker.run``'s ``processor`` argument: everything else is the daemon's worker.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence
from typing import Any, cast

from .. import worker
from ..core import Processor, Result, Verdict
from ..nfqueue import DEFAULT_MAX_LEN

_ACCEPT = Result(Verdict.ACCEPT)  # packet None: accept unchanged (the verdict carries no payload)


class AcceptAll:
    """A processor that accepts every packet as it is, in both directions. Everything else
    (counters, events, the status snapshot's SAs) comes from an empty :class:`Processor`; it
    wraps one rather than subclassing it, since a compiled class can't be subclassed in Python."""

    def __init__(self, empty: Processor) -> None:
        self._empty = empty

    def outbound(self, data: bytes, now: float) -> Result:
        return _ACCEPT

    def inbound(self, data: bytes, now: float) -> Result:
        return _ACCEPT

    def __getattr__(self, name: str) -> Any:
        return getattr(self._empty, name)


def accept_all(spec: worker.WorkerSpec) -> Processor:
    """The accept-all processor for a worker of ``spec`` (typed as what the worker takes)."""
    return cast(Processor, AcceptAll(Processor(spec.spd(), (), 0.0)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfq_ipsec.bench.accept",
                                     description="accept-only NFQUEUE worker (benchmark ceiling)")
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: not pinned)")
    parser.add_argument("--mark", type=lambda t: int(t, 0), required=True, help="reinject mark")
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    args = parser.parse_args(argv)
    spec = worker.WorkerSpec(queue=args.queue, cpu=args.cpu, mark=args.mark, policies=(), sas=(),
                             max_len=args.max_len)
    # The worker reports "ready" on its pipe and stops when the pipe closes: keep our end open.
    # The benchmark learns readiness from the kernel (the queue shows up in
    # /proc/net/netfilter/nfnetlink_queue) and stops us with SIGTERM.
    ours, theirs = multiprocessing.Pipe()
    try:
        return worker.run(spec, theirs, processor=accept_all(spec))
    finally:
        ours.close()
        theirs.close()


if __name__ == "__main__":
    sys.exit(main())
