"""Every one-shot command that reads key material turns core dumps off before it reads any:
``check-config``, ``decode``, ``genkey``, ``run``, ``status``, ``rules``, ``stop``, ``reload``,
``state show``/``state reset`` and the unit's ``wait-ready``.

Each command runs in a process of its own with a probe around the functions that read keys
(the loader's checked file read, the state file read, the key generator): the probe notes,
at every such read, the process's dumpable flag (``PR_GET_DUMPABLE``) and ``RLIMIT_CORE``.
The same probe around a plain config load outside any command notes a dumpable process, so it
can tell.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import configs
import pytest

PROBE = r"""
import json, os, resource, secrets, sys
from nfq_ipsec import cli, hardening, service, state
from nfq_ipsec.commands import offline as tools

seen = []

def note(what):
    seen.append({"what": what, "dumpable": hardening.dumpable(),
                 "core": list(resource.getrlimit(resource.RLIMIT_CORE))})

def wrap(module, name, what):
    real = getattr(module, name)
    def probe(*args, **kwargs):
        note(what(*args))
        return real(*args, **kwargs)
    setattr(module, name, probe)

wrap(hardening, "read_checked", lambda path, *_: f"file {os.path.basename(str(path))}")
wrap(state, "read", lambda path, *_: "state file")
wrap(secrets, "token_hex", lambda *_: "new key")
if os.environ.get("PROBE_FAIL"):
    def refuse():
        raise OSError(1, "refused for the test")
    hardening.disable_core_dumps = refuse
argv = sys.argv[1:]
if argv[0] == "plain-load":  # the probe's control: no command, so nothing turned dumps off
    code = 0 if tools.load_or_report(argv[1]) is not None else 2
elif argv[0] == "wait-ready":
    code = service.main(argv)
else:
    code = cli.main(argv)
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"code": code, "seen": seen}, f)
"""


def setup(tmp_path: Path, broken: bool = False) -> Path:
    """A configuration with its key in a key file, and a state_dir."""
    key = tmp_path / "o.key"
    key.write_text("11" * 20 + "\n")
    key.chmod(0o600)
    cfg = tmp_path / "c.toml"
    cfg.write_text(configs.one_sa(tmp_path / "run", tmp_path / "state", 'key_file = "o.key"',
                                  node_extra="mtu = 5" if broken else ""))
    cfg.chmod(0o600)
    return cfg


def probe(tmp_path: Path, *argv: str, fail: bool = False) -> dict[str, Any]:
    out = tmp_path / "probe.json"
    env = dict(os.environ, PROBE_OUT=str(out))
    env.pop("PROBE_FAIL", None)
    if fail:
        env["PROBE_FAIL"] = "1"
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert out.exists(), res.stdout + res.stderr
    got: dict[str, Any] = json.loads(out.read_text())
    got["stderr"] = res.stderr
    out.unlink()
    return got


def _pcap(path: Path) -> Path:
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    return path


COMMANDS: list[tuple[list[str], int, str]] = [
    (["check-config", "{cfg}"], 0, "file o.key"),
    (["decode", "--config", "{cfg}", "{pcap}"], 0, "file o.key"),
    (["genkey", "aes-gcm-128"], 0, "new key"),
    (["status", "--config", "{cfg}"], 3, "file o.key"),
    (["rules", "show", "--config", "{cfg}", "--ipv6"], 0, "file o.key"),
    (["stop", "--config", "{cfg}"], 3, "file o.key"),
    (["reload", "--config", "{cfg}"], 3, "file o.key"),
    (["engines", "--config", "{cfg}"], 3, "file o.key"),
    (["engine", "disable", "sodium", "--config", "{cfg}"], 3, "file o.key"),
    (["state", "show", "--config", "{cfg}"], 0, "state file"),
    (["state", "reset", "--config", "{cfg}", "--sa", "o", "--seq", "5"], 0, "state file"),
    (["run", "--config", "{broken}"], 2, "file o.key"),  # reads its key, then refuses the mtu
    (["wait-ready", "--config", "{cfg}", "--timeout", "0"], 1, "file o.key"),
]


@pytest.mark.parametrize(("argv", "code", "read"), COMMANDS,
                         ids=[" ".join(a for a in argv[:2] if "{" not in a) for argv, _, _ in COMMANDS])
def test_no_core_dump_before_the_first_key_is_read(tmp_path: Path, argv: list[str], code: int,
                                                   read: str) -> None:
    (tmp_path / "b").mkdir()
    names = {"cfg": str(setup(tmp_path)), "broken": str(setup(tmp_path / "b", broken=True)),
             "pcap": str(_pcap(tmp_path / "x.pcap"))}
    got = probe(tmp_path, *[a.format(**names) for a in argv])
    assert got["code"] == code, got
    assert read in [s["what"] for s in got["seen"]], got
    assert got["seen"] and all(not s["dumpable"] and s["core"] == [0, 0] for s in got["seen"]), got


def test_the_probe_sees_a_dumpable_process(tmp_path: Path) -> None:
    got = probe(tmp_path, "plain-load", str(setup(tmp_path)))
    assert got["code"] == 0
    assert [s["what"] for s in got["seen"]] == ["file c.toml", "file o.key"]
    assert all(s["dumpable"] for s in got["seen"]), got


def test_a_command_that_cannot_turn_core_dumps_off_reads_no_key(tmp_path: Path) -> None:
    cfg = str(setup(tmp_path))
    for argv in (["check-config", cfg], ["genkey", "aes-gcm-256"], ["state", "show", "--config", cfg],
                 ["wait-ready", "--config", cfg]):
        got = probe(tmp_path, *argv, fail=True)
        assert got["code"] == 1 and got["seen"] == [], got
        assert "cannot turn core dumps off, so no key is read" in got["stderr"]


def test_every_command_but_the_labs_counts_as_holding_keys() -> None:
    """A new command reads a configuration (and so its keys) unless it is one of the labs,
    which make throwaway keys of their own: it must be listed."""
    from nfq_ipsec import commands

    parser = commands.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(sub.choices, dict)
    assert set(sub.choices) - commands.HOLDS_KEYS == {"lab", "bench"}
    assert set(sub.choices) >= commands.HOLDS_KEYS
