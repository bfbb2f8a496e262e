"""The runtime package ``nfq_ipsec`` does not depend on the lab extra (``nfq_ipsec_lab``: the
lab, the benchmark, the profiler).

No module of the runtime imports it, neither with an import statement nor by name (a string
handed to ``importlib``, or any other code string naming it); and in a fresh interpreter,
importing every runtime module and building ``nfq-ipsec``'s command line loads nothing of it.
``nfq-ipsec lab`` and ``nfq-ipsec bench`` reach it only through the entry points
(tests/unit/test_lab_extra.py).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import nfq_ipsec

RUNTIME = Path(nfq_ipsec.__file__).parent
EXTRA = "nfq_ipsec_lab"
_NAMES_EXTRA = re.compile(rf"\b{EXTRA}\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may name the extra)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def references_to_the_extra(path: Path, package_depth: int) -> list[str]:
    """Every place in ``path`` that imports the extra or names it in code. ``package_depth``:
    how deep the module's package sits (1 for nfq_ipsec/x.py): a relative import that climbs
    out of nfq_ipsec could reach a sibling package."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] == EXTRA]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] == EXTRA:
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.level > package_depth:
                found.append((node.lineno, f"from {'.' * node.level}{node.module or ''} import ... "
                              "(climbs out of nfq_ipsec)"))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings and _NAMES_EXTRA.search(node.value)):
            found.append((node.lineno, f"names {EXTRA} in {node.value[:60]!r}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_no_runtime_module_imports_the_lab_extra() -> None:
    files = sorted(RUNTIME.rglob("*.py"))
    assert len(files) >= 30 and RUNTIME / "cli.py" in files, files  # the scan sees the runtime
    problems = []
    for path in files:
        depth = len(path.relative_to(RUNTIME).parts)
        problems += [f"{path.relative_to(RUNTIME.parent)}:{p}" for p in references_to_the_extra(path, depth)]
    assert not problems, "\n".join(problems)


def test_the_scan_would_catch_an_import_of_the_extra(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""A docstring may say nfq_ipsec_lab."""\n'
        "import importlib\n"
        "import nfq_ipsec_lab.bench\n"
        "from nfq_ipsec_lab.lab import netns\n"
        "from ..nfq_ipsec_lab import cli\n"
        "def f():\n"
        '    """Nor is this one counted: nfq_ipsec_lab."""\n'
        "    import nfq_ipsec_lab\n"
        '    return importlib.import_module("nfq_ipsec_lab.cli"), "nfq_ipsec_lab.cli:lab"\n'
    )
    found = references_to_the_extra(bad, 1)
    assert [line.split(":")[0] for line in found] == ["3", "4", "5", "8", "9", "9"], found


def test_importing_the_runtime_loads_nothing_of_the_extra() -> None:
    probe = (
        "import importlib, json, pkgutil, sys\n"
        "import nfq_ipsec\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(nfq_ipsec.__path__, 'nfq_ipsec.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "from nfq_ipsec import cli, commands\n"
        "commands.build_parser().format_help()\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] == {EXTRA!r})\n"
        "print(json.dumps({'imported': names, 'loaded': loaded}))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=RUNTIME.parent)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert {"nfq_ipsec.cli", "nfq_ipsec.supervisor", "nfq_ipsec.core.esp"} <= set(report["imported"])
    assert report["loaded"] == []
