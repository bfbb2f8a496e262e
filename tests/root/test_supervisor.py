"""The daemon as a whole: ``nfq-ipsec run`` in namespaces of our own (root), driven like an
operator would (status, kill -9, SIGTERM), plus the config-error path (no root).

- a bad configuration: exit 2, every problem printed, nothing created;
- run / status / kill -9 a worker / SIGTERM: both workers come up with pids, the killed one
  comes back with restarts=1, SIGTERM exits 0 and iptables-save is exactly as before;
- two daemons (one per namespace) carry UDP from A to B as ESP: the wire shows ESP only, the
  peer receives every datagram intact, the SA counters on both sides agree;
- a worker that can't bind its queue stops the daemon after 3 tries (exit 1, clear error,
  nothing installed);
- the test-only fault injection proves fail closed end to end: every packet dropped as
  "internal", nothing reaches the peer;
- ``status --json`` of a daemon that carried traffic has the schema of docs/status.md
  (``statusschema.GOLDEN``, tests/statusschema.py) at every level.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labutil import (
    ADDR_B,
    QUEUES,
    SPI_AB,
    SPI_BA,
    Daemon,
    Pair,
    make_keys,
    make_pair,
    nfq_ipsec,
    write_config,
)
from labutil import env as _env
from statusschema import COMPARING, OFFLOADING, WITHOUT_IKE, check_answer

PORT = 6000
# -- namespaces and the daemon (the lab's, through tests/labutil.py) ---------------------------
@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("w") as p:
        yield p


def _daemon(pair: Pair, ns: str, tmp_path: Path, name: str, keys: dict[str, str], a_side: bool,
            daemons: list[Daemon], **env: str) -> Daemon:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    cfg = write_config(d, a_side, pair.va if a_side else pair.vb, keys, per_port=False)
    daemon = Daemon(name, pair.host(ns), cfg, env=_env(**env), log=d / "daemon.log", lab=pair.lab)
    daemons.append(daemon)
    return daemon


# -- tests ----------------------------------------------------------------------------------------
def test_invalid_config_exit_2_and_nothing_created(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from nfq_ipsec.cli import main

    keys = make_keys()
    cfg = write_config(tmp_path, True, "eth0", keys, per_port=False)
    text = cfg.read_text().replace('encryption = "aes-gcm-128"', 'encryption = "rot13"', 1)
    cfg.write_text(text.replace(f"queue = {QUEUES[1]}", "queue = 999"))
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "sa[0].encryption" in err and "sa[1].queue" in err  # every problem, with its place
    assert not (tmp_path / "run").exists()
    for key in keys.values():
        assert key not in err


def test_run_status_restart_and_clean_stop(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    before = pair.iptables_save(pair.a)
    keys = make_keys()
    d = _daemon(pair, pair.a, tmp_path, "a", keys, True, daemons)
    d.start()
    st = d.wait_running()
    assert [w["queue"] for w in st["workers"]] == list(QUEUES)
    pids = [w["pid"] for w in st["workers"]]
    assert all(isinstance(p, int) and p > 0 for p in pids) and len(set(pids)) == 2
    assert st["daemon"]["rules_installed"] is True
    assert st["daemon"]["pid"] == d.proc.pid if d.proc else False
    assert {s["name"] for s in st["sas"]} == {"ab0", "ab1", "ba0", "ba1"}
    spis = (SPI_AB, SPI_AB + 1, SPI_BA, SPI_BA + 1)
    assert {s["spi"] for s in st["sas"]} == {f"0x{spi:08x}" for spi in spis}
    during = "\n".join(pair.iptables_save(pair.a))
    assert "NFQIPSEC" in during and "--queue-bypass" not in during
    sock = d.config.parent / "run" / "ctl.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"

    # Each worker holds only its own queue's SAs (the compartment model).
    for w in st["workers"]:
        mine = {s["name"] for s in st["sas"] if s["queue"] == w["queue"]}
        assert mine == {f"ab{QUEUES.index(w['queue'])}", f"ba{QUEUES.index(w['queue'])}"}

    os.kill(pids[0], signal.SIGKILL)
    st = d.wait_for(lambda s: s["workers"][0]["restarts"] == 1 and s["workers"][0]["state"] == "ready",
                    what="restart of the killed worker")
    assert st["workers"][0]["pid"] not in (None, pids[0])
    assert st["workers"][1]["pid"] == pids[1] and st["workers"][1]["restarts"] == 0

    assert d.stop() == 0
    closed = pair.iptables_save(pair.a)
    assert closed != before and any("NFQIPSEC" in line for line in closed)
    assert not any("NFQUEUE" in line for line in closed)  # every queue rule now drops
    assert not sock.exists()
    time.sleep(0.5)
    for pid in d.worker_pids:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
    log = d.log_text()
    assert "died, killed by SIGKILL" in log and "restarting in 0.1 s" in log, log
    assert "rules closed" in log
    for key in keys.values():
        assert key not in log
    # Afterwards the daemon is gone: status says so with exit 3.
    res = pair.run(pair.a, *nfq_ipsec(), "status", "--config", str(d.config), check=False, environ=_env())
    assert res.returncode == 3 and "not running" in res.stderr
    # Taking the rules out is a deliberate act, after which iptables is exactly as before.
    pair.run(pair.a, *nfq_ipsec(), "rules", "remove", "--config", str(d.config), environ=_env())
    assert pair.iptables_save(pair.a) == before


SNIFFER = textwrap.dedent("""
    import json, socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((sys.argv[1], 0))
    s.settimeout(0.2)
    marker = sys.argv[2].encode()
    protos, leaked = {}, 0
    print("READY", flush=True)
    end = time.time() + float(sys.argv[3])
    while time.time() < end:
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        ip = frame[14:]
        protos[ip[9]] = protos.get(ip[9], 0) + 1
        leaked += marker in frame
    print(json.dumps({"protos": protos, "leaked": leaked}), flush=True)
""")

RECEIVER = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(float(sys.argv[3]))
    print("READY", flush=True)
    got = []
    try:
        while True:
            got.append(s.recv(65535).decode())
    except socket.timeout:
        pass
    print(json.dumps(got), flush=True)
""")

SENDER = textwrap.dedent("""
    import json, socket, sys, time
    for msg in json.loads(sys.argv[3]):
        t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # new source port: new flow
        t.sendto(msg.encode(), (sys.argv[1], int(sys.argv[2])))
        t.close()
        time.sleep(0.01)
""")


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", proc.communicate()[1]


def _result(proc: subprocess.Popen[str]) -> Any:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _send(pair: Pair, messages: list[str], sniff_iface: str | None = None,
          marker: str = "") -> tuple[list[str], dict[str, Any] | None]:
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, str(PORT), "2.0")
    sniffer = pair.python(pair.b, SNIFFER, sniff_iface, marker, "3.0") if sniff_iface else None
    try:
        _ready(receiver)
        if sniffer:
            _ready(sniffer)
        sender = pair.python(pair.a, SENDER, ADDR_B, str(PORT), json.dumps(messages))
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
        got = _result(receiver)
        sniffed = _result(sniffer) if sniffer else None
    finally:
        for p in (receiver, sniffer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return got, sniffed


def _running_pair(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> tuple[Daemon, Daemon]:
    """Both daemons (shared fresh keys), started and running."""
    keys = make_keys()
    a = _daemon(pair, pair.a, tmp_path, "a", keys, True, daemons)
    b = _daemon(pair, pair.b, tmp_path, "b", keys, False, daemons)
    a.start()
    b.start()
    a.wait_running()
    b.wait_running()
    return a, b


def test_two_daemons_carry_traffic_as_esp(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    a, b = _running_pair(pair, tmp_path, daemons)
    marker = "CLEARTEXT-MARKER"
    messages = [f"{marker}-{i}-" + "x" * size for i, size in enumerate([10, 1400, 8000] * 10)]
    got, sniffed = _send(pair, messages, sniff_iface=pair.vb, marker=marker)
    assert sorted(got) == sorted(messages)
    assert sniffed is not None
    assert sniffed["leaked"] == 0
    assert sniffed["protos"].get("50", 0) >= len(messages)  # ESP on the wire
    assert sniffed["protos"].get("17", 0) == 0  # and no UDP
    sa_a = {s["name"]: s for s in a.status()["sas"]}
    sa_b = {s["name"]: s for s in b.status()["sas"]}
    assert sa_a["ab0"]["packets"] + sa_a["ab1"]["packets"] == len(messages)
    assert sa_b["ab0"]["packets"] + sa_b["ab1"]["packets"] == len(messages)
    for n in ("ab0", "ab1"):
        assert sa_a[n]["seq"] == sa_b[n]["seq"] == sa_a[n]["packets"]  # out next_seq-1, in top
        assert sa_b[n]["replay_drops"] == sa_b[n]["integrity_drops"] == 0
    assert a.stop() == 0
    assert b.stop() == 0


def test_fault_injection_fails_closed(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    a = _daemon(pair, pair.a, tmp_path, "a", make_keys(), True, daemons,
                NFQ_IPSEC_TEST_FAULT="raise-every-packet")
    a.start()
    a.wait_running()
    messages = [f"m{i}" for i in range(20)]
    got, _ = _send(pair, messages)
    assert got == []
    st = a.status()
    assert st is not None
    assert sum((w["drops"] or {}).get("internal", 0) for w in st["workers"]) == len(messages)
    assert sum(w["packets_out"] for w in st["workers"]) == 0
    assert a.stop() == 0
    assert a.log_text().count("internal error handling a packet") <= 2  # rate-limited


def test_status_json_has_the_golden_schema(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    a, b = _running_pair(pair, tmp_path, daemons)
    messages = [f"schema-{i}" for i in range(10)]
    got, _ = _send(pair, messages)
    assert sorted(got) == sorted(messages)
    for d in (a, b):
        st = d.status()  # nfq-ipsec status --json
        assert check_answer(st) == WITHOUT_IKE - COMPARING - OFFLOADING and st["ike"] is None, st
        assert st["kernel_drops"] is not None and st["kernel_drops_age"] is not None
        assert all(s["saved"] is not None for s in st["sas"] if s["packets"])  # state files
    assert a.stop() == 0
    assert b.stop() == 0


SCRAPE = textwrap.dedent("""
    import sys, urllib.request
    with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10) as r:
        print(r.headers["Content-Type"])
        sys.stdout.write(r.read().decode())
""")


def test_metrics_of_a_running_daemon(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """daemon.metrics on the real daemon: a scrape from its namespace, read back with
    prometheus_client's parser, counts what went through and names no key."""
    from prometheus_client.parser import text_string_to_metric_families

    keys = make_keys()
    a = _daemon(pair, pair.a, tmp_path, "a", keys, True, daemons)
    listen = "127.0.0.1:9477"
    a.config.write_text(a.config.read_text().replace("[daemon]\n", f'[daemon]\nmetrics = "{listen}"\n', 1))
    b = _daemon(pair, pair.b, tmp_path, "b", keys, False, daemons)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    messages = [f"metrics-{i}" for i in range(12)]
    got, _ = _send(pair, messages)
    assert sorted(got) == sorted(messages)
    scrape = pair.python(pair.a, SCRAPE, listen)
    out, err = scrape.communicate(timeout=30)
    assert scrape.returncode == 0, err
    ctype, text = out.split("\n", 1)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    sent = sum(v for (name, labels), v in samples.items()
               if name == "nfq_ipsec_sa_packets_total" and ("direction", "out") in labels)
    assert sent == len(messages)
    assert all(v == 1 for (name, _), v in samples.items() if name == "nfq_ipsec_worker_up")
    assert samples[("nfq_ipsec_rules_installed", ())] == 1
    # CPU time and memory per worker (psutil), as status has them: every ready worker has both
    st = a.status()
    for w in st["workers"]:
        q = (("queue", str(w["queue"])),)
        assert w["cpu_seconds"] is not None and w["memory_bytes"] is not None, w
        assert samples[("nfq_ipsec_worker_resident_memory_bytes", q)] > 1 << 20
        # the scrape came first, and a worker's CPU time only grows
        assert 0 < samples[("nfq_ipsec_worker_cpu_seconds_total", q)] <= w["cpu_seconds"]
    assert 0 < samples[("nfq_ipsec_cpu_seconds_total", ())] <= st["daemon"]["cpu_seconds"]
    for key in keys.values():
        assert key not in text and key.upper() not in text
    assert a.stop() == 0
    assert b.stop() == 0


def test_the_real_daemon_tells_systemd(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """``nfq-ipsec run`` with a unix datagram socket as systemd's ``$NOTIFY_SOCKET``: READY=1
    once it runs (workers ready, rules installed), WATCHDOG=1 at half of ``$WATCHDOG_USEC``,
    STOPPING=1 on SIGTERM. And its stderr as the journal's stream (``$JOURNAL_STREAM``) with a
    stand-in journal on the socket: the supervisor's and each worker's lines arrive there as
    native entries with their fields, none on stderr."""
    import socket as socketlib

    from nfq_ipsec import journal

    notify = tmp_path / "notify"
    sd = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    sd.bind(str(notify))
    sd.settimeout(30)
    # as journald's: a socket the sandboxed workers' user may write, on a path it may walk
    # (pytest's own directories are root's alone)
    jdir = Path(tempfile.mkdtemp(prefix="nfq-ipsec-journal-"))
    jdir.chmod(0o755)
    journal_path = jdir / "socket"
    jsock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    jsock.bind(str(journal_path))
    journal_path.chmod(0o666)
    jsock.settimeout(0.2)
    entries: list[dict[str, str]] = []
    reading = threading.Event()
    reading.set()

    def read_journal() -> None:  # at once: the kernel queues only a few datagrams on a socket
        while reading.is_set():
            with contextlib.suppress(TimeoutError):
                entries.append(dict(journal.decode(jsock.recv(1 << 20))))

    reader = threading.Thread(target=read_journal, daemon=True)
    reader.start()
    (tmp_path / "a").mkdir()
    log = tmp_path / "a" / "daemon.log"
    log.touch()
    stream = log.stat()
    try:
        a = _daemon(pair, pair.a, tmp_path, "a", make_keys(), True, daemons,
                    NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="1000000",
                    JOURNAL_STREAM=f"{stream.st_dev}:{stream.st_ino}",
                    NFQ_IPSEC_JOURNAL_SOCKET=str(journal_path))
        a.config.write_text(a.config.read_text().replace('log_level = "info"', 'log_level = "debug"'))
        a.start()
        first = sd.recv(4096).decode()
        while not first.startswith("READY=1"):  # WATCHDOG=1 may come first, while starting
            assert first == "WATCHDOG=1", first
            first = sd.recv(4096).decode()
        assert first.startswith(f"READY=1\nSTATUS=running: {len(QUEUES)} worker(s) ready, rules installed")
        st = a.status()  # what READY=1 promised is so
        assert st is not None and st["daemon"]["rules_installed"]
        assert all(w["state"] == "ready" for w in st["workers"])
        t0 = time.monotonic()
        assert sd.recv(4096) == b"WATCHDOG=1"
        assert sd.recv(4096) == b"WATCHDOG=1"
        assert time.monotonic() - t0 < 2.5  # every 0.5 s
        assert a.stop() == 0
        said = []
        sd.settimeout(1)
        with contextlib.suppress(TimeoutError):
            while True:
                said.append(sd.recv(4096).decode())
        assert [m for m in said if m != "WATCHDOG=1"] == [
            "STOPPING=1\nSTATUS=stopping: closing the rules, stopping the workers"]
        time.sleep(0.5)
        reading.clear()
        reader.join()
        ready = [e for e in entries if e["NFQ_PROCESS"] == "supervisor"
                 and e["MESSAGE"].startswith("[supervisor] worker for queue") and " ready" in e["MESSAGE"]]
        assert sorted(e["NFQ_QUEUE"] for e in ready) == sorted(str(q) for q in QUEUES), entries
        assert all(e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "nfq-ipsec" for e in ready)
        assert any(e["MESSAGE"] == "[supervisor] stopped" for e in entries), entries
        workers = {e["NFQ_PROCESS"]: e["NFQ_QUEUE"] for e in entries if e["NFQ_PROCESS"] != "supervisor"}
        assert workers == {f"q{q}": str(q) for q in QUEUES}, entries  # each worker's own lines
        assert "nfq-ipsec[" not in a.log_text()  # nothing went to stderr instead
    finally:
        reading.clear()
        reader.join()
        sd.close()
        jsock.close()
        shutil.rmtree(jdir, ignore_errors=True)


def test_stop_command_reads_back_closed_rules(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """``nfq-ipsec stop`` (no --remove-rules): SIGTERM, wait, then the rules as the kernel has
    them: closed, which it says; exit 0."""
    a, _b = _running_pair(pair, tmp_path, daemons)
    res = pair.run(pair.a, *nfq_ipsec(), "stop", "--config", str(a.config), check=False)
    assert res.returncode == 0, res.stderr
    assert "its rules are closed (protected traffic is dropped)" in res.stdout, res.stdout
    assert a.proc is not None and a.proc.wait(5) == 0
    assert any("NFQIPSEC" in line and "DROP" in line for line in pair.iptables_save(pair.a))


HOLD_QUEUE = textwrap.dedent("""
    import sys, time
    from nfq_ipsec.nfqueue import NetlinkQueue
    q = NetlinkQueue(); q.bind(int(sys.argv[1]))
    print("READY", flush=True)
    sys.stdin.read()
""")


def test_worker_that_cannot_start_stops_the_daemon(pair: Pair, tmp_path: Path,
                                                   daemons: list[Daemon]) -> None:
    before = pair.iptables_save(pair.a)
    holder = subprocess.Popen(
        ["ip", "netns", "exec", pair.a, sys.executable, "-c", HOLD_QUEUE, str(QUEUES[0])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        _ready(holder)
        d = _daemon(pair, pair.a, tmp_path, "a", make_keys(), True, daemons)
        d.start()
        assert d.proc is not None
        assert d.proc.wait(60) == 1
    finally:
        holder.kill()
        holder.wait()
    log = d.log_text()
    assert f"worker for queue {QUEUES[0]} died before becoming ready 3 times in a row" in log
    assert "another process holds this queue" in log
    assert pair.iptables_save(pair.a) == before  # never installed
    assert not (d.config.parent / "run" / "ctl.sock").exists()


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _in_a_terminal(argv: list[str], seconds: float, columns: int = 250) -> str:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr (``columns`` wide),
    and return everything it wrote there, escape sequences removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    env = _env(TERM="xterm-256color", COLUMNS=str(columns), LINES="60")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed (the process ended)
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return ANSI.sub("", out.decode(errors="replace")).replace("\r", "")


def test_top_in_a_terminal_shows_the_rates_of_the_traffic(pair: Pair, tmp_path: Path,
                                                            daemons: list[Daemon]) -> None:
    """``nfq-ipsec top`` in a pseudo-terminal while A pings B 20 times a second: its last
    frame's SA rates add up to about 20 packets a second each way, and its packet totals lie
    between two status answers taken before and after it."""
    a, b = _running_pair(pair, tmp_path, daemons)
    from nfq_ipsec_lab.lab.traffic import PING_SRC

    ping = subprocess.Popen(pair.host(pair.a).argv([sys.executable, "-c", PING_SRC, ADDR_B, "400", "2.0",
                                                     "0", "-", "0.05"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        before = {s["name"]: s for s in a.status()["sas"]}
        text = _in_a_terminal([sys.executable, "-m", "nfq_ipsec.cli", "top", "-c", str(a.config),
                               "--interval", "1", "--iterations", "4"], seconds=30)
        after = {s["name"]: s for s in a.status()["sas"]}
    finally:
        ping.kill()
        pinged, _ = ping.communicate()
    lines = text.splitlines()
    assert any("nfq-ipsec running:" in line and "rates over" in line for line in lines), text
    rows = {}
    for line in lines:  # the last frame's row of each SA (the live view redraws in place)
        cells = line.split()
        if cells and cells[0] in after and len(cells) >= 8 and cells[1] == after[cells[0]]["spi"]:
            rows[cells[0]] = cells
    assert set(rows) == set(after), text
    for direction in ("out", "in"):
        names = [n for n, s in after.items() if s["direction"] == direction]
        rate = sum(float(rows[n][4]) for n in names)
        assert 10 <= rate <= 30, (direction, rate, text, pinged)  # 20 pings (and replies) a second
        for n in names:
            unit = next(i for i, cell in enumerate(rows[n]) if cell.endswith("bit/s"))  # RATE's
            total = int(rows[n][unit + 2])  # after DROPS/s: PACKETS
            assert before[n]["packets"] <= total <= after[n]["packets"], rows[n]
    queue_rows = [line.split() for line in lines if line.split()[:1] in ([str(q)] for q in QUEUES)]
    assert all(r[1] == "ready" and r[-1] in ("MiB", "KiB", "GiB") for r in queue_rows[-2:]), queue_rows
    assert a.stop() == 0
    assert b.stop() == 0


def test_node_mtu_is_the_interfaces_when_not_set(pair: Pair, tmp_path: Path) -> None:
    """A configuration without ``node.mtu`` takes its interface's MTU (the veth's 9000) in the
    namespace it is read in, and the rules' MSS clamp follows it; where the interface does not
    exist, 1500 and check-config says why."""
    cfg = write_config(tmp_path / "a", True, pair.va, make_keys(), per_port=False)
    cfg.write_text(cfg.read_text().replace("mtu = 1500\n", "", 1))
    inside = pair.run(pair.a, *nfq_ipsec(), "check-config", "-c", str(cfg), environ=_env()).stdout
    assert f"mtu 9000 ({pair.va}'s)" in inside, inside
    outside = subprocess.run([*nfq_ipsec(), "check-config", "-c", str(cfg)], env=_env(),
                             capture_output=True, text=True, check=True).stdout
    assert f"mtu 1500 (the default ({pair.va} does not exist here))" in outside, outside
    pair.run(pair.a, "ip", "link", "set", pair.va, "mtu", "4000")
    rules = pair.run(pair.a, *nfq_ipsec(), "rules", "show", "-c", str(cfg), environ=_env()).stdout
    clamp = re.search(r"--set-mss (\d+)", rules)
    assert clamp is not None and 3800 < int(clamp.group(1)) < 4000 - 40, rules  # MTU 4000 less ESP


def test_busy_polling_is_counted_in_status(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """``daemon.busy_poll``: pings 2 ms apart through A's workers; status counts the polls
    that caught a packet and those that ran out, and a daemon without it counts none."""
    from nfq_ipsec_lab.lab.traffic import ping

    a, b = _running_pair(pair, tmp_path, daemons)
    assert ping(pair.host(pair.a), ADDR_B, count=5).received == 5
    off = a.status()["workers"]
    assert all(w["busy_poll_hits"] == w["busy_poll_misses"] == 0 for w in off), off
    assert a.stop() == 0
    a.config.write_text(a.config.read_text().replace("[daemon]\n", "[daemon]\nbusy_poll = 2000\n", 1))
    a.start()
    a.wait_running()
    assert ping(pair.host(pair.a), ADDR_B, count=50, interval=0.002).received == 50
    workers = a.status()["workers"]
    assert sum(w["busy_poll_hits"] for w in workers) > 0, workers  # replies caught while polling
    assert sum(w["busy_poll_misses"] for w in workers) > 0, workers  # the windows after the last
    assert "busy polling:" in a.status_text()
    assert a.stop() == 0
    assert b.stop() == 0
