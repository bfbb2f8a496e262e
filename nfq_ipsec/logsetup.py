"""Logging for the daemon's processes: one line per event, prefixed ``nfq-ipsec[WHO]``.

WHO is ``supervisor`` or the queue a worker serves (``q100``). Lines go to stderr, in one of
two forms:

- stderr is the journal (systemd sets ``JOURNAL_STREAM`` to the ``device:inode`` of the stream
  it connects to stderr, and stderr still is that stream): each record goes to the journal
  natively, with its priority and fields (``journal``). If the journal's socket can't take
  it, the record goes to stderr instead, with no timestamp of our own (the journal has one),
  each line starting with its syslog priority as sd-daemon(3) has it, ``<3>`` error, ``<4>``
  warning, ``<6>`` info, ``<7>`` debug (``<2>`` critical), so ``journalctl -p err`` still
  finds our errors. Every line of a multi-line record (a traceback) carries the prefix, since
  the journal makes each line of its stream an entry of its own;
- anything else (a terminal, a file, a pipe): the time first, ISO 8601 with milliseconds and
  the UTC offset (``2026-12-03T10:13:00.125+00:00``).

Workers inherit stderr and the environment, so they decide the same way. Nothing here ever
formats configuration dicts or key material: callers log names, SPIs, queue numbers and
counters only.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from typing import TextIO

from . import journal

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

LOGGER_NAME = "nfq_ipsec"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon's ``SD_ERR`` and friends)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal's stream that systemd connected it to:
    ``$JOURNAL_STREAM`` is ``device:inode`` and matches the stream's file."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no file behind it
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """No timestamp; every line prefixed with the record's syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class LocalTimeFormatter(logging.Formatter):
    """The time in ISO 8601 with milliseconds and the UTC offset."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def formatter(who: str, stream: TextIO, environ: dict[str, str] | None = None) -> logging.Formatter:
    if is_journal(stream, environ):
        return JournalFormatter(f"nfq-ipsec[{who}] %(levelname)s: %(message)s")
    return LocalTimeFormatter(f"%(asctime)s nfq-ipsec[{who}] %(levelname)s: %(message)s")


def handler(who: str, stream: TextIO, environ: dict[str, str] | None = None) -> logging.Handler:
    """Where the process's lines go: the journal's socket, with fields (``journal``), when
    ``stream`` is the journal's stream; otherwise ``stream``, formatted as above."""
    fmt = formatter(who, stream, environ)
    if is_journal(stream, environ):
        tail = who.rsplit("/", 1)[-1]  # a compartment's worker: COMPARTMENT/q<N>
        queue = int(tail[1:]) if tail[:1] == "q" and tail[1:].isdigit() else None
        try:
            return journal.JournalHandler(who, syslog_priority, fmt, stream,
                                          journal.socket_path(environ), queue)
        except OSError:  # no socket to be had: the stream form, which the journal takes too
            pass
    out = logging.StreamHandler(stream)
    out.setFormatter(fmt)
    return out


def setup(who: str, level: str = "info") -> logging.Logger:
    """Configure the process's ``nfq_ipsec`` logger once and return it."""
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler(who, sys.stderr))
    logger.setLevel(LEVELS.get(level.lower(), logging.INFO))
    logger.propagate = False
    return logger
