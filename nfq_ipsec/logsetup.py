"""Logging for the daemon's processes: one line per event, prefixed ``nfq-ipsec[WHO]``.

WHO is ``supervisor`` or the queue a worker serves (``q100``). Lines go to stderr (the journal
under systemd). Nothing here ever formats configuration dicts or key material: callers log
names, SPIs, queue numbers and counters only.
"""

from __future__ import annotations

import logging
import sys

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

LOGGER_NAME = "nfq_ipsec"


def setup(who: str, level: str = "info") -> logging.Logger:
    """Configure the process's ``nfq_ipsec`` logger once and return it."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s nfq-ipsec[{who}] %(levelname)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S",
    ))
    logger.addHandler(handler)
    logger.setLevel(LEVELS.get(level.lower(), logging.INFO))
    logger.propagate = False
    return logger
