"""Lint and types are part of the suite (ruff and mypy strict must be clean), and the install
choices the suite runs under."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo import ROOT


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install the test extras (scripts/install-deps)")
    return path


def test_ruff_clean() -> None:
    res = subprocess.run(
        [_tool("ruff"), "check", "--output-format", "concise", "nfq_ipsec", "nfq_ipsec_lab", "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_clean() -> None:
    res = subprocess.run(
        [_tool("mypy"), "nfq_ipsec", "nfq_ipsec_lab", "tests"], cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_shell_scripts_shellcheck_clean() -> None:
    scripts = [p for p in (ROOT / "scripts").iterdir() if p.is_file() and p.read_bytes()[:2] == b"#!"]
    scripts.append(ROOT / ".ci" / "run")
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: run scripts/install-deps")
    shell = [str(p) for p in scripts if b"bash" in p.read_bytes().splitlines()[0]]
    res = subprocess.run([shellcheck, *shell], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tests_run_on_the_interpreter_install_deps_picks() -> None:
    """scripts/install-deps builds the virtualenv from the distribution's /usr/bin/python3 when
    it is 3.11 or newer (a faster build than a plain shared-library one: README, Performance)."""
    if os.environ.get("NFQ_IPSEC_PYTHON"):
        pytest.skip("NFQ_IPSEC_PYTHON chose the interpreter")
    if sys.prefix == sys.base_prefix:
        pytest.fail("the tests are not running in the virtualenv scripts/install-deps makes")
    system = Path("/usr/bin/python3")
    res = subprocess.run([str(system), "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
                         capture_output=True, text=True) if system.exists() else None
    if res is None or res.stdout.strip() != "True":
        pytest.skip("no /usr/bin/python3 of 3.11 or newer with venv: install-deps takes python3 from PATH")
    assert os.path.realpath(sys._base_executable) == os.path.realpath(system)  # type: ignore[attr-defined]


def test_the_product_has_no_fault_injection_code() -> None:
    """Faults are injected by the tests from outside (tests/faults), never by branches in the
    code that runs in production."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "nfq_ipsec").rglob("*.py")
                 if "NFQ_IPSEC_TEST_FAULT" in p.read_text() or "fault injection" in p.read_text()]
    assert offenders == []
