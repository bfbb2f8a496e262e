"""The compiled ESP core (setup.py, nfq_ipsec/corebuild.py): what runs, and the fallback.

The install compiles ``nfq_ipsec/core`` with mypyc. These tests check that the suite really runs
on the compiled build (unless ``NFQ_IPSEC_PURE=1`` asked for the source), that a stale build
is never run (the whole core comes from source instead), and that the source build passes the
core's own vector, framing, replay and SPD tests too: both builds are the product.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo import ROOT

import nfq_ipsec
from nfq_ipsec import corebuild
from nfq_ipsec.core import esp

PACKAGE = Path(nfq_ipsec.__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _fake_core(tmp_path: Path, compiled: bool = True) -> Path:
    core = tmp_path / "core"
    core.mkdir()
    sources = {}
    for name in corebuild.MODULES:
        (core / f"{name}.py").write_text(f"# {name}\n")
        sources[name] = hashlib.sha256(f"# {name}\n".encode()).hexdigest()
        if compiled:
            (core / f"{name}{SUFFIX}").write_bytes(b"")
    (core / corebuild.MANIFEST).write_text(json.dumps({"compiler": "mypyc 9.9", "sources": sources}))
    return core


def test_inspect_compiled_stale_incomplete_pure(tmp_path: Path) -> None:
    core = _fake_core(tmp_path)
    assert corebuild.inspect(core, {}) == corebuild.CoreBuild(True, "compiled (mypyc 9.9)")
    pure = corebuild.inspect(core, {corebuild.PURE_ENV: "1"})
    assert not pure.compiled and "NFQ_IPSEC_PURE=1" in pure.detail
    (core / "esp.py").write_text("# esp, edited\n")
    stale = corebuild.inspect(core, {})
    assert not stale.compiled and "stale" in stale.detail and "esp.py" in stale.detail
    assert "sa.py" not in stale.detail
    (core / "esp.py").write_text("# esp\n")
    (core / "sa.py").unlink()  # an install without sources: nothing to be stale against
    assert corebuild.inspect(core, {}).compiled
    (core / f"replay{SUFFIX}").unlink()
    incomplete = corebuild.inspect(core, {})
    assert not incomplete.compiled and "replay" in incomplete.detail
    (core / corebuild.MANIFEST).write_text("{not json")
    assert corebuild.inspect(core, {}) == corebuild.CoreBuild(False, "Python source (not compiled)")


def test_the_suite_runs_the_compiled_core() -> None:
    """CI installs with scripts/install-deps, which compiles: a build that silently fell back to
    the source would make every other test check the wrong thing."""
    if os.environ.get(corebuild.PURE_ENV) == "1":
        pytest.skip("NFQ_IPSEC_PURE=1: this run tests the Python source of the core on purpose")
    build = corebuild.running()
    assert build.compiled, f"the core is not compiled here: {build.detail} (run scripts/install-deps)"
    assert esp.__file__ is not None and esp.__file__.endswith(".so")


def _python(code: str, env: dict[str, str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


PROBE = ("import nfq_ipsec.core.esp as e, nfq_ipsec.core.processor as p\n"
         "from nfq_ipsec import corebuild\n"
         "print(e.__file__.endswith('.py'), p.__file__.endswith('.py'), corebuild.running().detail)")


def test_pure_env_loads_the_source() -> None:
    env = {**os.environ, corebuild.PURE_ENV: "1"}
    assert _python(PROBE, env, ROOT).split(" ", 2)[:2] == ["True", "True"]


def test_a_stale_build_runs_from_source(tmp_path: Path) -> None:
    """A copy of the installed package whose esp.py changed after the build: the whole core
    (not only esp) loads from source, and the build says why."""
    if not corebuild.running().compiled:
        pytest.skip("needs the compiled build (the source build has nothing to go stale)")
    copy = tmp_path / "site"
    shutil.copytree(PACKAGE, copy / "nfq_ipsec", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in PACKAGE.parent.glob("nfq_ipsec_core__mypyc*.so"):
        shutil.copy(lib, copy)
    env = {k: v for k, v in os.environ.items() if k != corebuild.PURE_ENV}
    env["PYTHONPATH"] = str(copy)
    fresh = _python(PROBE, env, copy)
    assert fresh.startswith("False False compiled"), fresh
    esp_py = copy / "nfq_ipsec" / "core" / "esp.py"
    esp_py.write_text(esp_py.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    stale = _python(PROBE + "\nimport nfq_ipsec.core.esp as e; print(e.EDITED_AFTER_THE_BUILD)", env, copy)
    assert stale.splitlines()[0].startswith("True True Python source (compiled build is stale: esp.py")
    assert stale.splitlines()[1] == "True"


def test_the_source_build_passes_the_core_tests() -> None:
    """The core's vector, framing, replay, SPD and fast-path tests, run again on the source;
    and the differential test, so the source core is held to the independent implementation
    too (the third version: the core's Python source, docs/versions.md)."""
    env = {**os.environ, corebuild.PURE_ENV: "1"}
    files = ["tests/unit/test_vectors.py", "tests/unit/test_esp.py", "tests/unit/test_replay.py",
             "tests/unit/test_spd_index.py", "tests/unit/test_fastpath.py", "tests/unit/test_properties.py",
             "tests/unit/test_differential.py"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


def test_version_names_the_core_build() -> None:
    res = subprocess.run([sys.executable, "-m", "nfq_ipsec.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"nfq-ipsec {nfq_ipsec.__version__}; ESP core: {corebuild.running().detail}"
