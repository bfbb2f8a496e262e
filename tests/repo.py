"""Where things are in the checkout the tests run from, and the fuzz campaign's script, whose
targets and seeds some properties share."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "nfq_ipsec" / "examples"
VECTORS = ROOT / "nfq_ipsec" / "engines" / "vectors"


@cache
def fuzz_script() -> Any:
    """``scripts/fuzz.py``, loaded once (it is a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("fuzz_script", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
