"""The core's Python source loaded as a package of its own beside the compiled core
(``nfq_ipsec.coresource``, the ESP version ``core-source``): it can be, because the core's
modules import each other relatively only; it shares no class with the compiled core; and the
configuration objects carried over are the source's own."""

from __future__ import annotations

import ast
import sys

from repo import EXAMPLES

from nfq_ipsec import corebuild, coresource
from nfq_ipsec.config import load_config
from nfq_ipsec.core import SAParams

CORE = coresource._CORE


def test_the_cores_modules_import_each_other_relatively_only() -> None:
    absolute = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                    node.module or "").startswith("nfq_ipsec"):
                absolute.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Import):
                absolute += [f"{path.name}: import {a.name}" for a in node.names
                             if a.name.startswith("nfq_ipsec")]
    assert absolute == []


def test_the_source_loads_beside_the_compiled_core_from_its_py_files() -> None:
    src = coresource.load()
    for name in corebuild.MODULES:
        module = sys.modules[f"{coresource.PACKAGE}.{name}"]
        assert str(module.__file__).endswith(f"core/{name}.py"), module.__file__
    compiled = sys.modules["nfq_ipsec.core.esp"]
    assert str(compiled.__file__).endswith(".py") is not corebuild.running().compiled
    assert src.Processor is not sys.modules["nfq_ipsec.core"].Processor
    assert src.Mode.TUNNEL is not sys.modules["nfq_ipsec.core"].Mode.TUNNEL


def test_configuration_objects_are_carried_over_to_the_sources_classes() -> None:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    sas = list(cfg.sas_for_queue(100))
    src = coresource.load()
    policies, params = coresource.translate((list(cfg.policies), sas))
    assert all(isinstance(p, src.SAParams) and not isinstance(p, SAParams) for p in params)
    assert [p.name for p in params] == [p.name for p in sas]
    assert [p.mode.value for p in params] == [p.mode.value for p in sas]
    assert all(isinstance(p, src.Policy) for p in policies)
    assert repr(params) == repr(sas).replace("nfq_ipsec.core.", f"{coresource.PACKAGE}.")
