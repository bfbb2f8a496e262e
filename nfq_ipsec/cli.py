"""The ``nfq-ipsec`` command's entry point (the console script and ``python -m nfq_ipsec.cli``).
The commands themselves are in :mod:`nfq_ipsec.commands`."""

from __future__ import annotations

import sys

from .commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
