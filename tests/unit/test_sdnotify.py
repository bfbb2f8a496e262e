"""systemd's notification protocol (``sdnotify.py``) against a real unix datagram socket
standing in for systemd: the messages, the abstract namespace, the watchdog's period, and the
supervisor's READY=1, WATCHDOG=1, RELOADING=1 and STOPPING=1 in its own run."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from repo import EXAMPLES
from standins import fake_worker, signals_restored

from nfq_ipsec import control, supervisor
from nfq_ipsec.config import load_config
from nfq_ipsec.sdnotify import Notifier, socket_address, watchdog_period


class Systemd:
    """The receiving end: a unix datagram socket, and what came on it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> list[dict[str, str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096).decode()
                out.append(dict(line.split("=", 1) for line in data.split("\n")))
        except BlockingIOError:
            return out
        finally:
            self.sock.settimeout(5)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[Systemd, str]]:
    path = str(tmp_path / "notify")
    s = Systemd(path)
    try:
        yield s, path
    finally:
        s.sock.close()


def test_ready_status_reloading_stopping(systemd: tuple[Systemd, str]) -> None:
    sd, path = systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "OTHER": "x"}
    n = Notifier(env)
    assert n.enabled and env == {"OTHER": "x"}  # taken out: no child inherits them
    n.ready("running: 2 worker(s) ready, rules installed")
    assert sd.next() == {"READY": "1", "STATUS": "running: 2 worker(s) ready, rules installed"}
    n.reloading()
    msg = sd.next()
    assert msg["RELOADING"] == "1" and "STATUS" in msg
    assert abs(int(msg["MONOTONIC_USEC"]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5e6
    n.stopping()
    assert sd.next()["STOPPING"] == "1"
    n.send("STATUS=two\nlines")
    assert sd.next() == {"STATUS": "two lines"}  # a value can't add a line of its own
    assert n.sent == 4
    n.close()


def test_the_abstract_namespace(tmp_path: Path) -> None:
    name = f"nfq-ipsec-test-{os.getpid()}-{time.monotonic_ns()}"
    sd = Systemd(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.ready("ok")
        assert sd.next() == {"READY": "1", "STATUS": "ok"}
    finally:
        sd.sock.close()


def test_addresses() -> None:
    assert socket_address("@x") == b"\0x"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    for unusable in ("", "@", "relative", "vsock:2:1234"):
        assert socket_address(unusable) is None


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_period is None
    n.ready("x")
    n.watchdog(0.0)
    assert n.sent == 0 and n.next_watchdog(0.0) is None


def test_a_missing_receiver_costs_nothing(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    t0 = time.monotonic()
    n.ready("x")
    assert n.failed == 1 and n.sent == 0 and time.monotonic() - t0 < 0.5


def test_the_watchdog_period_is_half_of_watchdog_usec(systemd: tuple[Systemd, str]) -> None:
    sd, path = systemd
    assert watchdog_period({"WATCHDOG_USEC": "10000000"}, 7) == 5.0
    assert watchdog_period({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 7) == 5.0
    assert watchdog_period({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_period({}, 7) is None
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_period == 1.0 and n.next_watchdog(100.0) == 0.0
    n.watchdog(100.0)
    n.watchdog(100.9)  # not due
    assert n.next_watchdog(100.9) == pytest.approx(0.1)
    n.watchdog(101.0)
    n.watchdog(101.1, force=True)
    assert sd.pending() == [{"WATCHDOG": "1"}] * 3


# -- the supervisor --------------------------------------------------------------------------------
@pytest.fixture
def restore_signals() -> Iterator[None]:
    with signals_restored():
        yield


def test_the_supervisor_tells_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      systemd: tuple[Systemd, str], restore_signals: None) -> None:
    """A whole ``Supervisor.run`` with stand-in workers (the rules stubbed): READY=1 once the
    workers are ready and the rules in, WATCHDOG=1 from the loop at half of WATCHDOG_USEC,
    RELOADING=1 and READY=1 around a reload, STOPPING=1 on SIGTERM."""
    sd, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WATCHDOG=1 every 0.2 s
    monkeypatch.setattr(supervisor, "worker_main", fake_worker)
    sup = supervisor.Supervisor(load_config(EXAMPLES / "host-a.toml"), "host-a.toml")
    assert "NOTIFY_SOCKET" not in os.environ
    sup.control = control.ControlServer(str(tmp_path / "run" / "c.sock"))
    order: list[str] = []

    def install() -> None:
        order.append("rules")
        sup.rules_installed = True

    monkeypatch.setattr(sup, "_install_rules", install)
    monkeypatch.setattr(sup, "_close_rules", lambda: True)
    monkeypatch.setattr(sup, "_reload", lambda: {"reloaded": "nothing", "changed": False})
    seen: list[dict[str, str]] = []

    def systemd_side() -> None:
        msg = sd.next()
        while "READY" not in msg:
            seen.append(msg)
            msg = sd.next()
        seen.append(msg)
        order.append("ready")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # the loop feeds the watchdog meanwhile
            seen.append(sd.next())
        sup.reload_requested = True  # as SIGHUP does
        sup._wake()
        while "READY" not in (msg := sd.next()):
            seen.append(msg)
        seen.append(msg)
        sup.stop_signal = signal.SIGTERM
        sup._wake()

    side = threading.Thread(target=systemd_side, daemon=True)
    side.start()
    assert sup.run() == 0
    side.join(10)
    seen += sd.pending()
    kinds = [next(iter(m)) for m in seen]
    ready = kinds.index("READY")
    assert order == ["rules", "ready"]  # READY=1 only once the rules are in
    assert seen[ready]["STATUS"].startswith(f"running: {len(sup.slots)} worker(s) ready")
    watchdogs = [k for k in kinds[ready + 1:kinds.index("RELOADING")] if k == "WATCHDOG"]
    assert 3 <= len(watchdogs) <= 8, kinds  # every 0.2 s for 1 s
    reload_at = kinds.index("RELOADING")
    assert "READY" in kinds[reload_at + 1:]
    assert kinds[-1] == "STOPPING" and kinds.count("STOPPING") == 1  # the last word
    assert sup.state == "stopping"


def test_no_watchdog_when_the_loop_does_not_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 systemd: tuple[Systemd, str]) -> None:
    """WATCHDOG=1 comes from the loop's rounds only: a loop that doesn't run sends none."""
    sd, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    sup = supervisor.Supervisor(load_config(EXAMPLES / "host-a.toml"), "host-a.toml")
    time.sleep(0.3)
    assert sd.pending() == []
    sup._wait_once()
    assert sd.pending() == [{"WATCHDOG": "1"}]
    sup.notify.close()


