"""Fixtures shared by the root tests that run the real daemon (tests/labutil.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from labutil import Daemon


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts goes in here; each is stopped, and its workers killed by pid,
    when the test ends, however it ends."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.cleanup()
