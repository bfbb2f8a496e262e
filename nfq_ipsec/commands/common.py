"""What every command shares: loading the configuration it is given, problems reported."""

from __future__ import annotations

import os
import sys

from ..config import load_config
from ..config.model import Config
from ..core.errors import ConfigError


def write_secret_file(path: str | os.PathLike[str], text: str, who: str, what: str) -> bool:
    """Write ``text`` to ``path``, a new file that is mode 0600 from its creation (no moment in
    which another user could read it, unlike a redirect followed by chmod), never an existing
    one. False, with the reason on stderr (``who``: the command; ``what``: the kind of file),
    if it can't."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"{who}: {path} exists; {what} is never overwritten (remove it first)", file=sys.stderr)
        return False
    except OSError as err:
        print(f"{who}: {path}: {err.strerror}", file=sys.stderr)
        return False
    os.fchmod(fd, 0o600)  # whatever the umask said
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


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
