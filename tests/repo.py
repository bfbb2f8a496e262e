"""Where things are in the checkout the tests run from."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "nfq_ipsec" / "examples"
VECTORS = ROOT / "tests" / "vectors"
