"""Log lines that fit the journal: with stderr the journal's stream (``JOURNAL_STREAM``
matching it) each line carries its syslog priority and no timestamp; otherwise the time comes
first, with its UTC offset."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from labutil import env

from nfq_ipsec import journal, logsetup

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"

LOG_SOME = """
import logging, sys
from nfq_ipsec import logsetup
log = logsetup.setup("q100", "debug")
log.debug("a detail")
log.info("worker ready")
log.warning("worker died")
log.error("cannot install")
try:
    raise ValueError("boom")
except ValueError:
    log.critical("supervisor failed", exc_info=True)
"""


def stream_id(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def run_logging(tmp_path: Path, journal_stream: str | None, journal_socket: Path | None = None,
                code: str = LOG_SOME) -> list[str]:
    """``code`` in a process of its own, stderr to a file; its lines. The journal's socket is
    ``journal_socket``, by default one that does not exist (so the lines go to stderr)."""
    out = tmp_path / "stderr"
    out.touch()
    extra = {} if journal_stream is None else {"JOURNAL_STREAM": journal_stream}
    extra["NFQ_IPSEC_JOURNAL_SOCKET"] = str(journal_socket or tmp_path / "no-journal.sock")
    e = env(**extra)
    if journal_stream is None:
        e.pop("JOURNAL_STREAM", None)
    with out.open("w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, env=e, check=True, timeout=60)
    return out.read_text().splitlines()


def test_on_the_journal_lines_carry_their_priority_and_no_time(tmp_path: Path) -> None:
    (tmp_path / "stderr").touch()
    lines = run_logging(tmp_path, stream_id(tmp_path / "stderr"))
    assert lines[:5] == [
        "<7>nfq-ipsec[q100] DEBUG: a detail",
        "<6>nfq-ipsec[q100] INFO: worker ready",
        "<4>nfq-ipsec[q100] WARNING: worker died",
        "<3>nfq-ipsec[q100] ERROR: cannot install",
        "<2>nfq-ipsec[q100] CRITICAL: supervisor failed",
    ]
    traceback = lines[5:]
    assert traceback and all(line.startswith("<2>") for line in traceback), traceback
    assert traceback[-1] == "<2>ValueError: boom"


@pytest.mark.parametrize("journal_stream", [None, "1:2", "garbage", ""])
def test_elsewhere_lines_start_with_a_zoned_time(tmp_path: Path, journal_stream: str | None) -> None:
    lines = run_logging(tmp_path, journal_stream)
    assert re.fullmatch(STAMP + r" nfq-ipsec\[q100\] ERROR: cannot install", lines[3]), lines
    when = datetime.fromisoformat(lines[1].split()[0])
    assert when.tzinfo is not None
    assert abs(when.timestamp() - datetime.now().timestamp()) < 60
    assert not any(line.startswith("<") for line in lines)


@pytest.fixture
def restore_logger() -> Iterator[None]:
    logger = logging.getLogger(logsetup.LOGGER_NAME)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def test_the_journal_is_told_by_device_and_inode(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    with a.open("w") as fa:
        assert logsetup.is_journal(fa, {"JOURNAL_STREAM": stream_id(a)})
        assert not logsetup.is_journal(fa, {"JOURNAL_STREAM": stream_id(b)})
        assert not logsetup.is_journal(fa, {})
        assert not logsetup.is_journal(fa, {"JOURNAL_STREAM": stream_id(a) + "x"})


def test_priorities() -> None:
    assert [logsetup.syslog_priority(lv) for lv in (
        logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]


def test_setup_picks_the_form_by_its_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            restore_logger: None) -> None:
    path = tmp_path / "err"
    path.touch()
    with path.open("w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(path))
        monkeypatch.setenv("NFQ_IPSEC_JOURNAL_SOCKET", str(tmp_path / "none.sock"))
        logsetup.setup("supervisor").info("hello")
        monkeypatch.delenv("JOURNAL_STREAM")
        logsetup.setup("supervisor").info("again")
    lines = path.read_text().splitlines()
    assert lines[0] == "<6>nfq-ipsec[supervisor] INFO: hello"
    assert re.fullmatch(STAMP + r" nfq-ipsec\[supervisor\] INFO: again", lines[1]), lines


LOG_FIELDS = LOG_SOME + """
from nfq_ipsec import journal
log.warning("SA ab0 (spi 0x00001000): hard expired",
            extra=journal.fields(sa="ab0", spi=0x1000, reason="hard_expired"))
"""


def stand_in_journal(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def received(sock: socket.socket) -> list[dict[str, str]]:
    entries = []
    sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError):
        while True:
            entries.append(dict(journal.decode(sock.recv(1 << 20))))
    return entries


def test_on_the_journal_records_are_native_entries_with_fields(tmp_path: Path) -> None:
    """With stderr the journal's stream and its socket there (a stand-in listener on it), each
    record is one entry of the native protocol: its priority, our identifier, the process and
    queue, the SA's fields, a traceback inside its entry; nothing on stderr."""
    (tmp_path / "stderr").touch()
    sock = stand_in_journal(tmp_path / "journal.sock")
    try:
        lines = run_logging(tmp_path, stream_id(tmp_path / "stderr"), tmp_path / "journal.sock",
                            LOG_FIELDS)
        entries = received(sock)
    finally:
        sock.close()
    assert lines == []
    assert [(e["PRIORITY"], e["MESSAGE"].split("\n")[0]) for e in entries] == [
        ("7", "[q100] a detail"), ("6", "[q100] worker ready"), ("4", "[q100] worker died"),
        ("3", "[q100] cannot install"), ("2", "[q100] supervisor failed"),
        ("4", "[q100] SA ab0 (spi 0x00001000): hard expired")]
    assert all(e["SYSLOG_IDENTIFIER"] == "nfq-ipsec" and e["NFQ_PROCESS"] == "q100"
               and e["NFQ_QUEUE"] == "100" and "CODE_LINE" in e for e in entries)
    assert entries[4]["MESSAGE"].endswith("ValueError: boom")  # the traceback, in its entry
    assert "Traceback (most recent call last):" in entries[4]["MESSAGE"]
    last = entries[5]
    assert (last["NFQ_SA"], last["NFQ_SPI"], last["NFQ_REASON"]) == ("ab0", "0x00001000", "hard_expired")
    assert not any(k in entries[1] for k in ("NFQ_SA", "NFQ_SPI", "NFQ_REASON"))


def test_a_journal_that_cannot_take_an_entry_gets_it_on_stderr(tmp_path: Path,
                                                              restore_logger: None) -> None:
    """The journal's socket gone (or full): the record goes to stderr in the stream form,
    priority first, so it is not lost."""
    path = tmp_path / "err"
    path.touch()
    sock = stand_in_journal(tmp_path / "j.sock")
    with path.open("w") as f:
        environ = {"JOURNAL_STREAM": stream_id(path), "NFQ_IPSEC_JOURNAL_SOCKET": str(tmp_path / "j.sock")}
        handler = logsetup.handler("supervisor", f, environ)
        assert isinstance(handler, journal.JournalHandler)
        logger = logging.getLogger("test.journal.fallback")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("first")
        sock.close()
        (tmp_path / "j.sock").unlink()  # the journal is gone
        logger.warning("second")
        handler.close()
    assert path.read_text().splitlines() == ["<4>nfq-ipsec[supervisor] WARNING: second"]
    assert handler.failures == 1


def test_entries_encode_and_decode() -> None:
    items = [("MESSAGE", "two\nlines"), ("PRIORITY", "6"), ("NFQ_SA", "a=b"), ("EMPTY", "")]
    data = journal.encode(items)
    assert b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" in data  # binary-safe form
    assert b"NFQ_SA=a=b\n" in data
    assert journal.decode(data) == items
    for bad in ("_PID", "lower", "A-B", ""):
        with pytest.raises(ValueError):
            journal.encode([(bad, "x")])
    assert journal.fields(sa="x", spi=1, queue=7, reason="replay") == {journal.EXTRA: {
        "NFQ_SA": "x", "NFQ_SPI": "0x00000001", "NFQ_QUEUE": "7", "NFQ_REASON": "replay"}}


def test_a_compartments_worker_names_itself_and_its_queue(tmp_path: Path) -> None:
    """A compartment's worker is ``COMPARTMENT/q<N>``; the journal still gets its queue."""
    (tmp_path / "stderr").touch()
    sock = stand_in_journal(tmp_path / "journal.sock")
    try:
        lines = run_logging(tmp_path, stream_id(tmp_path / "stderr"), tmp_path / "journal.sock",
                            LOG_SOME.replace('setup("q100"', 'setup("web/q110"'))
        entries = received(sock)
    finally:
        sock.close()
    assert lines == [] and entries
    assert all(e["NFQ_PROCESS"] == "web/q110" and e["NFQ_QUEUE"] == "110"
               and e["MESSAGE"].startswith("[web/q110] ") for e in entries)
