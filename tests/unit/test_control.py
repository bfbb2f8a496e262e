"""The control socket (no root): real unix sockets, the server run by a thread the way the
supervisor runs it (wait on its waitables, then ``serve``); its modes and stale sockets; the
status text rendering. Against hostile and careless clients: whatever a client sends or fails to
do, it gets an error answer or is dropped at its deadline; the server never blocks on it, keeps
answering everybody else and counts it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, cast

import pytest
from repo import EXAMPLES

from nfq_ipsec import control
from nfq_ipsec.config import load_config
from nfq_ipsec.status import StatusReport
from nfq_ipsec.supervisor import Supervisor

BIG = "x" * (8 << 20)  # an answer far larger than a unix socket's buffers


def handler(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("command") == "fail":
        raise RuntimeError("a bug in the handler")
    if req.get("command") == "big":
        return {"big": BIG}
    if req.get("command") == "unknown":
        return {"error": "unknown command"}
    return {"echo": req}


@dataclass
class Served:
    """A server and the thread serving it; ``longest`` is the longest single ``serve`` call."""

    srv: control.ControlServer
    stop: threading.Event = field(default_factory=threading.Event)
    longest: float = 0.0
    failure: BaseException | None = None

    def loop(self) -> None:
        try:
            while not self.stop.is_set():
                due = self.srv.next_timeout()
                wait(self.srv.waitables(), timeout=0.05 if due is None else min(0.05, due))  # type: ignore[arg-type]
                t = time.monotonic()
                self.srv.serve(handler)
                self.longest = max(self.longest, time.monotonic() - t)
        except BaseException as err:  # the test fails on it below
            self.failure = err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    srv = control.ControlServer(str(tmp_path / "c.sock"))
    srv.open()
    s = Served(srv)
    t = threading.Thread(target=s.loop, daemon=True)
    t.start()
    yield s
    s.stop.set()
    t.join(5)
    srv.close()
    assert s.failure is None, f"the server loop died: {s.failure!r}"
    # Not a speed bound: a serve() that blocked on a stalled client would wait until that
    # client left, seconds beyond a client's whole allowance; a busy machine does not come near.
    assert s.longest < control.CLIENT_TIMEOUT, f"one serve() call blocked for {s.longest:.2f} s"


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(path)
    return c


def answer(c: socket.socket) -> dict[str, Any] | None:
    """Read to end of file: the answer, or None when the server closed without one."""
    data = b""
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    c.close()
    if not data:
        return None
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data[:200]
    got: dict[str, Any] = json.loads(data)
    return got


def ask(path: str, raw: bytes) -> dict[str, Any] | None:
    c = connect(path)
    with contextlib.suppress(BrokenPipeError):  # a refused client: closed before it sent
        c.sendall(raw)
    return answer(c)


def test_good_request_is_answered(served: Served) -> None:
    assert ask(served.srv.path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
    # a request ended by end of file rather than a newline is a request too
    c = connect(served.srv.path)
    c.sendall(b'{"command": "status"}')
    c.shutdown(socket.SHUT_WR)
    assert answer(c) == {"echo": {"command": "status"}}
    assert control.request(served.srv.path, {"command": "x"}) == {"echo": {"command": "x"}}
    assert served.srv.errors == 0


@pytest.mark.parametrize("raw", [b"[" * 60_000, b'{"a":' * 13_000, b"[" * 30_000 + b"]" * 30_000,
                                 b'{"command": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"],
                         ids=["arrays", "objects", "closed", "inside-an-object"])
def test_deep_nesting_is_an_error_answer(served: Served, raw: bytes) -> None:
    """json.loads raises RecursionError on these (not ValueError)."""
    with pytest.raises(RecursionError):
        json.loads(raw)
    assert ask(served.srv.path, raw + b"\n") == {"error": "bad request: nested too deeply"}
    assert ask(served.srv.path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
    assert served.srv.errors == 1


def test_deep_nesting_longer_than_a_request(served: Served) -> None:
    """100,000 levels: longer than a request may be, refused before it is parsed."""
    reply = ask(served.srv.path, b"[" * 100_000 + b"\n")
    assert reply == {"error": f"bad request: request longer than {control.MAX_REQUEST} bytes"}
    reply = ask(served.srv.path, b"[" * (control.MAX_REQUEST - 1) + b"\n")
    assert reply == {"error": "bad request: nested too deeply"}
    assert served.srv.errors == 2


@pytest.mark.parametrize("raw, why", [
    (b"\xff\xfe{}\n", "utf-8"), (b'{"command": "\xc3("}\n', "utf-8"), (b"[1, 2]\n", "not a JSON object"),
    (b"42\n", "not a JSON object"), (b"null\n", "not a JSON object"), (b'"status"\n', "not a JSON object"),
    (b"status\n", "Expecting value"), (b"\n", "Expecting value"), (b'{"command": \n', "Expecting"),
])
def test_malformed_request_is_an_error_answer(served: Served, raw: bytes, why: str) -> None:
    reply = ask(served.srv.path, raw)
    assert reply is not None and reply["error"].startswith("bad request: ") and why in reply["error"], reply
    assert served.srv.errors == 1


def test_error_answers_and_handler_failures_are_counted(served: Served) -> None:
    assert ask(served.srv.path, b'{"command": "unknown"}\n') == {"error": "unknown command"}
    reply = ask(served.srv.path, b'{"command": "fail"}\n')
    assert reply is not None and "internal error" in reply["error"]
    assert ask(served.srv.path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
    assert served.srv.errors == 2


def test_oversized_request_is_refused(served: Served) -> None:
    path = served.srv.path
    reply = ask(path, b"x" * (control.MAX_REQUEST + 100))
    assert reply == {"error": f"bad request: request longer than {control.MAX_REQUEST} bytes"}
    assert served.srv.errors == 1
    # a request of exactly the limit is still read
    assert ask(path, b" " * (control.MAX_REQUEST - 2) + b"{}\n") == {"echo": {}}
    # a client that sends without end is cut off, and nobody else waits for it
    firehose = connect(path)
    sent = 0

    def flood() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            while sent < 1 << 30:
                sent += firehose.send(b"y" * 65536)

    t = threading.Thread(target=flood)
    t.start()
    t0 = time.monotonic()
    assert ask(path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
    assert time.monotonic() - t0 < 0.5
    t.join(10)
    assert not t.is_alive() and sent < 1 << 20, sent  # its connection was closed under it
    firehose.close()
    assert served.srv.errors == 2 and served.srv.clients == 0


def test_byte_per_second_and_silent_clients_do_not_hold_the_server(served: Served) -> None:
    path = served.srv.path
    slow = connect(path)
    silent = connect(path)
    start = time.monotonic()
    ended: dict[str, float] = {}

    def trickle() -> None:
        try:
            for byte in b'{"command": "status"}':
                slow.send(bytes([byte]))
                time.sleep(1.0)
        except OSError:
            pass
        ended["slow"] = time.monotonic() - start

    t = threading.Thread(target=trickle)
    t.start()
    # meanwhile everybody else is answered at once
    for _ in range(5):
        t0 = time.monotonic()
        assert ask(path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
        assert time.monotonic() - t0 < 0.5
        time.sleep(0.2)
    assert answer(silent) is None  # dropped at its deadline, no answer
    silent_after = time.monotonic() - start
    t.join(30)
    assert answer(slow) is None
    assert control.CLIENT_TIMEOUT - 0.1 <= silent_after < control.CLIENT_TIMEOUT + 1.0
    assert ended["slow"] < control.CLIENT_TIMEOUT + 2.0  # its next send after the drop failed
    assert served.srv.errors == 2 and served.srv.clients == 0


def test_client_that_never_reads_its_answer_is_dropped(served: Served) -> None:
    path = served.srv.path
    lazy = connect(path)
    lazy.sendall(b'{"command": "big"}\n')
    start = time.monotonic()
    for _ in range(5):
        t0 = time.monotonic()
        assert ask(path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
        assert time.monotonic() - t0 < 0.5
    deadline = start + control.CLIENT_TIMEOUT + 2.0
    while served.srv.clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.srv.clients == 0 and served.srv.errors == 1
    assert time.monotonic() - start >= control.CLIENT_TIMEOUT - 0.2
    # what it reads now is a part of the answer, then the end: never the whole answer
    got = b""
    while chunk := lazy.recv(1 << 20):
        got += chunk
    lazy.close()
    assert 0 < len(got) < len(BIG)


def test_a_reader_gets_a_large_answer_whole(served: Served) -> None:
    reply = ask(served.srv.path, b'{"command": "big"}\n')
    assert reply == {"big": BIG}


def test_too_many_clients_are_refused_politely(tmp_path: Path) -> None:
    srv = control.ControlServer(str(tmp_path / "c.sock"), max_clients=4)
    srv.open()
    s = Served(srv)
    t = threading.Thread(target=s.loop, daemon=True)
    t.start()
    try:
        silent = [connect(srv.path) for _ in range(4)]
        deadline = time.monotonic() + 5
        while srv.clients < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.clients == 4
        refused = [ask(srv.path, b'{"command": "status"}\n') for _ in range(10)]
        assert all(r is not None and r["error"].startswith("busy") for r in refused), refused
        assert srv.clients == 4 and srv.errors == 10
        for c in silent:
            c.close()  # they leave: room again at once
        deadline = time.monotonic() + 5
        while srv.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ask(srv.path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
        assert srv.errors == 10  # leaving without a word is no error (a liveness probe does it)
    finally:
        s.stop.set()
        t.join(5)
        srv.close()
    assert s.failure is None and s.longest < control.CLIENT_TIMEOUT  # it never blocked (see above)


def test_many_hostile_clients_at_once(served: Served) -> None:
    """Every kind of client at once, several times over; a good one is still answered at once."""
    path = served.srv.path
    stalled = [connect(path) for _ in range(4)]
    for c in stalled:
        c.sendall(b'{"command": ')
    deep = [connect(path) for _ in range(4)]
    for c in deep:
        c.sendall(b"[" * 60_000 + b"\n")
    t0 = time.monotonic()
    assert ask(path, b'{"command": "status"}\n') == {"echo": {"command": "status"}}
    assert time.monotonic() - t0 < 0.5
    for c in deep:
        reply = answer(c)
        assert reply is not None and reply["error"] == "bad request: nested too deeply"
    for c in stalled:
        assert answer(c) is None
    assert served.srv.errors == 8 and served.srv.clients == 0


def test_close_closes_every_client(tmp_path: Path) -> None:
    srv = control.ControlServer(str(tmp_path / "c.sock"))
    srv.open()
    c = connect(srv.path)
    srv.serve(handler)
    assert srv.clients == 1
    srv.close()
    assert answer(c) is None and srv.clients == 0 and not Path(srv.path).exists()
    assert srv.waitables() == [] and srv.next_timeout() is None
    srv.serve(handler)  # after close: nothing, no error


def test_supervisor_never_echoes_a_strange_command() -> None:
    sup = Supervisor(load_config(EXAMPLES / "host-a.toml"), "host-a.toml")
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    assert sup.handle_request({"command": nested}) == {
        "error": "unknown command of type list (known: status, reload, ike, engine)"}
    reply = sup.handle_request({"command": "y" * 10_000})
    assert reply == {"error": f"unknown command {'y' * 40!r} (known: status, reload, ike, engine)"}
    assert sup.handle_request({}) == {
        "error": "unknown command of type NoneType (known: status, reload, ike, engine)"}
    # no worker to wait for: the status is answered at once
    st = sup.handle_request({"command": "status"})
    assert isinstance(st, dict) and st["daemon"]["control_errors"] == 0
    assert [w["state"] for w in st["workers"]] == ["stopped"] * len(sup.slots)


def test_deferred_answer_is_sent_when_ready_without_holding_anyone(tmp_path: Path) -> None:
    """A handler may answer later (the supervisor's status waits for its workers that way)."""
    later: list[control.Deferred] = []

    def deferring(req: dict[str, Any]) -> dict[str, Any] | control.Deferred:
        if req.get("command") == "later":
            d = control.Deferred(timeout=1.0)
            later.append(d)
            return d
        return {"echo": req}

    srv = control.ControlServer(str(tmp_path / "c.sock"))
    srv.open()
    c = connect(srv.path)
    c.sendall(b'{"command": "later"}\n')
    forgotten = connect(srv.path)
    forgotten.sendall(b'{"command": "later"}\n')
    deadline = time.monotonic() + 5
    while len(later) < 2 and time.monotonic() < deadline:
        wait(srv.waitables(), timeout=0.05)  # type: ignore[arg-type]
        srv.serve(deferring)
    assert len(later) == 2 and srv.clients == 2
    other = connect(srv.path)
    other.sendall(b'{"command": "now"}\n')
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:
        srv.serve(deferring)  # the waiting ones hold nobody
        time.sleep(0.01)
    assert srv.clients == 2
    assert answer(other) == {"echo": {"command": "now"}}
    later[0].response = {"late": True}
    srv.serve(deferring)
    assert answer(c) == {"late": True}
    # the other one is never answered: dropped a second after the handler's own limit
    while srv.clients and time.monotonic() - t0 < 5:
        wait(srv.waitables(), timeout=srv.next_timeout())  # type: ignore[arg-type]
        srv.serve(deferring)
    assert answer(forgotten) is None
    assert 1.5 < time.monotonic() - t0 < 3.0 and srv.errors == 1
    srv.close()


FD_PROBE = r"""
import errno, json, os, resource, socket, sys, time
from nfq_ipsec import control
from nfq_ipsec.config import load_config
from nfq_ipsec.status import StatusReport
from nfq_ipsec.supervisor import Supervisor

config, path = sys.argv[1], sys.argv[2]
sup = Supervisor(load_config(config), config)
sup.control = control.ControlServer(path)
sup.control.open()
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # made while descriptors are free
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fillers = []
while True:
    try:
        fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as err:
        assert err.errno == errno.EMFILE, err
        break
client.connect(path)  # waits in the listening socket's queue: accept() now fails with EMFILE
client.sendall(b'{"command": "status"}\n')
cpu, start, rounds = time.process_time(), time.monotonic(), 0
while time.monotonic() - start < 3.0:
    sup._wait_once()
    rounds += 1
full = {"cpu": time.process_time() - cpu, "rounds": rounds, "errors": sup.control.errors}
for fd in fillers:
    os.close(fd)
client.setblocking(False)
answer, start = b"", time.monotonic()
while not answer.endswith(b"\n") and time.monotonic() - start < 10:
    sup._wait_once()
    try:
        answer += client.recv(1 << 20)
    except BlockingIOError:
        pass
full["recovered_after"] = time.monotonic() - start
full["answer"] = json.loads(answer) if answer.endswith(b"\n") else None
sup.control.close()
print(json.dumps(full))
"""


def test_out_of_descriptors_the_loop_backs_off_and_recovers(tmp_path: Path) -> None:
    """accept() failing with EMFILE leaves the connection queued and the listening socket
    readable: the supervisor's loop must not poll it again at once (that spins at full CPU).
    Run in a process of its own with RLIMIT_NOFILE lowered and the table filled."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", FD_PROBE, str(EXAMPLES / "host-a.toml"),
                          str(tmp_path / "c.sock")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    # 3 s of a full table: a spinning loop makes ~1e5 rounds and burns ~3 s of CPU
    assert got["cpu"] < 0.5 and got["rounds"] < 60, got
    assert 2 <= got["errors"] <= 10, got  # each failed accept counted (0.1, 0.2, 0.4, 0.8, 1.6 s)
    assert "cannot accept a connection: Too many open files" in res.stderr
    assert got["answer"] is not None and got["answer"]["daemon"]["pid"] > 0, got
    assert got["recovered_after"] < control.ACCEPT_BACKOFF_MAX + 2.0, got  # the next try takes it


# -- control socket ----------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[control.ControlServer]:
    srv = control.ControlServer(str(tmp_path / "run" / "sub" / "ctl.sock"))
    srv.open()
    stop = threading.Event()

    def serve() -> None:
        from multiprocessing.connection import wait

        while not stop.is_set():
            wait(srv.waitables(), timeout=0.05)  # type: ignore[arg-type]
            srv.serve(lambda req: {"echo": req, "secret": None})

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join()
    srv.close()


def test_control_socket_roundtrip_and_modes(server: control.ControlServer, tmp_path: Path) -> None:
    path = Path(server.path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert control.request(server.path, {"command": "status"}) == {
        "echo": {"command": "status"}, "secret": None}
    with pytest.raises(control.ControlError, match="another nfq-ipsec daemon is running") as err:
        control.ControlServer(server.path).open()
    assert "needs its own daemon.control_socket" in str(err.value)  # names what to change


def test_control_socket_replaces_stale_socket_and_refuses_non_socket(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the path stays, nobody listens
    srv = control.ControlServer(str(stale))
    srv.open()
    srv.close()
    assert not stale.exists()
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(control.ControlError, match="not a socket"):
        control.ControlServer(str(plain)).open()


def test_status_not_running_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nfq_ipsec.cli import main

    assert main(["status", "--socket", str(tmp_path / "nope.sock")]) == 3
    assert "not running" in capsys.readouterr().err


# Some fields left out, as an answer from another version of the daemon may: they show as "-".
SAMPLE_STATUS = cast(StatusReport, {
    "daemon": {"pid": 10, "uptime": 3725.0, "config": "/etc/x.toml", "state": "running",
               "rules_installed": True, "core": "compiled (mypyc 2.4.1)"},
    "workers": [
        {"queue": 100, "cpu": 0, "pid": 11, "uptime": 12.5, "restarts": 1, "state": "ready",
         "packets_in": 10, "packets_out": 8, "drops": {"replay": 2}, "kernel_queue_dropped": 0,
         "user_dropped": 0, "last_error": None, "cpu_seconds": 3.254, "memory_bytes": 33030144},
        {"queue": 101, "cpu": 1, "pid": None, "uptime": None, "restarts": 3, "state": "down",
         "packets_in": None, "packets_out": None, "drops": None, "kernel_queue_dropped": None,
         "user_dropped": None, "last_error": "queue 101: bind failed"},
    ],
    "sas": [
        {"name": "a-to-b-0", "spi": "0x00001000", "direction": "out", "queue": 100, "packets": 8,
         "bytes": 800, "replay_drops": 0, "integrity_drops": 0, "other_drops": 0, "seq": 8,
         "lifetime_left": {"packets": None, "bytes": None, "seconds": 3500.0}},
        {"name": "a-to-b-1", "spi": "0x00001001", "direction": "out", "queue": 101, "packets": None,
         "bytes": None, "replay_drops": None, "integrity_drops": None, "other_drops": None,
         "seq": None, "lifetime_left": None},
    ],
})


def test_render_status_text() -> None:
    text = control.render_status(SAMPLE_STATUS)
    assert "nfq-ipsec running: pid 10, up 1h02m, rules installed" in text
    assert "core: compiled (mypyc 2.4.1)" in text.splitlines()[1]
    lines = text.splitlines()
    assert any(line.split()[:4] == ["100", "0", "11", "ready"] for line in lines)
    assert any(line.split()[:4] == ["101", "1", "-", "down"] for line in lines)
    ready = next(line for line in lines if line.startswith("100 "))
    assert ready.endswith("3.25s     31.5 MiB")  # CPU TIME and MEM, psutil's figures
    assert next(line for line in lines if line.startswith("101 ")).endswith("-         -")
    assert "q100 drops: replay=2" in text
    assert "q101 last error: queue 101: bind failed" in text
    assert any(line.startswith("a-to-b-0") and "0x00001000" in line and "58m20s" in line for line in lines)
    assert any(line.startswith("a-to-b-1") and line.rstrip().endswith("-") for line in lines)


def test_sizes_and_cpu_times_read_as_people_write_them() -> None:
    assert [control.fmt_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30, 5000 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "5000.0 GiB"]
    assert control.fmt_bytes(None) == control.fmt_cpu(None) == "-"
    assert control.fmt_cpu(0.005) == "0.01s" and control.fmt_cpu(61) == "61.00s"


def test_render_status_dates_old_rule_counters() -> None:
    fresh: StatusReport = {**SAMPLE_STATUS, "kernel_drops": {"no_policy": 4}, "kernel_drops_age": 0.03}
    assert "  dropped by our iptables rules (never queued): no_policy=4" in control.render_status(fresh)
    old: StatusReport = {**fresh, "kernel_drops_age": 12.4,
                         "warnings": ["the rule counters were not read within 2 s; "
                                      "kernel_drops are from a read 12.4 s ago"]}
    text = control.render_status(old)
    assert "  dropped by our iptables rules (never queued, read 12s ago): no_policy=4" in text
    assert "WARNING: the rule counters were not read within 2 s" in text


@pytest.mark.root
def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """Whoever can write the socket's directory could put their own socket in its place and
    answer status and stop: such a directory is refused, naming it and the fix."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, not sticky
    srv = control.ControlServer(str(shared / "c.sock"))
    with pytest.raises(control.ControlError) as err:
        srv.open()
    assert str(shared) in str(err.value) and "writable by group or others" in str(err.value)
    assert not (shared / "c.sock").exists()
    shared.chmod(0o700)
    srv.open()  # the same directory, ours alone: fine
    srv.close()
