"""Folders decide what a test needs (tests/gate.py), and fixtures shared by the root tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gate
import pytest
from labutil import Daemon

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0]
        if folder in ("root", "lab"):
            item.add_marker(pytest.mark.root)
        if folder == "lab":
            item.add_marker(pytest.mark.lab)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is not None:
        gate.require(gate.lab_problems(), "the lab")
    elif item.get_closest_marker("root") is not None:
        gate.require(gate.root_problems())


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts goes in here; each is stopped, and its workers killed by pid,
    when the test ends, however it ends."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.cleanup()
