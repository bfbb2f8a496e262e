"""Build: the ESP core (``nfq_ipsec/core``, the per-packet code) compiled by mypyc.

The source stays the Python that is read, tested and type-checked; mypyc turns the same typed
modules into a C extension (measured: 0.76x the workers' CPU per GB and 1.31x the throughput;
README, Performance). ``NFQ_IPSEC_PURE=1`` at build time installs the source only. Next to the
compiled modules goes a manifest with the sha256 of every source they were built from:
:mod:`nfq_ipsec.corebuild` runs the source instead whenever a source has changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CORE = ROOT / "nfq_ipsec" / "core"
MODULES = ("errors", "packet", "replay", "suites", "sa", "sad", "spd", "esp", "processor")  # = corebuild
MANIFEST = CORE / "_compiled.json"


def _ext_modules() -> list[object]:
    MANIFEST.unlink(missing_ok=True)
    if os.environ.get("NFQ_IPSEC_PURE") == "1":
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
