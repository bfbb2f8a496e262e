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
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from labutil import env, nfq_ipsec
from repo import EXAMPLES, ROOT
from statusschema import (
    GOLDEN,
    OFFLOADING,
    WITHOUT_IKE,
    check_answer,
    check_level,
    describe_docs,
    describe_types,
)

from nfq_ipsec import control, iptables, supervisor, worker
from nfq_ipsec.config import load_config
from nfq_ipsec.status import StatusReport

DOC = ROOT / "docs" / "status.md"
















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
    check_level(value, path, set())
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
        # its workers compare two versions, so that every level of the answer holds a value
        slot.spec = dataclasses.replace(slot.spec, state_dir=str(state),
                                        versions=("core", "independent"), compare="all")
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
    # every level held a value, and matched; but the agent's (no connection here: it is null,
    # its levels are held by test_agent.py and the lab's test_ike_agent.py)
    assert check_answer(answer) == WITHOUT_IKE - OFFLOADING
    assert answer["ike"] is None
    assert answer["daemon"]["state"] == "running" and answer["kernel_drops"] == {
        "no_policy": 2, "cleartext_protected": 0}
    assert [w["state"] for w in answer["workers"]] == ["ready"] * len(live.slots)
    assert all(w["packets_in"] == 0 for w in answer["workers"])  # counters from the workers
    assert "nfq-ipsec running" in control.render_status(answer)
