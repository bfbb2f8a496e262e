"""Which build of the ESP core runs: compiled by mypyc, or the Python source.

The install (``setup.py``) compiles the core's modules with mypyc: the same typed source, run
as a C extension. The compiled modules sit next to their sources with a manifest of the sha256
of each source they were built from. If any source differs from its manifest entry (an edit or
a checkout since the build), the compiled modules are stale and the whole core runs from
source instead, never a mix: compiled modules call each other directly, so one stale module
would run old code inside new. ``NFQ_IPSEC_PURE=1`` asks for the source on purpose.

:func:`choose` runs once, from ``nfq_ipsec/__init__.py``, before any core module is imported.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# The compiled modules (setup.py reads this list from here). The core's __init__ and pickling
# stay Python: nothing per packet runs in them.
MODULES = ("errors", "packet", "ipv6", "replay", "suites", "udpencap", "sa", "sad", "spd", "esp", "esp6",
           "pmtu", "gso", "processor")
MANIFEST = "_compiled.json"
PURE_ENV = "NFQ_IPSEC_PURE"
_CORE = Path(__file__).resolve().parent / "core"


@dataclass(frozen=True)
class CoreBuild:
    compiled: bool
    detail: str  # what runs and why, for version, status and the benchmark's machine info

    def __str__(self) -> str:
        return self.detail


def _compiled_files(core: Path) -> list[Path]:
    return [core / f"{name}{suffix}" for name in MODULES for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (core / f"{name}{suffix}").exists()]


def _source_hash(path: Path) -> str | None:
    """sha256 of a source, or None where an install shipped none (nothing to be stale against)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def inspect(core: Path = _CORE, environ: dict[str, str] | None = None) -> CoreBuild:
    """Decide, without importing anything, whether the compiled core may run."""
    env = os.environ if environ is None else environ
    if env.get(PURE_ENV) == "1":
        return CoreBuild(False, f"Python source ({PURE_ENV}=1)")
    try:
        manifest = json.loads((core / MANIFEST).read_text(encoding="utf-8"))
        sources: dict[str, str] = manifest["sources"]
        compiler = str(manifest["compiler"])
    except (OSError, ValueError, KeyError, TypeError):
        return CoreBuild(False, "Python source (not compiled)")
    have = {p.name.split(".", 1)[0] for p in _compiled_files(core)}
    missing = [name for name in MODULES if name not in have or name not in sources]
    if missing:
        return CoreBuild(False, f"Python source (compiled build incomplete: {', '.join(missing)})")
    changed = [name for name in MODULES if _source_hash(core / f"{name}.py") not in (sources[name], None)]
    if changed:
        return CoreBuild(False, "Python source (compiled build is stale: "
                         f"{', '.join(n + '.py' for n in changed)} changed since; reinstall)")
    return CoreBuild(True, f"compiled ({compiler})")


class _SourceFinder:
    """Finds the core's modules as their ``.py`` sources, ahead of compiled ones beside them."""

    def __init__(self, core: Path) -> None:
        self.core = core

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != "nfq_ipsec.core" or name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, self.core / f"{name}.py")


BUILD: CoreBuild | None = None


def choose() -> CoreBuild:
    """Settle, once per process, which build of the core the imports below will load."""
    global BUILD
    if BUILD is None:
        BUILD = inspect()
        if not BUILD.compiled and _compiled_files(_CORE):
            sys.meta_path.insert(0, _SourceFinder(_CORE))
    return BUILD


def running() -> CoreBuild:
    """What actually got loaded (compiled modules are extension modules)."""
    build = choose()
    module = sys.modules.get("nfq_ipsec.core.esp")
    if module is not None:
        loaded = not str(getattr(module, "__file__", "")).endswith(".py")
        if loaded != build.compiled:  # pragma: no cover - would mean the finder failed
            return CoreBuild(loaded, f"{'compiled' if loaded else 'Python source'} (unexpected)")
    return build
