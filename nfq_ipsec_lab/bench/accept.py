"""The accept-only worker: the benchmark's redirect ceiling, and the floors under ESP.

One process per queue, started by the benchmark in a lab namespace::

    python -m nfq_ipsec_lab.bench.accept --queue 100 --cpu 0 --mark 0x10000000 [--work WORK] [--gso]

It is the daemon's own worker (:func:`nfq_ipsec.worker.run`: CPU pinning, the NetlinkQueue
binding with its settings, the poll loop, batches of 64 packets, verdicts sent several per
``sendmsg``, SIGTERM handling) with one thing swapped: the processor accepts every packet
(a verdict with the reinject mark) instead of doing SPD, SA and ESP. ``--work`` says how much
of an ESP worker's unavoidable work it does on the way:

- ``none`` (the ``accept`` row): the verdict carries no payload. What the queue trip and our
  Python loop cost, nothing else: the ceiling.
- ``payload`` (``accept-payload``): the verdict carries the packet's own bytes back, as every
  ESP verdict carries a new packet: the kernel copies the payload into the packet and the
  receiver verifies the TCP checksum in software (a rewritten packet loses its checksum
  offload state).
- ``gcm`` (``accept-gcm``): ``payload``, and before it the packet is sealed with AES-GCM-128
  through the ESP core's own suite (the same ``cryptography`` call, key, nonce and AAD shapes
  as an ESP worker's; the ciphertext is thrown away so that the traffic stays readable). No
  parsing, no SPD, no framing: the least any ESP worker on this binding and this cipher
  library has to do per packet, so its ratio to ``accept`` bounds what ESP can reach.

``--gso`` (the ``accept-gso`` row) binds the queue with the GSO flag, as ``daemon.gso`` does:
a TCP superpacket makes its queue trip whole and is accepted unchanged, the kernel segments it
after the verdict.

The swap is ``worker.run``'s ``processor`` argument: everything else is the daemon's worker.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from nfq_ipsec import worker
from nfq_ipsec.core import Processor, Result, Verdict
from nfq_ipsec.core.processor import ARRIVING
from nfq_ipsec.core.suites import Suite, make_suite
from nfq_ipsec.nfqueue import DEFAULT_MAX_LEN

WORKS = ("none", "payload", "gcm")
_ACCEPT = Result(Verdict.ACCEPT)  # packet None: accept unchanged (the verdict carries no payload)
_ESP_HEADER = bytes(8)  # SPI and sequence number: what the AAD of an ESP packet is


class AcceptAll:
    """A processor that accepts every packet as it is, in both directions. Everything else
    (counters, events, the status snapshot's SAs) comes from an empty :class:`Processor`; it
    wraps one rather than subclassing it, since a compiled class can't be subclassed in Python."""

    def __init__(self, empty: Processor) -> None:
        self._empty = empty

    def process(self, data: bytes, length: int, where: int, now: float) -> Result:
        """The worker's one call per packet (``Processor.process``), straight to a direction."""
        return self.inbound(data, now) if where == ARRIVING else self.outbound(data, now)

    def outbound(self, data: bytes, now: float) -> Result:
        return _ACCEPT

    def inbound(self, data: bytes, now: float) -> Result:
        return _ACCEPT

    def process_offloaded(self, data: bytes, length: int, where: int, now: float,
                          superpacket: bool) -> Result:
        """A GSO queue's superpacket or packet whose checksum is not ready (``--gso``):
        accepted unchanged, the kernel segments and checksums it after the verdict."""
        return _ACCEPT

    def __getattr__(self, name: str) -> Any:
        return getattr(self._empty, name)


class AcceptWithPayload(AcceptAll):
    """Accept every packet with a verdict that carries the packet's own bytes."""

    def outbound(self, data: bytes, now: float) -> Result:
        return Result(Verdict.ACCEPT, data)

    def inbound(self, data: bytes, now: float) -> Result:
        return Result(Verdict.ACCEPT, data)


class AcceptAfterSeal(AcceptAll):
    """Seal every packet with AES-GCM-128 (result discarded), then accept it with its own
    bytes as the verdict's payload."""

    def __init__(self, empty: Processor, suite: Suite) -> None:
        super().__init__(empty)
        self._seal = suite.seal
        self._seq = 0

    def outbound(self, data: bytes, now: float) -> Result:
        self._seq += 1
        self._seal(_ESP_HEADER, b"", self._seq, data)
        return Result(Verdict.ACCEPT, data)

    inbound = outbound


def accept_all(spec: worker.WorkerSpec, work: str = "none") -> Processor:
    """The accept-all processor for a worker of ``spec`` (typed as what the worker takes)."""
    empty = Processor(spec.spd(), (), 0.0)
    if work == "none":
        return cast(Processor, AcceptAll(empty))
    if work == "payload":
        return cast(Processor, AcceptWithPayload(empty))
    if work == "gcm":
        suite = make_suite("aes-gcm-128", os.urandom(20), None, b"")
        return cast(Processor, AcceptAfterSeal(empty, suite))
    raise ValueError(f"unknown work {work!r} (known: {', '.join(WORKS)})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.bench.accept",
                                     description="accept-only NFQUEUE worker (benchmark ceiling)")
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: not pinned)")
    parser.add_argument("--mark", type=lambda t: int(t, 0), required=True, help="reinject mark")
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    parser.add_argument("--work", choices=WORKS, default="none",
                        help="none: accept unchanged (default); payload: the verdict carries the "
                        "packet back; gcm: payload, after sealing the packet with AES-GCM-128")
    parser.add_argument("--gso", action="store_true",
                        help="bind the queue with the GSO flag (TCP superpackets whole; with "
                        "--work none only)")
    args = parser.parse_args(argv)
    if args.gso and args.work != "none":
        parser.error("--gso goes with --work none: a payload verdict can't carry a superpacket")
    spec = worker.WorkerSpec(queue=args.queue, cpu=args.cpu, mark=args.mark, policies=(), sas=(),
                             max_len=args.max_len, gso=args.gso)
    # The worker reports "ready" on its pipe and stops when the pipe closes: keep our end open.
    # The benchmark learns readiness from the kernel (the queue shows up in
    # /proc/net/netfilter/nfnetlink_queue) and stops us with SIGTERM.
    ours, theirs = multiprocessing.Pipe()
    try:
        return worker.run(spec, theirs, processor=accept_all(spec, args.work))
    finally:
        ours.close()
        theirs.close()


if __name__ == "__main__":
    sys.exit(main())
