"""``nfq-ipsec peer-config``: the other end's configuration, mirrored from this one's
(:mod:`nfq_ipsec.config.mirror` says what swaps and what stays)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from .. import exitcodes, hardening
from ..config import parse_config
from ..config.loader import MAX_CONFIG_FILE
from ..config.mirror import mirror
from ..config.tomlout import dumps
from ..core.errors import ConfigError
from .common import load_or_report, write_secret_file


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("peer-config", help="write the peer's configuration, mirrored from this one",
                       description="Write the other end's configuration: the same SPIs, keys and "
                       "algorithms with in and out swapped, and the selectors, tunnel ends and "
                       "IKE addresses seen from the other side. It is checked as the peer's "
                       "daemon would check it before it is written.")
    p.add_argument("-c", "--config", required=True, help="this side's configuration")
    p.add_argument("-o", "--out", metavar="FILE",
                   help="write it to FILE, a new file created 0600 (default: print it)")
    p.add_argument("--interface", help="the peer's unprotected interface (default: this side's)")


def run(args: argparse.Namespace) -> int:
    """0: written (or printed); 2: this configuration, or the mirror, has problems; 1: the
    file could not be written (or exists)."""
    if load_or_report(args.config, show_warnings=False) is None:
        return exitcodes.CONFIG
    source = Path(args.config).absolute()
    out = Path(args.out).absolute() if args.out else None
    data = tomllib.loads(hardening.read_checked(source, MAX_CONFIG_FILE).decode("utf-8"))
    result = mirror(data, source, out, args.interface)
    try:
        parse_config(result.document, base_dir=(out or source).parent, path=out)
    except ConfigError as err:  # a mirror this side's daemon takes but the peer's would not
        print(f"nfq-ipsec: the peer's configuration would not be valid "
              f"({len(err.problems)} problem(s)); nothing written:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return exitcodes.CONFIG
    sas = [sa for sa in result.document.get("sa", []) if isinstance(sa, dict)]
    secrets = []
    if any("key" in sa or "integrity_key" in sa for sa in sas):
        secrets.append("It holds keys: move it as a secret (mode 0600, scp -p), never in clear.")
    if any("key_file" in sa or "integrity_key_file" in sa for sa in sas):
        secrets.append("Its key files are this side's: copy them along as secrets (mode 0600).")
    header = [f"The peer of {source.name}, written by nfq-ipsec peer-config: the same SAs (SPIs,",
              "keys, algorithms) with in and out swapped, selectors seen from this end.",
              *secrets, *(f"CHECK: {note}" for note in result.notes)]
    text = dumps(result.document, header)
    if out is None:
        sys.stdout.write(text)
        return exitcodes.OK
    if not write_secret_file(out, text, "peer-config", "a configuration"):
        return exitcodes.FAILURE
    print(f"peer-config: wrote {out} (mode 0600)")
    for note in result.notes:
        print(f"check: {note}")
    return exitcodes.OK
