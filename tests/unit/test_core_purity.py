"""The cores are sans-IO: the ESP core (``nfq_ipsec.core``) and the IKE core
(``nfq_ipsec.ike``) import only the standard library and ``cryptography``, the independent
ESP implementation (``nfq_ipsec.independent``) only the standard library and pycryptodome
(``Crypto``); none opens sockets, starts processes or threads, reads the clock or a random
source."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nfq_ipsec.core
import nfq_ipsec.ike
import nfq_ipsec.independent

CORE = Path(nfq_ipsec.core.__file__).parent
IKE = Path(nfq_ipsec.ike.__file__).parent
INDEPENDENT = Path(nfq_ipsec.independent.__file__).parent

# Loaded by importing the core in a fresh interpreter: none of these may appear. (os and time
# are already loaded by the interpreter's own start-up, so they are checked statically below.)
FORBIDDEN_LOADED = ["socket", "subprocess", "netfilterqueue", "scapy", "threading", "select",
                    "multiprocessing", "asyncio", "selectors", "pyroute2", "psutil"]
# Imports no core module may write, at any depth of the module.
FORBIDDEN_IMPORTS = {"os", "time", "socket", "subprocess", "threading", "select", "selectors",
                     "multiprocessing", "asyncio", "signal", "netfilterqueue", "scapy", "pyroute2",
                     "psutil", "datetime", "random", "secrets", "io", "pathlib", "shutil"}
ALLOWED_THIRD_PARTY = {"cryptography"}
# the independent implementation's library: never cryptography, and nothing of the core
ALLOWED_INDEPENDENT = {"Crypto"}
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


def test_importing_the_independent_implementation_loads_no_io_modules() -> None:
    """pycryptodome loads its native code through cffi or ctypes when it is imported (which
    brings subprocess and threading along): that is the library's start-up, so the baseline is
    what importing its modules alone loads; the independent package may add none of them."""
    probe = (
        "import json, sys\n"
        "import Crypto.Cipher.AES, Crypto.Cipher.ChaCha20_Poly1305, Crypto.Hash.HMAC\n"
        "import Crypto.Hash.SHA256, Crypto.Hash.SHA384, Crypto.Hash.SHA512\n"
        "before = set(sys.modules)\n"
        "import nfq_ipsec.independent\n"
        f"bad = [m for m in {FORBIDDEN_LOADED!r}\n"
        "       if any(k == m or k.startswith(m + '.') for k in set(sys.modules) - before)]\n"
        "print(json.dumps({'bad': bad, 'new': sorted(set(sys.modules) - before)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["bad"] == [], f"importing nfq_ipsec.independent loaded {report['bad']}"
    assert "nfq_ipsec.independent.crypto" in report["new"]
    assert not [m for m in report["new"] if m == "nfq_ipsec.core" or m.startswith("nfq_ipsec.core.")]


def test_the_independent_packet_path_loads_nothing() -> None:
    """Everything the packet path needs is imported with the package: sealing and opening a
    packet of every suite, transport and tunnel, loads no module, opens no file and loads no
    native library (audit events; a worker will run under a filter that forbids opening
    files after its start)."""
    probe = (
        "import json, sys\n"
        "import sas, versions\n"
        "from nfq_ipsec.core import Action, Direction, Mode, Policy, SADirection, Selector\n"
        "from ipaddress import IPv4Network\n"
        "from packets import udp\n"
        "suites = [('aes-gcm-128', None), ('chacha20-poly1305', None),\n"
        "          ('aes-cbc-256', 'hmac-sha384-192'), ('null', 'hmac-sha512-256')]\n"
        "made = []\n"
        "for enc, mac in suites:\n"
        "    for mode in (Mode.TRANSPORT, Mode.TUNNEL):\n"
        "        ends = dict(local='192.0.2.1', remote='192.0.2.1') if mode is Mode.TUNNEL else {}\n"
        "        sa = [sas.params(n, s, d, enc, integrity=mac, mode=mode, **ends) for n, s, d in\n"
        "              (('out', 0x100, SADirection.OUT), ('in', 0x100, SADirection.IN))]\n"
        "        pol = Policy('p', Selector(IPv4Network('10.0.0.1/32'), IPv4Network('10.0.0.1/32')),\n"
        "                     Action.PROTECT, Direction.BOTH, ('out', 'in'))\n"
        "        made.append(versions.IndependentRunner([pol], sa, 0.0))\n"
        "before = set(sys.modules)\n"
        "events = []\n"
        "watched = ('open', 'import', 'ctypes.dlopen', 'os.listdir', 'subprocess.Popen')\n"
        "sys.addaudithook(lambda e, a: events.append(e) if e in watched else None)\n"
        "results = []\n"
        "for ours in made:\n"
        "    esp = ours.outbound(udp('10.0.0.1', '10.0.0.1', 1, 2, b'x' * 40))\n"
        "    results.append(ours.inbound(esp.packet).verdict)\n"
        "    results.append(ours.inbound(esp.packet).reason)\n"
        "seen = sorted(set(events))\n"
        "print(json.dumps({'results': results, 'new': sorted(set(sys.modules) - before),\n"
        "                  'events': seen}))\n"
    )
    tests = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(tests)})
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["results"] == ["accept", "replay"] * 8  # every packet really went through
    assert report["new"] == [], report["new"]
    assert report["events"] == [], report["events"]  # no file opened, no library loaded


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


@pytest.mark.parametrize(("package", "at_least", "allowed"),
                         [(CORE, 9, ALLOWED_THIRD_PARTY), (IKE, 6, ALLOWED_THIRD_PARTY),
                          (INDEPENDENT, 7, ALLOWED_INDEPENDENT)],
                         ids=["core", "ike", "independent"])
def test_core_modules_import_nothing_forbidden(package: Path, at_least: int,
                                               allowed: set[str]) -> None:
    files = sorted(package.glob("*.py"))
    assert len(files) >= at_least, files  # the scan sees the package
    problems = []
    stdlib = sys.stdlib_module_names
    for path in files:
        for lineno, name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_IMPORTS or name in ("__import__", "importlib.import_module"):
                problems.append(f"{path.name}:{lineno}: imports {name}")
            elif top not in stdlib and top not in allowed and top != "__future__":
                problems.append(f"{path.name}:{lineno}: imports third-party {name}")
    assert not problems, "\n".join(problems)


def test_the_independent_implementation_shares_no_code_with_the_core() -> None:
    """Design diversity (docs/independent.md): nothing of ``nfq_ipsec`` but its own package, no import
    inside a function (a lazy import would open files after a worker's seccomp start-up)."""
    problems = []
    for path in sorted(INDEPENDENT.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                    "nfq_ipsec"):
                problems.append(f"{path.name}:{node.lineno}: imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("nfq_ipsec") for a in node.names):
                problems.append(f"{path.name}:{node.lineno}: imports nfq_ipsec")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        problems.append(f"{path.name}:{inner.lineno}: imports inside {node.name}")
    assert problems == []


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
