"""The ESP core's Python source as a package of its own, ``nfq_ipsec.core_as_source``, beside the
compiled core in one process: the third ESP version ``core-source`` (docs/versions.md).

The compiled core and its source share module names (``nfq_ipsec.core.esp``...), so one
process can import only one of them under those names (:mod:`nfq_ipsec.corebuild`). The
core's modules import each other relatively only (``from . import ipv6``, ``from .sa import
...``; ``tests/unit/test_coresource.py`` checks), so the same ``.py`` files loaded under another
package name form a second, complete core: a finder maps ``nfq_ipsec.core_as_source.X`` to
``nfq_ipsec/core/X.py`` and loads the source, never the extension module beside it. The two
share no class: the source's ``Mode.TUNNEL`` is not the compiled one's, so configuration
objects are carried over by :func:`translate` (pickled, and unpickled with the source's classes).

Same source, different compiler: a bug of mypyc (or of the compiled build's assumptions about
types) shows as a disagreement; a bug in the source itself is shared and only the independent
version can catch it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

PACKAGE: Final = "nfq_ipsec.core_as_source"
_CORE: Final = Path(__file__).resolve().parent / "core"
_COMPILED_NAME: Final = "nfq_ipsec.core"


class _Finder:
    """Finds ``nfq_ipsec.core_as_source`` and its modules as the core's ``.py`` sources."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == PACKAGE:
            return importlib.util.spec_from_file_location(
                fullname, _CORE / "__init__.py", submodule_search_locations=[])
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or not (_CORE / f"{name}.py").is_file():
            return None
        loader = importlib.machinery.SourceFileLoader(fullname, str(_CORE / f"{name}.py"))
        return importlib.util.spec_from_file_location(fullname, _CORE / f"{name}.py", loader=loader)


_FINDER: Final = _Finder()


def load() -> ModuleType:
    """The source core as ``nfq_ipsec.core_as_source`` (imported once per process; a worker does
    it before its sandbox, which opens no file afterwards)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    module = importlib.import_module(PACKAGE)
    for name in ("processor", "esp", "esp6", "gso", "pmtu", "udpencap"):
        importlib.import_module(f"{PACKAGE}.{name}")  # every module now, none at the first packet
    return module


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _COMPILED_NAME or module.startswith(_COMPILED_NAME + "."):
            load()
            module = PACKAGE + module[len(_COMPILED_NAME):]
        return super().find_class(module, name)


def translate(obj: Any) -> Any:
    """``obj`` (configuration objects of the compiled core: policies, SA parameters, and
    containers of them) rebuilt from the source core's classes. In memory only."""
    return _Unpickler(io.BytesIO(pickle.dumps(obj))).load()
