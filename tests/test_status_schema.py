"""The status answer keeps its schema.

``GOLDEN`` is the schema in brief: for every level of ``nfq-ipsec status --json`` (the top
level, ``daemon``, each of ``workers`` and ``sas``, an SA's ``lifetime_left``), its keys and the
JSON type of each value. Three things are held to it: the TypedDicts the daemon builds the
answer from (``nfq_ipsec/status.py``), the tables of ``docs/status.md``, and real answers,
printed by ``nfq-ipsec status --json``: here from a supervisor whose workers run the worker's
own code on a queue that never delivers a packet (no root), and in test_supervisor_root.py
from a real daemon in namespaces. A field added, removed, renamed or given another type fails
here until ``GOLDEN`` and the page say the same.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
import types
import typing
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from labutil import env, nfq_ipsec

from nfq_ipsec import control, iptables, supervisor, worker
from nfq_ipsec.config import load_config
from nfq_ipsec.status import StatusReport

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "nfq_ipsec" / "examples"
DOC = ROOT / "docs" / "status.md"

# A level's path: "" for the top level, then keys joined by "." with "[]" for each element of
# an array. Types as docs/status.md names them.
GOLDEN: dict[str, dict[str, str]] = {
    "": {
        "daemon": "object",
        "kernel_drops": "drop counts or null",
        "kernel_drops_age": "number or null",
        "warnings": "array of strings",
        "workers": "array of objects",
        "sas": "array of objects",
    },
    "daemon": {
        "pid": "integer",
        "uptime": "number",
        "config": "string",
        "state": "string",
        "rules_installed": "boolean",
        "ipv6": "string",
        "version": "string",
        "core": "string",
        "control_errors": "integer",
        "control_clients": "integer",
    },
    "workers[]": {
        "queue": "integer",
        "cpu": "integer or null",
        "pid": "integer or null",
        "uptime": "number or null",
        "restarts": "integer",
        "state": "string",
        "packets_in": "integer or null",
        "packets_out": "integer or null",
        "drops": "drop counts or null",
        "kernel_queue_dropped": "integer or null",
        "user_dropped": "integer or null",
        "last_error": "string or null",
        "last_outage": "number or null",
        "core": "string or null",
    },
    "sas[]": {
        "name": "string",
        "spi": "string",
        "direction": "string",
        "queue": "integer",
        "packets": "integer or null",
        "bytes": "integer or null",
        "replay_drops": "integer or null",
        "integrity_drops": "integer or null",
        "other_drops": "integer or null",
        "seq": "integer or null",
        "lifetime_left": "object or null",
        "saved": "integer or null",
        "path_mtu": "integer or null",
    },
    "sas[].lifetime_left": {
        "packets": "integer or null",
        "bytes": "integer or null",
        "seconds": "number or null",
    },
}

NULL = " or null"
SCALARS: dict[str, type] = {"integer": int, "number": float, "string": str, "boolean": bool}


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- the schema of the TypedDicts --------------------------------------------------------------
def describe_types(td: type, path: str = "",
                   into: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """``GOLDEN``'s description of TypedDict ``td`` and the TypedDicts in it."""
    out: dict[str, dict[str, str]] = {} if into is None else into
    level = out.setdefault(path, {})
    for key, hint in typing.get_type_hints(td).items():
        level[key] = _type_name(hint, _child(path, key), out)
    return out


def _type_name(hint: Any, path: str, out: dict[str, dict[str, str]]) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1 and len(args) == 2, f"{path}: {hint} is not one type or None"
        return _type_name(rest[0], path, out) + NULL
    for name, t in SCALARS.items():
        if hint is t:
            return name
    if typing.is_typeddict(hint):
        describe_types(hint, path, out)
        return "object"
    origin = typing.get_origin(hint)
    if origin is dict and args == (str, int):
        return "drop counts"
    if origin is list and args == (str,):
        return "array of strings"
    if origin is list and typing.is_typeddict(args[0]):
        describe_types(args[0], f"{path}[]", out)
        return "array of objects"
    raise AssertionError(f"{path}: {hint} has no name in docs/status.md")


# -- the schema of the page --------------------------------------------------------------------
def describe_docs(text: str) -> dict[str, dict[str, str]]:
    """The tables of docs/status.md: under a heading "Top level" or one that starts with a
    level's path in backticks, one row per key: | `key` | type | meaning |."""
    out: dict[str, dict[str, str]] = {}
    path: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            named = title.split("`")
            path = "" if title == "Top level" else named[1] if title.startswith("`") else None
        elif path is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = cells[0].strip("`")
            level = out.setdefault(path, {})
            assert key not in level, f"{path or 'top level'}: {key} twice"
            level[key] = cells[1]
    return out


# -- a real answer -------------------------------------------------------------------------------
def check_answer(answer: Any) -> set[str]:
    """Assert that a status answer (parsed JSON) has ``GOLDEN``'s keys and value types at every
    level; return the levels it holds a value of (a level whose values are all null or empty
    arrays is not checked)."""
    seen: set[str] = set()
    _check(answer, "", seen)
    return seen


def _check(value: Any, path: str, seen: set[str]) -> None:
    where = path or "top level"
    level = GOLDEN[path]
    assert isinstance(value, dict), f"{where}: {value!r} is not an object"
    assert sorted(value) == sorted(level), f"{where}: keys {sorted(value)}, schema {sorted(level)}"
    seen.add(path)
    for key, typ in level.items():
        v, child = value[key], _child(path, key)
        base = typ.removesuffix(NULL)
        if v is None:
            assert typ.endswith(NULL), f"{child}: null, schema {typ}"
        elif base == "object":
            _check(v, child, seen)
        elif base == "array of objects":
            assert isinstance(v, list), f"{child}: {v!r} is not an array"
            for item in v:
                _check(item, f"{child}[]", seen)
        elif base == "array of strings":
            assert isinstance(v, list) and all(type(x) is str for x in v), f"{child}: {v!r}"
        elif base == "drop counts":
            assert isinstance(v, dict) and all(
                type(k) is str and type(n) is int for k, n in v.items()), f"{child}: {v!r}"
        else:
            assert type(v) is SCALARS[base], f"{child}: {v!r} is not {typ}"


# -- the tests -----------------------------------------------------------------------------------
def test_the_typeddicts_are_the_golden_schema() -> None:
    assert describe_types(StatusReport) == GOLDEN


def test_docs_status_md_is_the_golden_schema() -> None:
    assert describe_docs(DOC.read_text()) == GOLDEN


def test_the_checks_catch_a_changed_field() -> None:
    """What the real-answer tests rely on: any change of shape is an assertion."""
    good = {"packets": 1, "bytes": None, "seconds": 2.5}
    lifetime = "sas[].lifetime_left"
    assert _checked(good, lifetime)
    for bad in ({"packets": 1, "bytes": None}, dict(good, extra=1),
                {"packet": 1, "bytes": None, "seconds": 2.5}, dict(good, packets="1"),
                dict(good, seconds=2), dict(good, packets=True)):
        with pytest.raises(AssertionError):
            _checked(bad, lifetime)


def _checked(value: Any, path: str) -> bool:
    _check(value, path, set())
    return True


class IdleQueue:
    """A queue binding that never delivers a packet: what the worker polls is one end of a
    socket pair that stays silent."""

    overflows = 0

    def __init__(self) -> None:
        self.ends = socket.socketpair()

    def bind(self, queue_num: int) -> None:
        pass

    def fileno(self) -> int:
        return self.ends[0].fileno()

    def receive(self, limit: int) -> list[Any]:
        return []

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None,
                payload: bytes | None = None) -> None:
        raise AssertionError("no packet, no verdict")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        for end in self.ends:
            end.close()


def worker_on_an_idle_queue(spec: worker.WorkerSpec, conn: Connection) -> None:
    """The daemon's worker (``worker.run``: its processor, SA state files and pipe protocol)
    on a queue that needs no root."""
    sys.exit(worker.run(spec, conn, queue=IdleQueue()))


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[supervisor.Supervisor]:
    """A supervisor serving its control socket, its workers ready, its rules said to be
    installed (the rule counters come from a stand-in for iptables-save)."""
    monkeypatch.setattr(supervisor, "worker_main", worker_on_an_idle_queue)
    monkeypatch.setattr(iptables, "kernel_drops",
                        lambda cfg, netns=None: {"no_policy": 2, "cleartext_protected": 0})
    config = EXAMPLES / "host-a.toml"
    s = supervisor.Supervisor(load_config(config), str(config))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for slot in s.slots:
        slot.spec = dataclasses.replace(slot.spec, state_dir=str(state))
    s.control = control.ControlServer(str(tmp_path / "run" / "c.sock"))
    s.control.open()
    try:
        for slot in s.slots:
            s._start(slot)
        assert s._wait_ready()
        s.state = "running"
        s.rules_installed = True
        yield s
    finally:
        s.state = "stopping"
        s._stop_workers()
        s.control.close()


def status_json(sup: supervisor.Supervisor) -> Any:
    """What ``nfq-ipsec status --json`` prints, the supervisor's loop running meanwhile."""
    argv = [*nfq_ipsec(), "status", "--socket", sup.control.path, "--json"]
    done: list[subprocess.CompletedProcess[str]] = []
    asker = threading.Thread(target=lambda: done.append(
        subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env())), daemon=True)
    asker.start()
    deadline = time.monotonic() + 30
    while asker.is_alive() and time.monotonic() < deadline:
        sup._wait_once()
    asker.join(1)
    assert done and done[0].returncode == 0, done
    return json.loads(done[0].stdout)


def test_a_real_status_answer_has_the_golden_schema(live: supervisor.Supervisor) -> None:
    answer = status_json(live)
    assert check_answer(answer) == set(GOLDEN)  # every level held a value, and matched
    assert answer["daemon"]["state"] == "running" and answer["kernel_drops"] == {
        "no_policy": 2, "cleartext_protected": 0}
    assert [w["state"] for w in answer["workers"]] == ["ready"] * len(live.slots)
    assert all(w["packets_in"] == 0 for w in answer["workers"])  # counters from the workers
    assert "nfq-ipsec running" in control.render_status(answer)
