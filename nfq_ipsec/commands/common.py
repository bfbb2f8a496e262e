"""What every command shares: loading the configuration it is given, problems reported."""

from __future__ import annotations

import sys

from ..config import load_config
from ..config.model import Config
from ..core.errors import ConfigError


def load_or_report(path: str, show_warnings: bool = True) -> Config | None:
    """Load a config; on problems print all of them to stderr and return None.

    Every command that takes ``--config`` reports a bad one through here, the same way."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        n = len(err.problems)
        print(f"nfq-ipsec: invalid configuration {path}: {n} problem{'s' if n != 1 else ''}:",
              file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    if show_warnings:
        for warning in cfg.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return cfg
