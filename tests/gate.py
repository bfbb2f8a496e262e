"""The one way a test says what it needs from the machine.

Tests under tests/root/ need root; tests under tests/lab/ build a namespace lab and need its
tools too (conftest.py marks them by folder, and a single test elsewhere can carry
``@pytest.mark.root``). Where that is missing, such a test skips, naming what is missing; under
CI=true it fails instead, so that CI never passes without running it.
"""

from __future__ import annotations

import os
import shutil

import pytest

ROOT_TOOLS = ("ip", "iptables", "iptables-save")
LAB_TOOLS = ("tcpdump", "iperf3", "ss", "sysctl", "tshark")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def root_problems() -> list[str]:
    problems = [] if os.geteuid() == 0 else ["needs root (network namespaces, iptables, chown)"]
    return problems + _missing(ROOT_TOOLS)


def lab_problems() -> list[str]:
    return root_problems() + _missing(LAB_TOOLS)


def _missing(tools: tuple[str, ...]) -> list[str]:
    return [f"{t} is not installed (scripts/install-deps installs it)" for t in tools
            if shutil.which(t) is None]


def require(problems: list[str], what: str = "this test") -> None:
    """Skip when ``problems`` is not empty, or fail under CI=true."""
    if not problems:
        return
    message = f"{what} can't run here: " + "; ".join(problems)
    if in_ci():
        pytest.fail(message + " (CI=true: every test must run)")
    pytest.skip(message)


def tool(name: str, package: str) -> str:
    """The path of command ``name``; skips (or fails under CI=true) where it is missing."""
    path = shutil.which(name)
    if path is None:
        require([f"{name} is not installed (Debian package {package!r}; scripts/install-deps "
                 "installs it)"])
        raise AssertionError("not reached: require() skips or fails")
    return path
