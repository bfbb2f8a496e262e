"""Log lines that fit the journal: with stderr the journal's stream (``JOURNAL_STREAM``
matching it) each line carries its syslog priority and no timestamp; otherwise the time comes
first, with its UTC offset."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from labutil import env

from nfq_ipsec import logsetup

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


def run_logging(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """LOG_SOME in a process of its own, stderr to a file; its lines."""
    out = tmp_path / "stderr"
    out.touch()
    extra = {} if journal_stream is None else {"JOURNAL_STREAM": journal_stream}
    e = env(**extra)
    if journal_stream is None:
        e.pop("JOURNAL_STREAM", None)
    with out.open("w") as f:
        subprocess.run([sys.executable, "-c", LOG_SOME], stderr=f, env=e, check=True, timeout=60)
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
        logsetup.setup("supervisor").info("hello")
        monkeypatch.delenv("JOURNAL_STREAM")
        logsetup.setup("supervisor").info("again")
    lines = path.read_text().splitlines()
    assert lines[0] == "<6>nfq-ipsec[supervisor] INFO: hello"
    assert re.fullmatch(STAMP + r" nfq-ipsec\[supervisor\] INFO: again", lines[1]), lines
