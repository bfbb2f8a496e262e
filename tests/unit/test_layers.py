"""The import graph of the runtime package: no cycle, and no import that climbs up the layers.

Layers, lowest first; a module may import its own layer and those below, never above. The
commands (argument parsing, printing, exit codes) are the top: no domain module imports them.
Imports inside functions count too (they are how cycles used to hide).
"""

from __future__ import annotations

import ast
from pathlib import Path

from repo import ROOT

RUNTIME = ROOT / "nfq_ipsec"

LAYERS: list[set[str]] = [
    # 0: the sans-I/O cores (ESP, IKE, the independent ESP implementation) and leaves that
    # import nothing of ours but the core
    {"core", "ike", "independent", "engines", "exitcodes", "procs", "logsetup", "pcap",
     "reassembly", "corebuild", "coresource", "hardening", "sandbox", "counts", "status",
     "metrics", "liveness", "sdnotify", "droplog", "rates", "journal", "netif", "acquire",
     "__init__"},
    {"config"},  # 1: the configuration, read and checked
    # 2: pure rule building, negotiated SAs in the configuration, offline decode, the queue,
    # the batch sender, SA state, the ESP versions side by side
    {"rules", "childsas", "keylog", "decode", "nfqueue", "rawsend", "state", "usage", "versions"},
    # 3: applying rules, the data path, the keying agent, the control socket, the metrics listener
    {"iptables", "worker", "agent", "control", "metricsserver"},
    {"supervisor", "service"},  # 4: the daemon, and the systemd helper
    {"commands"},  # 5: every command: arguments, printing, exit codes
    {"cli"},  # 6: the entry point
]


def layer_of(module: str) -> int:
    """``module`` is dotted below nfq_ipsec (``core.esp``, ``commands.rules``)."""
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"nfq_ipsec.{module} is in no layer: add it to LAYERS in {__file__}")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        rel = path.relative_to(RUNTIME).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``name`` imports (anywhere in the file)."""
    is_package = path.name == "__init__.py" and name != "__init__"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "nfq_ipsec":
                mod = node.module.partition(".")[2]
            else:
                continue
            subs = [f"{mod}.{a.name}" if mod else a.name for a in node.names]
            # "from . import packet" imports the submodule; only a name that is no module
            # imports the package itself
            targets = subs + ([mod] if any(t not in known for t in subs) else [])
        elif isinstance(node, ast.Import):
            targets = [a.name.partition(".")[2] for a in node.names
                       if a.name.split(".")[0] == "nfq_ipsec"]
        for t in targets:
            if t in known:
                found.add(t)
            elif t == "":
                found.add("__init__")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_the_scan_sees_the_package() -> None:
    g = graph()
    assert {"cli", "commands", "commands.rules", "supervisor", "core.esp", "exitcodes"} <= set(g)
    assert "exitcodes" in g["commands.daemon"] and "supervisor" in g["commands.daemon"]
    assert "commands" in g["cli"]


def upward(g: dict[str, set[str]]) -> list[str]:
    return [f"nfq_ipsec.{a} (layer {layer_of(a)}) imports nfq_ipsec.{b} (layer {layer_of(b)})"
            for a, deps in sorted(g.items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_climbs_up_the_layers() -> None:
    assert upward(graph()) == []


def test_no_domain_module_imports_the_commands() -> None:
    offenders = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
                 if b.split(".")[0] in ("commands", "cli") and a.split(".")[0] not in ("commands", "cli")]
    assert offenders == []


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_checks_can_fail() -> None:
    """A made-up back edge (state importing the supervisor) is an upward import and a cycle."""
    g = graph()
    assert "state" in g["supervisor"]
    g["state"].add("supervisor")
    assert upward(g) == ["nfq_ipsec.state (layer 2) imports nfq_ipsec.supervisor (layer 4)"]
    assert cycles(g) == [["state", "supervisor", "worker"]]  # supervisor -> worker -> state too


def test_every_exit_code_is_in_the_readme() -> None:
    """The README's exit-code table has a row for every code a command can return."""
    from nfq_ipsec import exitcodes

    readme = (RUNTIME.parent / "README.md").read_text()
    rows = {int(line.split("|")[1]) for line in readme.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert set(exitcodes.MEANING) <= rows, set(exitcodes.MEANING) - rows
    codes = {v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)}
    assert codes == set(exitcodes.MEANING)


def test_every_command_takes_its_configuration_as_dash_c() -> None:
    """One convention: every command that reads a configuration takes -c/--config (and
    check-config keeps its positional form); rules and state have subcommands of their own."""
    import argparse

    from nfq_ipsec import commands

    parser = commands.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        if name in ("genkey", "lab", "bench"):
            continue
        leaves = [p]
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            leaves = list(nested[0].choices.values())
            assert len(leaves) >= 2, name
        for leaf in leaves:
            flags = {o for a in leaf._actions for o in a.option_strings}
            if not {"-c", "--config"} <= flags:
                missing.append(leaf.prog)
    assert missing == []
    assert commands.main(["check-config", "-c", "/nonexistent.toml"]) == 2
    assert commands.main(["check-config", "/nonexistent.toml"]) == 2
