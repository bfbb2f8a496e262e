"""Logging straight to the systemd journal, with fields: its native protocol, by hand.

Under systemd (stderr is the journal's stream, ``logsetup.is_journal``) each log record goes
to the journal's socket as one datagram of ``KEY=value`` lines (systemd's "Native Journal
Protocol"; a value holding a newline goes as ``KEY``, newline, its length as a little-endian
64-bit number, the bytes, newline). So an entry has its priority (``journalctl -p err``), no
second timestamp, a traceback in one entry rather than one per line, and fields to filter on:

- ``NFQ_PROCESS``: ``supervisor``, ``agent`` or a worker's ``q<queue>`` (a compartment's
  worker: ``COMPARTMENT/q<queue>``);
- ``NFQ_QUEUE``: the queue (a worker's own, or the worker a supervisor line is about);
- ``NFQ_SA``, ``NFQ_SPI`` (``0x`` and 8 hex digits), ``NFQ_REASON`` (a drop reason or SA event):
  where the line is about one SA or one dropped packet.

``journalctl -u nfq-ipsec@site NFQ_SPI=0x00002000`` finds every line about that SPI;
``NFQ_REASON=integrity`` every integrity drop the drop log wrote. Callers add fields with
``extra=journal.fields(sa=..., spi=..., reason=...)``; on a terminal they change nothing.

The socket is made when logging is set up, before a worker's sandbox forbids making sockets,
and is never connected: each entry is a ``sendto`` to the journal's path, so a restarted
journal is reached again. If the journal can't take an entry (no socket, full, too large), the
entry goes to stderr as the stream form would write it (priority prefix, ``logsetup``), never
nowhere. Nothing here ever sees key material: callers log names, SPIs, queues and counters.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TextIO

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "nfq-ipsec"
EXTRA = "nfq_fields"  # the LogRecord attribute that carries a line's own fields
MAX_MESSAGE = 60_000  # bytes of MESSAGE in one datagram (the rest is cut, and says so)
_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")
_PLAIN = logging.Formatter()


def fields(*, sa: str | None = None, spi: int | None = None, queue: int | None = None,
           reason: str | None = None) -> dict[str, dict[str, str]]:
    """``extra=`` for a log call: the journal fields of what the line is about."""
    out: dict[str, str] = {}
    if sa is not None:
        out["NFQ_SA"] = sa
    if spi is not None:
        out["NFQ_SPI"] = f"0x{spi:08x}"
    if queue is not None:
        out["NFQ_QUEUE"] = str(queue)
    if reason is not None:
        out["NFQ_REASON"] = reason
    return {EXTRA: out}


def encode(items: Iterable[tuple[str, str]]) -> bytes:
    """One journal entry in the native protocol. Names must be upper case, digits and ``_``,
    not starting with ``_`` (those are the journal's own trusted fields)."""
    out = bytearray()
    for name, value in items:
        if not _NAME.match(name):
            raise ValueError(f"not a journal field name: {name!r}")
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def decode(datagram: bytes) -> list[tuple[str, str]]:
    """The fields of one entry (for the tests' stand-in journal, and to read back a capture)."""
    items: list[tuple[str, str]] = []
    i = 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", datagram, end + 1)
            start = end + 9
            value = datagram[start:start + size]
            if datagram[start + size:start + size + 1] != b"\n":
                raise ValueError("a binary field not ended by a newline")
            i = start + size + 1
        items.append((name.decode(), value.decode("utf-8", "replace")))
    return items


class JournalHandler(logging.Handler):
    """Each record as one journal entry, its ``PRIORITY`` from ``priority(levelno)``; when the
    journal can't take it, the record as ``fallback_format`` writes it, on ``fallback``."""

    def __init__(self, who: str, priority: Callable[[int], int], fallback_format: logging.Formatter,
                 fallback: TextIO | None = None, path: str = SOCKET, queue: int | None = None) -> None:
        super().__init__()
        self.who = who
        self.priority = priority
        self.fallback_format = fallback_format
        self.path = path
        self.queue = queue
        self.fallback = fallback if fallback is not None else sys.stderr
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)  # a full journal costs an entry on stderr, never a wait
        self.failures = 0

    def entry(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + _PLAIN.formatException(record.exc_info)
        data = message.encode("utf-8", "replace")
        if len(data) > MAX_MESSAGE:
            message = data[:MAX_MESSAGE].decode("utf-8", "ignore") + " [cut]"
        items = [("MESSAGE", f"[{self.who}] {message}"),
                 ("PRIORITY", str(self.priority(record.levelno))),
                 ("SYSLOG_IDENTIFIER", IDENTIFIER),
                 ("NFQ_PROCESS", self.who),
                 ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)),
                 ("CODE_FUNC", record.funcName), ("LOGGER", record.name)]
        own: Mapping[str, str] = getattr(record, EXTRA, None) or {}
        if self.queue is not None and "NFQ_QUEUE" not in own:
            items.append(("NFQ_QUEUE", str(self.queue)))
        items.extend(sorted(own.items()))
        return items

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode(self.entry(record))
        except Exception:
            self.handleError(record)
            return
        try:
            self.sock.sendto(datagram, self.path)
        except OSError:
            self.failures += 1
            self._to_stderr(record)

    def _to_stderr(self, record: logging.LogRecord) -> None:
        try:
            self.fallback.write(self.fallback_format.format(record) + "\n")
            self.fallback.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The journal's socket: systemd's fixed path (``NFQ_IPSEC_JOURNAL_SOCKET`` overrides it,
    for a stand-in journal in tests)."""
    env = os.environ if environ is None else environ
    return env.get("NFQ_IPSEC_JOURNAL_SOCKET", SOCKET)
