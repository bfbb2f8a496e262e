"""``nfq-ipsec bench`` (``scripts/bench``): the performance benchmark, everything in one run.

A script, not a timed test: it builds the namespace lab for each row, measures it several
times and compares the rows with each other inside the same run (the machine is shared and
noisy, so absolute numbers from different runs don't compare; ratios from one run do). By
default the repetitions are interleaved: round after round, every row's test bed is built, run
once and torn down, so a machine that slows down or speeds up over the minutes of a run (these
shared VMs do, by up to a factor of 1.5) does so for every row alike.

Rows (``--rows``; see :mod:`nfq_ipsec_lab.bench.beds`): plain veth without rules; NFQUEUE
accept-only through our binding and worker loop (the redirect ceiling); the floor under ESP
(accept-only with a verdict that carries the packet, and with an AES-GCM seal of every packet
first); the daemon in transport mode with AES-GCM-128 (also over IPv6, in UDP, and with its
core run from source), ChaCha20-Poly1305 and AES-CBC-128 + HMAC-SHA-256; tunnel mode with
AES-GCM-128 through the gateway topology; and, when Debian's strongSwan packages are installed,
two strongSwan 5.9 charons with kernel-libipsec as the reference for another userspace ESP.
The queued rows run once per ``--queues`` value (default 1 and 2).

Columns (:mod:`nfq_ipsec_lab.bench.measure`): one TCP flow and eight TCP flows (iperf3, Mbit/s),
64-byte UDP datagrams delivered per second (iperf3 ``-u -l 64 -b 0``), ping RTT p50/p99, CPU
seconds per GB moved (data-plane processes, and the whole machine), each as the median with
min-max over the repetitions, and the ratios to plain and to accept-only.

Output (:mod:`nfq_ipsec_lab.bench.report`): the table on the terminal (and as .txt), a JSON file
with every raw figure, the settings and the machine (CPU model, cores, kernel, versions), and a
PNG chart, all in ``--out`` (default ``bench-results/``, which git ignores).

This module holds only the command line (``nfq-ipsec bench`` runs it through
:mod:`nfq_ipsec_lab.cli`), so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

STRONGSWAN_APT = "apt-get install strongswan-charon libcharon-extra-plugins strongswan-swanctl"
ROW_KEYS = ("plain", "accept", "accept-gso", "accept-payload", "accept-gcm", "gcm", "gcm-gso",
            "gcm-source", "gcm6", "gcm-udp", "gcm-poll", "gcm-float", "gcm-nosandbox",
            "gcm-all2", "gcm-all3", "gcm-sample", "gcm-majority", "chacha",
            "cbc",
            "gcm-pycryptodome", "chacha-sodium", "chacha-pycryptodome", "cbc-pycryptodome",
            "gcm-balance", "gcm-afalg", "gcm256", "gcm256-sodium", "gcm256-pycryptodome",
            "chacha-afalg", "chacha-balance", "gcm-offload", "cbc-offload", "tunnel-gcm",
            "strongswan")  # = beds

EPILOG = f"""\
rows: plain (veth, no rules), accept (NFQUEUE accept-only: the redirect ceiling), accept-gso
(accept-only, 1 queue, bound with the GSO flag: TCP superpackets whole, the ceiling of
daemon.gso), gcm-gso (gcm, 1 queue, daemon.gso: superpackets cut, sealed and sent in batches),
accept-payload (accept-only, each verdict carrying the packet back), accept-gcm (the same, each
packet first sealed with AES-GCM-128: the floor under any ESP worker), gcm, chacha, cbc (the
daemon, transport mode), gcm-source (gcm, 1 queue, with the ESP core run from source
instead of compiled), gcm6 (gcm, 1 queue, over IPv6), gcm-udp (gcm, 1 queue, ESP in UDP
4500), gcm-nosandbox (gcm, 1 queue, daemon.sandbox = "off": the sandbox's cost), gcm-all2,
gcm-all3, gcm-sample, gcm-majority (gcm, 1 queue, N-version ESP: daemon.compare = all over
core and independent, all over those and core-source, sample:100 over two, majority over
three),
gcm-pycryptodome, chacha-sodium, chacha-pycryptodome, cbc-pycryptodome (the row, 1
queue, its SAs on that crypto engine), gcm-balance (gcm, 1 queue, crypto.policy balance),
gcm256 (AES-GCM-256 on the default engine, 1 queue), gcm256-sodium, gcm256-pycryptodome,
gcm-afalg, chacha-afalg (the row, 1 queue, its SAs on that engine; skipped, naming why,
where the engine is absent), chacha-balance, gcm-offload, cbc-offload (the row, 1 queue,
crypto.offload_helpers = 1: the outbound seals done by a helper process per worker),
tunnel-gcm (the daemon, gateway topology, tunnel mode),
strongswan (two strongSwan 5.9 charons with kernel-libipsec; ESP in UDP 4500). The strongSwan
row needs Debian's packages, which nfq-ipsec does not install:

  {STRONGSWAN_APT}

Default run: every row, 1 and 2 queues, 3 interleaved rounds of 2-second iperf3 runs: about
15 minutes.
--quick: every row too, 1 repetition of 1-second runs, 10 pings: about 3 minutes. Needs
root. Never run two benchmarks at once (a second one exits with status 75), and expect noise
when other work runs on the machine: the table warns when it was busy. Exit status: 0 every
row measured, 1 a row failed (the others are still reported), 2 usage, 75 another benchmark is
running, 130 Ctrl-C.
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not 1 <= v <= 16 for v in values):
        raise argparse.ArgumentTypeError("queue counts are 1..16")
    return sorted(set(values))


def key_list(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated choice among ``known``, returned in ``known``'s
    order (the table's), each once."""
    def parse(text: str) -> list[str]:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        unknown = [k for k in keys if k not in known]
        if unknown or not keys:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown) or text!r}; "
                                             f"known: {', '.join(known)}")
        return [k for k in known if k in keys]

    return parse


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be above 0")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Benchmark in one run: plain veth, NFQUEUE accept-only, the daemon's ESP rows "
                     "and strongSwan's userspace ESP; table, JSON and PNG. Needs root.")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, 1-second iperf3 runs, 10 pings (unless given explicitly)")
    p.add_argument("--rows", type=key_list(ROW_KEYS, "row"), default=None, metavar="LIST",
                   help=f"comma-separated rows to run (default: all: {','.join(ROW_KEYS)})")
    p.add_argument("--queues", type=_int_list, default=None, metavar="LIST",
                   help="queue counts per peer for the queued rows (default 1,2)")
    p.add_argument("--repetitions", type=positive(int), default=None, metavar="N",
                   help="repetitions per row (default 3)")
    p.add_argument("--seconds", type=positive(float), default=None, metavar="S",
                   help="length of each iperf3 run (default 2)")
    p.add_argument("--pings", type=positive(int), default=None, metavar="N",
                   help="pings per repetition, 0.1 s apart (default 20)")
    p.add_argument("--order", choices=("interleaved", "rows"), default="interleaved",
                   help="interleaved: one repetition of every row per round, the test beds built "
                   "anew each round, so the machine's drift weighs on all rows alike (default); "
                   "rows: each row's repetitions one after another on one build")
    p.add_argument("--cpu-layout", choices=("spread", "same"), default="spread",
                   help="spread: peer b's queue i on the CPU after peer a's (default); same: both "
                   "peers queue i on CPU i (the daemon's default)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                   help="where the JSON, PNG and table go (default bench-results/)")
    p.add_argument("--name", default=None, metavar="STEM",
                   help="file name stem (default bench-YYYYmmdd-HHMMSS)")
    p.add_argument("--busy-warn", type=float, default=0.25, metavar="FRACTION",
                   help="warn when this share of the CPUs is busy outside the benchmark (default 0.25)")


def cli_bench(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    from .runner import Settings, run_bench

    quick = bool(args.quick)
    settings = Settings(
        rows=args.rows or list(ROW_KEYS),
        queues=args.queues or [1, 2],
        repetitions=args.repetitions or (1 if quick else 3),
        seconds=float(args.seconds or (1.0 if quick else 2.0)),
        pings=args.pings or (10 if quick else 20),
        cpu_layout=args.cpu_layout,
        order=args.order,
        out=args.out,
        name=args.name,
        busy_warn=args.busy_warn,
        quick=quick,
        argv=list(argv if argv is not None else sys.argv),
    )
    return run_bench(settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    return cli_bench(args, ["python", "-m", "nfq_ipsec_lab.bench", *given])
