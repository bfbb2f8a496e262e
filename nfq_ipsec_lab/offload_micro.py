"""A micro-benchmark of the crypto offload (``crypto.offload_helpers``): what one packet's seal
costs the worker in process, and what it costs the worker to hand it to a helper.

Not the lab bench: no namespaces, no queue, no kernel. It runs the worker's own pieces on
batches of 64 packets (a queue batch): in process, the SA's suite as the team binds it
(``GuardedSuite`` over the engine's); offloaded, the ``OffloadSuite`` while the worker defers
(a job written into the helper's shared memory, its placeholder), the doorbell every
``--batch`` jobs, ``collect`` at the end of the queue batch and the sealed body put in place of
the placeholder in a packet (what ``PacketHandler`` does). Framing (ESP header, padding, outer
header) is the same on both paths and left out.

Per packet it prints the median over ``--runs`` runs of:

- ``owner CPU``: the worker's own CPU time (``time.process_time``, the helpers not in it): what
  a busy SA's worker pays per packet, the figure that bounds one SA's rate when the helpers
  keep up;
- ``wall``: elapsed time, the worker waiting for the helpers included (on a machine with fewer
  free CPUs than helpers + 1, this is the figure that counts).

    .venv/bin/python -m nfq_ipsec_lab.offload_micro [--runs 7] [--helpers 1]

On a shared machine the figures are noisy: run it several times, read medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from nfq_ipsec.core import SAParams, Secret
from nfq_ipsec.core.sa import SADirection, SecurityAssociation
from nfq_ipsec.core.suites import ENCRYPTION, HMACS
from nfq_ipsec.engines.base import CryptoSettings
from nfq_ipsec.engines.offload import OffloadPool, OffloadSuite
from nfq_ipsec.engines.openssl import OpenSSLEngine
from nfq_ipsec.engines.team import Team

QUEUE_BATCH = 64
SUITES = (("aes-gcm-128", None), ("chacha20-poly1305", None), ("aes-cbc-128", "hmac-sha256-128"))
SIZES = (64, 1408, 8992)  # plaintexts (padded): a whole number of AES blocks
OUTER = bytes(28)  # an IPv4 header and the ESP header in front of the sealed body


def _sa(enc: str, integ: str | None) -> SecurityAssociation:
    key = os.urandom(ENCRYPTION[enc].keymat_size)
    ikey = os.urandom(HMACS[integ].key_size) if integ else b""
    return SecurityAssociation(SAParams("bench", 0x100, SADirection.OUT, enc, Secret(key), integ,
                                        Secret(ikey)), 0.0)


def _in_process(sa: SecurityAssociation, size: int, batches: int) -> tuple[float, float]:
    seal = sa.suite.seal
    pt = bytes(size)
    header = bytes(8)
    c0, w0 = time.process_time(), time.perf_counter()
    seq = 1
    for _ in range(batches):
        for _ in range(QUEUE_BATCH):
            OUTER + seal(header, b"", seq, pt)
            seq += 1
    n = batches * QUEUE_BATCH
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def _offloaded(pool: OffloadPool, sa: SecurityAssociation, size: int, batches: int
               ) -> tuple[float, float]:
    suite = sa.suite
    assert isinstance(suite, OffloadSuite)
    seal = suite.seal
    pt = bytes(size)
    header = bytes(8)
    c0, w0 = time.process_time(), time.perf_counter()
    seq = 1
    for _ in range(batches):
        pool.deferring = True
        packets = []
        for _ in range(QUEUE_BATCH):
            packets.append((OUTER + seal(header, b"", seq, pt), pool.take()))
            seq += 1
        pool.deferring = False
        pool.collect()
        for packet, jobs in packets:
            if pool.patch(packet, jobs) is None:
                raise RuntimeError(f"offload failed: {pool.failed}")
        pool.finish()
    n = batches * QUEUE_BATCH
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def _median(runs: int, fn: Callable[..., tuple[float, float]], *args: object
            ) -> tuple[float, float]:
    got = [fn(*args) for _ in range(runs)]
    return statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--helpers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.05, help="roughly, per run and row")
    args = ap.parse_args(argv)
    team = Team([OpenSSLEngine()], CryptoSettings())
    team.discover(speed_seconds=0.0005)
    pool = OffloadPool(args.helpers, batch=8, timeout=5.0)
    pool.start({m.name: m.engine for m in team.members.values()})
    print(f"per packet, median of {args.runs} runs, batches of {QUEUE_BATCH} packets, "
          f"{args.helpers} helper(s), {os.cpu_count()} CPU(s); microseconds")
    print(f"{'suite':36} {'bytes':>5} {'in process':>17} " + " ".join(
        f"{'batch ' + str(b):>17}" for b in (1, 8, 32)))
    print(f"{'':36} {'':>5} " + " ".join(f"{'CPU':>8} {'wall':>8}" for _ in range(4)))
    try:
        for enc, integ in SUITES:
            for size in SIZES:
                plain = _sa(enc, integ)
                team.bind([plain])
                off = _sa(enc, integ)
                team.offload = pool
                team.bind([off])
                team.offload = None
                probe = _in_process(plain, size, 1)[1]
                batches = max(1, int(args.seconds / (probe * QUEUE_BATCH + 1e-9)))
                cells = [_median(args.runs, _in_process, plain, size, batches)]
                for b in (1, 8, 32):
                    pool.batch = b
                    cells.append(_median(args.runs, _offloaded, pool, off, size, batches))
                team.release([plain, off])
                name = enc if integ is None else f"{enc}+{integ}"
                print(f"{name:36} {size:>5} " + " ".join(
                    f"{c * 1e6:8.2f} {w * 1e6:8.2f}" for c, w in cells), flush=True)
    finally:
        pool.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
