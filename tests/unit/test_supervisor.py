"""The supervisor's loop with stand-in workers (no root, no queues): a status answer whose
rule counters are slow to read (``iptables-save -c`` stuck) must not hold up the watch over
the workers; the answer comes within its time limit and says its counters are missing or old.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from repo import EXAMPLES
from standins import fake_worker

from nfq_ipsec import control, iptables, supervisor
from nfq_ipsec.config import Config, load_config


@pytest.fixture
def sup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[supervisor.Supervisor]:
    monkeypatch.setattr(supervisor, "worker_main", fake_worker)
    s = supervisor.Supervisor(load_config(EXAMPLES / "host-a.toml"), "host-a.toml")
    s.control = control.ControlServer(str(tmp_path / "c.sock"))
    s.control.open()
    try:
        for slot in s.slots:
            s._start(slot)
        assert s._wait_ready()
        s.state = "running"
        s.rules_installed = True  # so a status answer wants the rule counters
        yield s
    finally:
        s.state = "stopping"
        s._stop_workers()
        s.control.close()


def ask_status(path: str, into: dict[str, Any]) -> threading.Thread:
    t = threading.Thread(target=lambda: into.update(control.request(path, {"command": "status"})),
                         daemon=True)
    t.start()
    return t


def test_slow_rule_counters_do_not_hold_the_worker_watch(
        sup: supervisor.Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    asked, release = threading.Event(), threading.Event()
    calls: list[float] = []

    def stuck_iptables_save(cfg: Config, netns: str | None = None) -> dict[str, int]:
        calls.append(time.monotonic())
        asked.set()
        release.wait(15)  # iptables-save -c hanging (on the xtables lock, a slow kernel...)
        return {"no_policy": 7}

    monkeypatch.setattr(iptables, "kernel_drops", stuck_iptables_save)
    victim = sup.slots[0]
    old_pid = victim.pid
    assert old_pid is not None
    killed: list[float] = []

    def kill_once_asked() -> None:  # the worker dies while the counters are being read
        if asked.wait(10):
            os.kill(old_pid, signal.SIGKILL)
            killed.append(time.monotonic())

    killer = threading.Thread(target=kill_once_asked, daemon=True)
    killer.start()
    first: dict[str, Any] = {}
    asker = ask_status(sup.control.path, first)
    noticed = back = None
    start = time.monotonic()
    try:
        while time.monotonic() - start < 12 and (back is None or asker.is_alive()):
            sup._wait_once()
            if killed and noticed is None and victim.state != "ready":
                noticed = time.monotonic()
            if noticed is not None and back is None and victim.state == "ready":
                back = time.monotonic()
    finally:
        release.set()
    asker.join(5)
    assert killed and noticed is not None and back is not None, (killed, noticed, back)
    assert noticed - killed[0] < 0.5, noticed - killed[0]  # seen at once, not after the read
    assert back - killed[0] < 5.0 and victim.pid != old_pid and victim.restarts == 1
    # the answer came in its time limit, without the counters, and says why
    assert first["kernel_drops"] is None and first["kernel_drops_age"] is None
    assert any(w.startswith(f"the rule counters were not read within {supervisor.STATS_TIMEOUT:g} s")
               for w in first["warnings"]), first["warnings"]
    assert first["workers"][1]["packets_in"] == 3

    # iptables answers again: the next status has fresh counters and no such warning
    deadline = time.monotonic() + 10
    while sup.counters.finished < 1 and time.monotonic() < deadline:
        sup._wait_once()
    assert sup.counters.value == {"no_policy": 7}
    second: dict[str, Any] = {}
    asker = ask_status(sup.control.path, second)
    while asker.is_alive() and time.monotonic() < deadline:
        sup._wait_once()
    assert second["kernel_drops"] == {"no_policy": 7}
    assert 0 <= second["kernel_drops_age"] < supervisor.STATS_TIMEOUT
    assert not any("rule counters" in w for w in second["warnings"]), second["warnings"]
    assert len(calls) == 2


def test_a_failed_read_keeps_the_last_counters_with_their_age(
        sup: supervisor.Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    results: list[dict[str, int] | Exception] = [{"unknown_spi": 2}, iptables.RulesError("no answer")]

    def iptables_save(cfg: Config, netns: str | None = None) -> dict[str, int]:
        got = results.pop(0)
        if isinstance(got, Exception):
            raise got
        return got

    monkeypatch.setattr(iptables, "kernel_drops", iptables_save)
    answers: list[dict[str, Any]] = []
    for _ in range(2):
        into: dict[str, Any] = {}
        asker = ask_status(sup.control.path, into)
        deadline = time.monotonic() + 10
        while asker.is_alive() and time.monotonic() < deadline:
            sup._wait_once()
        answers.append(into)
    assert answers[0]["kernel_drops"] == {"unknown_spi": 2} and not any(
        "rule counters" in w for w in answers[0]["warnings"])
    assert answers[1]["kernel_drops"] == {"unknown_spi": 2}  # the last good read, dated
    assert answers[1]["kernel_drops_age"] > 0
    assert any(w.startswith("cannot read the rule counters (no answer); kernel_drops are from a "
                            "read ") for w in answers[1]["warnings"]), answers[1]["warnings"]


def test_the_shortest_watchdog_outlasts_a_busy_workers_answer() -> None:
    """A busy worker looks at its pipe after PACKETS_BETWEEN_LOOKS packets; the watchdog's
    shortest period must leave it time to, or it would kill healthy busy workers."""
    from nfq_ipsec import supervisor
    from nfq_ipsec.config.model import WATCHDOG_RANGE
    from nfq_ipsec.worker import BATCH, BATCHES_PER_WAKEUP, PACKETS_BETWEEN_LOOKS

    assert PACKETS_BETWEEN_LOOKS == BATCH * BATCHES_PER_WAKEUP
    assert supervisor.BUSY_ANSWER_BOUND == PACKETS_BETWEEN_LOOKS * supervisor.SLOWEST_PACKET
    assert WATCHDOG_RANGE[0] > supervisor.BUSY_ANSWER_BOUND


@pytest.mark.parametrize(("closed", "matches", "code", "said"), [
    (True, False, 0, "its rules are closed (protected traffic is dropped)"),
    (False, True, 0, "its live rules are still in place"),
    (False, False, 1, "protected traffic may not be dropped"),
])
def test_stop_reads_the_rules_back(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   closed: bool, matches: bool, code: int, said: str) -> None:
    """``nfq-ipsec stop`` says what the rules do once the daemon is gone, as read from the
    kernel: closed or live rules drop protected traffic (exit 0); anything else may not (exit 1)."""
    from nfq_ipsec.commands import daemon as daemon_command

    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    state = iptables.RulesStatus(present=(not (closed or matches) and False) or True, complete=True,
                                 matches=matches, problems=(), closed=closed)
    monkeypatch.setattr(iptables, "status", lambda c, netns=None: state)
    assert daemon_command._check_rules_after_stop(cfg, 1234) == code
    out = capsys.readouterr()
    assert said in (out.out if code == 0 else out.err)
