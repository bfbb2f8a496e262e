"""Build: the ESP core (``nfq_ipsec/core``, the per-packet code) compiled by mypyc.

The source stays the Python that is read, tested and type-checked; mypyc turns the same typed
modules into a C extension (what it gains: the benchmark's gcm-source row; README, Performance).
``NFQ_IPSEC_PURE=1`` at build time installs the source only. Next to the
compiled modules goes a manifest with the sha256 of every source they were built from:
:mod:`nfq_ipsec.corebuild` runs the source instead whenever a source has changed since.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CORE = ROOT / "nfq_ipsec" / "core"


def _corebuild() -> ModuleType:
    """nfq_ipsec/corebuild.py alone (standard library only): the one list of compiled modules,
    the manifest's name and the switch, shared with the check that reads them at start-up."""
    spec = importlib.util.spec_from_file_location("_nfq_ipsec_corebuild", ROOT / "nfq_ipsec" / "corebuild.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


_BUILD = _corebuild()
MODULES: tuple[str, ...] = _BUILD.MODULES
MANIFEST = CORE / _BUILD.MANIFEST


def _ext_modules() -> list[object]:
    MANIFEST.unlink(missing_ok=True)
    if os.environ.get(_BUILD.PURE_ENV) == "1":
        return []
    from mypy.version import __version__ as mypy_version
    from mypyc.build import mypycify

    paths = [f"nfq_ipsec/core/{name}.py" for name in MODULES]
    old = os.getcwd()
    os.chdir(ROOT)  # mypycify takes paths relative to the project
    try:
        ext = mypycify(paths, opt_level="3", group_name="nfq_ipsec_core")
    finally:
        os.chdir(old)
    sources = {name: hashlib.sha256((CORE / f"{name}.py").read_bytes()).hexdigest() for name in MODULES}
    MANIFEST.write_text(json.dumps({"compiler": f"mypyc {mypy_version}", "sources": sources}, indent=1))
    return list(ext)


setup(ext_modules=_ext_modules())
