"""The lab extra's commands, as ``nfq-ipsec`` runs them: ``nfq-ipsec lab ...`` and
``nfq-ipsec bench ...``.

``nfq-ipsec`` (the runtime, :mod:`nfq_ipsec.cli`) does not import this package: it finds these
functions by name in the entry-point group ``nfq_ipsec.commands`` (pyproject.toml) and calls
them with the rest of its command line. Each parses its own options and returns the exit
status. Building the parsers stays cheap: the work is imported only once an option is parsed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def lab_parser() -> argparse.ArgumentParser:
    from .lab import add_arguments

    parser = argparse.ArgumentParser(prog="nfq-ipsec lab")
    add_arguments(parser)
    return parser


def bench_parser() -> argparse.ArgumentParser:
    from .bench import add_arguments

    parser = argparse.ArgumentParser(prog="nfq-ipsec bench")
    add_arguments(parser)
    return parser


def lab(argv: Sequence[str]) -> int:
    """``nfq-ipsec lab demo [--topology host|gateway|host6|gateway6] [--encryption ALG] [--queues N]
    [--keep]``."""
    from .lab import cli_lab

    return cli_lab(lab_parser().parse_args(list(argv)))


def bench(argv: Sequence[str]) -> int:
    """``nfq-ipsec bench [--quick] [--rows LIST] ...``: exit 0, 1 (a row failed), 2 (usage),
    75 (another benchmark is running), 130 (interrupted)."""
    from .bench import cli_bench

    return cli_bench(bench_parser().parse_args(list(argv)))
