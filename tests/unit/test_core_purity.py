"""The cores are sans-IO: the ESP core (``nfq_ipsec.core``) and the IKE core
(``nfq_ipsec.ike``) import only the standard library and ``cryptography``, never open sockets,
start processes or threads, read the clock or a random source."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nfq_ipsec.core
import nfq_ipsec.ike

CORE = Path(nfq_ipsec.core.__file__).parent
IKE = Path(nfq_ipsec.ike.__file__).parent

# Loaded by importing the core in a fresh interpreter: none of these may appear. (os and time
# are already loaded by the interpreter's own start-up, so they are checked statically below.)
FORBIDDEN_LOADED = ["socket", "subprocess", "netfilterqueue", "scapy", "threading", "select",
                    "multiprocessing", "asyncio", "selectors", "pyroute2", "psutil"]
# Imports no core module may write, at any depth of the module.
FORBIDDEN_IMPORTS = {"os", "time", "socket", "subprocess", "threading", "select", "selectors",
                     "multiprocessing", "asyncio", "signal", "netfilterqueue", "scapy", "pyroute2",
                     "psutil", "datetime", "random", "secrets", "io", "pathlib", "shutil"}
ALLOWED_THIRD_PARTY = {"cryptography"}
# Types for mypyc only (native integers), imported under ``if TYPE_CHECKING:``: never at run time.
TYPES_ONLY = {"mypy_extensions"}


def test_importing_the_core_loads_no_io_modules() -> None:
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import nfq_ipsec.core, nfq_ipsec.core.esp, nfq_ipsec.core.processor\n"
        "import nfq_ipsec.ike.message, nfq_ipsec.ike.sk, nfq_ipsec.ike.dh, nfq_ipsec.ike.keys\n"
        f"bad = [m for m in {FORBIDDEN_LOADED!r}\n"
        "       if any(k == m or k.startswith(m + '.') for k in sys.modules)]\n"
        "print(json.dumps({'bad': bad, 'new': sorted(set(sys.modules) - before)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["bad"] == [], f"importing nfq_ipsec.core loaded {report['bad']}"
    assert "nfq_ipsec.core.esp" in report["new"]  # the probe really imported the core
    assert "nfq_ipsec.ike.sk" in report["new"]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes under ``if TYPE_CHECKING:`` (no ``else``)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING" and not node.orelse):
            out |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_only(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in typing_only and (
                (node.module or "").split(".")[0] in TYPES_ONLY if isinstance(node, ast.ImportFrom)
                else all(a.name.split(".")[0] in TYPES_ONLY for a in node.names)):  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.append((node.lineno, "__import__"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            found.append((node.lineno, "importlib.import_module"))
    return found


@pytest.mark.parametrize(("package", "at_least"), [(CORE, 9), (IKE, 6)], ids=["core", "ike"])
def test_core_modules_import_nothing_forbidden(package: Path, at_least: int) -> None:
    files = sorted(package.glob("*.py"))
    assert len(files) >= at_least, files  # the scan sees the package
    problems = []
    stdlib = sys.stdlib_module_names
    for path in files:
        for lineno, name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_IMPORTS or name in ("__import__", "importlib.import_module"):
                problems.append(f"{path.name}:{lineno}: imports {name}")
            elif top not in stdlib and top not in ALLOWED_THIRD_PARTY and top != "__future__":
                problems.append(f"{path.name}:{lineno}: imports third-party {name}")
    assert not problems, "\n".join(problems)


def test_the_scan_would_catch_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom time import monotonic\nimport scapy.all\ndef f():\n    import socket\n")
    names = {name for _, name in _imports(bad)}
    assert {"os", "time", "scapy.all", "socket"} <= names
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from mypy_extensions import i64\n    import scapy\n"
                     "from mypy_extensions import u8\n")
    # a types-only import passes under TYPE_CHECKING only; nothing else does
    assert sorted(name for _, name in _imports(typed)) == ["mypy_extensions", "scapy", "typing"]
