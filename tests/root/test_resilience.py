"""Resilience of the real daemon (root; namespaces ``nfqx<pid>...``):

- SA continuity: through a SIGKILLed sender worker, a SIGKILLed receiver worker, a clean
  restart of both daemons and a crash of both (supervisor and workers SIGKILLed), the wire never
  carries the same (SPI, sequence number) twice, the peer accepts the traffic (losing exactly
  the packets whose numbers the restarted receiver's saved floor covers, and only those), the
  restarted workers resume where the state files say, and ESP captured before the crashes and
  replayed afterwards is dropped as ``replay`` and counted;
- a SIGKILLed worker under load: paced flows on the other queue lose nothing, the dead queue's
  flows lose only the outage (never cleartext on the wire), the worker is back (figure printed);
- status counts go on across a worker's restart (from its answers to the watchdog's pings);
- a hung worker (alive, answering nothing): the watchdog kills it, a new one takes over, the
  other queue's worker is untouched;
- a SIGKILLed supervisor: the rules stay and traffic fails closed, the workers exit by
  themselves, a new daemon takes over the leftover rules without duplicating them, and
  ``nfq-ipsec rules remove`` restores iptables-save exactly.

Figures are printed (run with ``-s`` to see them); nothing here asserts a duration except
generous timeouts.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labutil import (
    ADDR_A,
    ADDR_B,
    PACED,
    PORTS,
    QUEUES,
    RECEIVER,
    SPI_AB,
    Daemon,
    Pair,
    Sniffer,
    alive,
    daemon,
    end,
    esp_ids,
    inject,
    make_keys,
    make_pair,
    nfq_ipsec,
    ready,
    result,
    running_pair,
    send,
    wait_gone,
)

MARKER = "CLEAR-TEXT-MARKER"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("r") as p:
        yield p


def _phase(pair: Pair, a: Daemon, b: Daemon, tag: str, per_port: int = 25) -> list[int]:
    """Send ``per_port`` datagrams to each port (one flow each) and check what arrives against
    the SA state on both sides: on SA ab<i>, exactly the numbers at or below the receiver's
    window top (its restored floor) are refused. Returns the number lost per queue."""
    st_a, st_b = a.status(), b.status()
    assert st_a is not None and st_b is not None
    nxt = [a.sa(st_a, f"ab{i}")["seq"] + 1 for i in range(len(QUEUES))]
    floor = [b.sa(st_b, f"ab{i}")["seq"] for i in range(len(QUEUES))]
    replays = [b.sa(st_b, f"ab{i}")["replay_drops"] for i in range(len(QUEUES))]
    messages = [(PORTS[i], f"{MARKER}-{tag}-{i}-{n}") for n in range(per_port) for i in range(len(QUEUES))]
    got = send(pair, messages)
    lost = []
    st_b = b.status()
    assert st_b is not None
    for i in range(len(QUEUES)):
        mine = [m for port, m in messages if port == PORTS[i]]
        expect = min(len(mine), max(0, floor[i] - nxt[i] + 1))
        assert [g for g in got if f"-{tag}-{i}-" in g] == mine[expect:], (tag, i, nxt[i], floor[i])
        assert b.sa(st_b, f"ab{i}")["replay_drops"] - replays[i] == expect
        lost.append(expect)
    return lost


def _sa_field(d: Daemon, name: str, key: str) -> Any:
    st = d.status()
    assert st is not None
    return d.sa(st, name)[key]


def test_sa_state_survives_worker_and_daemon_crashes(pair: Pair, tmp_path: Path,
                                                     daemons: list[Daemon]) -> None:
    keys = make_keys()
    a, b = running_pair(pair, tmp_path, keys, daemons)
    sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / "wire.pcap")
    figures: dict[str, Any] = {}
    try:
        assert _phase(pair, a, b, "p1") == [0, 0]

        # 1. The sender's worker for queue 0 is killed: it resumes from its reservation.
        st = a.status()
        assert st is not None
        saved = a.sa(st, "ab0")["saved"]
        sent_before = a.sa(st, "ab0")["seq"]
        assert saved is not None and saved >= sent_before
        os.kill(a.worker_pid(st, 0), signal.SIGKILL)
        st = a.wait_for(lambda s: s["workers"][0]["restarts"] == 1 and s["workers"][0]["state"] == "ready",
                        what="sender worker back")
        assert a.sa(st, "ab0")["seq"] == saved  # the next number sent is the first never reserved
        figures["sender restart: numbers skipped"] = saved - sent_before
        assert _phase(pair, a, b, "p2") == [0, 0]

        # 2. The receiver's worker for queue 0 is killed: its window restarts at the saved floor.
        st = b.status()
        assert st is not None
        floor = b.sa(st, "ab0")["saved"]
        assert floor is not None and floor >= b.sa(st, "ab0")["seq"]
        os.kill(b.worker_pid(st, 0), signal.SIGKILL)
        st = b.wait_for(lambda s: s["workers"][0]["restarts"] == 1 and s["workers"][0]["state"] == "ready",
                        what="receiver worker back")
        assert b.sa(st, "ab0")["seq"] == floor
        # enough to get past the floor: the last 25 of queue 0 must arrive
        refused = _phase(pair, a, b, "p3", per_port=floor - _sa_field(a, "ab0", "seq") + 25)
        assert refused[1] == 0
        figures["receiver restart: packets refused"] = refused[0]

        # 3. Clean restart of both daemons: exact state, nothing skipped, nothing refused.
        before = {n: _sa_field(a, n, "seq") for n in ("ab0", "ab1")}
        top = {n: _sa_field(b, n, "seq") for n in ("ab0", "ab1")}
        assert a.stop() == 0 and b.stop() == 0
        a.start()
        b.start()
        a.wait_running()
        b.wait_running()
        assert {n: _sa_field(a, n, "seq") for n in ("ab0", "ab1")} == before
        assert {n: _sa_field(b, n, "seq") for n in ("ab0", "ab1")} == top
        assert _phase(pair, a, b, "p4") == [0, 0]

        # 4. Both daemons crash (workers and supervisors SIGKILLed): the rules stay; the new
        # daemons take them over and resume from the reservations.
        reserved = {n: _sa_field(a, n, "saved") for n in ("ab0", "ab1")}
        a.crash()
        b.crash()
        a.start()
        b.start()
        a.wait_running()
        b.wait_running()
        assert {n: _sa_field(a, n, "seq") for n in ("ab0", "ab1")} == reserved
        lost = _phase(pair, a, b, "p5")
        figures["crash of both daemons: packets refused"] = lost
    finally:
        drops = sniffer.stop()
    assert drops == 0  # the capture is complete, so what follows covers every frame

    packets = sniffer.packets()
    ids = esp_ids(packets)
    assert len(ids) >= 5 * 2 * 25
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"(SPI, seq) sent twice: {sorted(dup)[:10]}"
    assert all(p[9] != 17 for p in packets if p[12:16] == bytes(map(int, ADDR_A.split("."))))
    assert MARKER.encode() not in (tmp_path / "wire.pcap").read_bytes()
    figures["ESP packets on the wire"] = len(ids)
    figures["(SPI, seq) pairs sent twice"] = len(dup)

    # 5. Replay ESP captured before the crashes (the oldest and the newest of each SA).
    esp = [p for p in packets if p[9] == 50]
    chosen = []
    for i in range(len(QUEUES)):
        mine = [p for p in esp if int.from_bytes(p[20:24], "big") == SPI_AB + i]
        chosen += [mine[0], mine[-1]]
    st = b.status()
    assert st is not None
    replays = {n: b.sa(st, n)["replay_drops"] for n in ("ab0", "ab1")}
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, PORTS)), "0", stdin=True)
    try:
        ready(receiver)
        inject(pair, chosen)
        time.sleep(0.5)
        got = result(receiver, stdin="")
    finally:
        end(receiver)
    assert got == []
    st = b.status()
    assert st is not None
    assert {n: b.sa(st, n)["replay_drops"] - replays[n] for n in ("ab0", "ab1")} == {"ab0": 2, "ab1": 2}
    assert all(w["restarts"] == 0 for w in st["workers"])  # the replays harmed no worker
    print(f"\nSA continuity figures: {json.dumps(figures)}")
    for d in (a, b):
        log = d.log_text()
        for key in keys.values():
            assert key not in log


def test_killed_worker_under_load(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """Paced flows on both queues; A's worker for queue 0 is SIGKILLed in the middle."""
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons)
    b = daemon(pair, tmp_path, False, keys, daemons)
    a.start()
    b.start()
    st = a.wait_running()
    b.wait_running()
    victim = a.worker_pid(st, 0)
    survivor = a.worker_pid(st, 1)
    gap, seconds, flows = 0.004, 5.0, 3
    sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / "wire.pcap")
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, PORTS)), "0", stdin=True)
    sender = None
    try:
        ready(receiver)
        sender = pair.python(pair.a, PACED, ADDR_B, ",".join(map(str, PORTS)), str(flows), str(gap),
                             str(seconds), MARKER)
        ready(sender)
        time.sleep(1.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        st = a.wait_for(lambda s: s["workers"][0]["state"] == "ready" and s["workers"][0]["restarts"] == 1,
                        what="worker back")
        noticed = time.monotonic() - killed_at
        sent = result(sender, timeout=60)
        time.sleep(0.5)
        got = result(receiver, stdin="")
    finally:
        end(sender, receiver)
        drops = sniffer.stop()
    assert drops == 0
    assert st["workers"][1]["pid"] == survivor and st["workers"][1]["restarts"] == 0
    outage = st["workers"][0]["last_outage"]
    assert isinstance(outage, float) and 0 < outage < 30

    arrivals: dict[str, list[tuple[float, int]]] = {}
    for t, text in got:
        _, port, flow, n = text.split(":")
        arrivals.setdefault(f"{port}:{flow}", []).append((t, int(n)))
    assert set(arrivals) == set(sent)
    lost = {}
    for key, count in sent.items():
        ns = [n for _, n in arrivals[key]]
        assert len(ns) == len(set(ns)), f"duplicates in {key}"
        lost[key] = count - len(ns)
        if key.startswith(f"{PORTS[1]}:"):
            assert ns == list(range(count)), f"flow {key} on the surviving queue lost or reordered"
        else:
            # the dead queue's flows lose one contiguous stretch, then everything arrives again
            missing = sorted(set(range(count)) - set(ns))
            assert missing, f"flow {key}: nothing lost although its worker was killed"
            assert missing == list(range(missing[0], missing[-1] + 1)) and missing[-1] < count - 1
    # the longest silence of a dead-queue flow, as its receiver saw it
    silence = max(
        max(t2 - t1 for (t1, _), (t2, _) in itertools.pairwise(v))
        for k, v in arrivals.items() if k.startswith(f"{PORTS[0]}:")
    )
    packets = sniffer.packets()
    assert MARKER.encode() not in (tmp_path / "wire.pcap").read_bytes()
    assert not [p for p in packets if p[9] == 17]  # no UDP in clear, from either side
    assert len(esp_ids(packets)) == len(got)
    figures = {
        "worker restart (death -> replacement ready), s": outage,
        "kill -> status shows it ready, s": round(noticed, 2),
        "longest silence of a flow on the killed queue, s": round(silence, 3),
        "packets lost per flow on the killed queue":
            [v for k, v in lost.items() if k.startswith(f"{PORTS[0]}:")],
        "packets lost on the other queue": sum(v for k, v in lost.items() if k.startswith(f"{PORTS[1]}:")),
        "packets sent": sum(sent.values()),
        "cleartext packets on the wire": 0,
    }
    print(f"\nkilled worker figures: {json.dumps(figures)}")
    assert a.stop() == 0 and b.stop() == 0


def _running_with_watchdog(pair: Pair, tmp_path: Path, daemons: list[Daemon], seconds: int,
                           **a_env: str) -> tuple[Daemon, dict[str, Any]]:
    """Both daemons running, A's with ``daemon.watchdog = seconds`` (and ``a_env``); A and
    its status."""
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons, **a_env)
    text = a.config.read_text()
    assert 'log_level = "info"\n' in text
    a.config.write_text(text.replace('log_level = "info"\n', f'log_level = "info"\nwatchdog = {seconds}\n'))
    b = daemon(pair, tmp_path, False, keys, daemons)
    a.start()
    b.start()
    st = a.wait_running()
    b.wait_running()
    return a, st


def test_hung_worker_is_killed_and_restarted_by_the_watchdog(pair: Pair, tmp_path: Path,
                                                             daemons: list[Daemon]) -> None:
    """A's worker for queue 0 hangs on its first packet (alive, answering nothing: test fault
    injection ``hang-once``). Its packets are not sent while it hangs, the watchdog
    (``daemon.watchdog = 2``) kills it, the supervisor starts a new one, queue 1's worker is
    left alone, and queue 0 carries traffic again."""
    marker = tmp_path / "hung-once"
    a, st = _running_with_watchdog(pair, tmp_path, daemons, 2, NFQ_IPSEC_TEST_FAULT=f"hang-once:{marker}")
    hung, other = a.worker_pid(st, 0), a.worker_pid(st, 1)
    started = time.monotonic()
    assert send(pair, [(PORTS[0], f"{MARKER}-hung-{n}") for n in range(5)]) == []
    assert marker.read_text() == "hung"  # queue 0's worker took the first packet and hung on it
    st = a.wait_for(lambda s: s["workers"][0]["state"] == "ready" and s["workers"][0]["restarts"] == 1,
                    timeout=40, what="the watchdog's restart")
    replaced = time.monotonic() - started
    wait_gone([hung])
    assert st["workers"][0]["pid"] != hung
    assert st["workers"][1]["pid"] == other and st["workers"][1]["restarts"] == 0
    messages = [(PORTS[0], f"{MARKER}-after-{n}") for n in range(10)]
    assert send(pair, messages) == [m for _, m in messages]
    assert "(daemon.watchdog = 2 s): killing it" in a.log_text()
    print(f"\nhung worker replaced {replaced:.1f} s after its first packet (watchdog 2 s)")


def test_counts_go_on_across_a_worker_restart(pair: Pair, tmp_path: Path,
                                              daemons: list[Daemon]) -> None:
    """Status counts from the daemon's start: a SIGKILLed worker's packets and SA counts stay in
    the totals after its successor takes over. Nothing asks for status between the traffic and
    the kill, so the counts can only come from the worker's answers to the watchdog's pings."""
    a, st = _running_with_watchdog(pair, tmp_path, daemons, 1)
    victim = a.worker_pid(st, 0)
    first = [(PORTS[0], f"{MARKER}-first-{n}") for n in range(20)]
    assert send(pair, first) == [m for _, m in first]
    time.sleep(1.0)  # pings go out every 0.25 s: at least one answer after the last packet
    os.kill(victim, signal.SIGKILL)
    st = a.wait_for(lambda s: s["workers"][0]["state"] == "ready" and s["workers"][0]["restarts"] == 1,
                    what="worker back")
    ab0 = a.sa(st, "ab0")
    assert (ab0["packets"], st["workers"][0]["packets_out"]) == (20, 20), st
    first_bytes = ab0["bytes"]
    assert first_bytes > 0
    second = [(PORTS[0], f"{MARKER}-second-{n}") for n in range(10)]
    assert send(pair, second) == [m for _, m in second]
    st = a.status()
    assert st is not None
    ab0 = a.sa(st, "ab0")
    assert (ab0["packets"], st["workers"][0]["packets_in"], st["workers"][0]["packets_out"]) == (30, 30, 30)
    # sequence numbers go on from the state file's reservation, past anything sent before
    assert ab0["bytes"] > first_bytes and ab0["seq"] > 20
    assert st["workers"][1]["packets_in"] == 0


def test_killed_supervisor_fails_closed_and_is_taken_over(pair: Pair, tmp_path: Path,
                                                          daemons: list[Daemon]) -> None:
    before = pair.iptables_save(pair.a)
    a = daemon(pair, tmp_path, True, make_keys(), daemons)
    a.start()
    st = a.wait_running()
    installed = pair.iptables_save(pair.a)
    workers = [w["pid"] for w in st["workers"]]
    assert a.proc is not None
    a.proc.kill()  # SIGKILL the supervisor only
    a.proc.wait(30)
    wait_gone(workers)  # each worker saw its pipe close and stopped by itself
    assert pair.iptables_save(pair.a) == installed  # the rules stay: fail closed

    sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / "wire.pcap")
    try:
        got = send(pair, [(PORTS[i % 2], f"{MARKER}-dead-{i}") for i in range(20)])
    finally:
        assert sniffer.stop() == 0
    assert got == []
    assert MARKER.encode() not in (tmp_path / "wire.pcap").read_bytes()
    assert not [p for p in sniffer.packets() if p[9] in (17, 50)]  # nothing left A at all

    # A new daemon takes over the leftover rules: the same rules, each once.
    a.start()
    st = a.wait_running()
    assert pair.iptables_save(pair.a) == installed
    assert "rules left by an earlier run found; replacing them" in a.log_text()
    workers = [w["pid"] for w in st["workers"]]
    a.proc.kill()
    a.proc.wait(30)
    wait_gone(workers)
    res = pair.run(pair.a, *nfq_ipsec(), "rules", "remove", "--config", str(a.config))
    assert "rules removed" in res.stdout
    assert pair.iptables_save(pair.a) == before
    assert not any(alive(p) for p in workers)


def test_queue_used_by_a_foreign_rule_refuses_to_start(pair: Pair, tmp_path: Path,
                                                       daemons: list[Daemon]) -> None:
    pair.run(pair.a, "iptables", "-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "--dport", "5",
             "-j", "NFQUEUE", "--queue-balance", f"{QUEUES[1]}:{QUEUES[1] + 3}")
    before = pair.iptables_save(pair.a)
    a = daemon(pair, tmp_path, True, make_keys(), daemons)
    a.start()
    assert a.proc is not None
    assert a.proc.wait(60) == 2
    log = a.log_text()
    assert f"queue {QUEUES[1]} is already used by a rule that is not ours: *mangle -A POSTROUTING" in log
    assert "nothing started, nothing installed" in log
    assert pair.iptables_save(pair.a) == before
    assert not (a.config.parent / "run").exists() and not (a.config.parent / "state").exists()
    res = pair.run(pair.a, *nfq_ipsec(), "rules", "install", "--config", str(a.config), check=False)
    assert res.returncode == 2 and "already used by a rule that is not ours" in res.stderr
    assert pair.iptables_save(pair.a) == before


def test_corrupt_state_refuses_to_start_until_reset(pair: Pair, tmp_path: Path,
                                                    daemons: list[Daemon]) -> None:
    from nfq_ipsec import state
    from nfq_ipsec.config import load_config

    before = pair.iptables_save(pair.a)
    a = daemon(pair, tmp_path, True, make_keys(), daemons)
    cfg = load_config(a.config)
    path = state.state_path(state.prepare_dir(cfg.daemon.state_dir), cfg.sa("ab1"))
    path.parent.mkdir(mode=0o700)  # the queue's directory: the daemon gives it to its workers' user
    path.write_text('{"next_seq": 12')
    a.start()
    assert a.proc is not None
    assert a.proc.wait(60) == 5
    log = a.log_text()
    assert f"sa ab1 (spi 0x{SPI_AB + 1:08x}, out): state file {path} is corrupt" in log
    assert "nfq-ipsec state reset" in log
    assert pair.iptables_save(pair.a) == before
    res = pair.run(pair.a, *nfq_ipsec(), "state", "reset", "--config", str(a.config), "--sa", "ab1",
                   "--seq", "100000")
    assert "state reset" in res.stdout
    a.start()
    st = a.wait_running()
    assert a.sa(st, "ab1")["seq"] == 99999  # resumes at the number the user chose
    assert a.stop() == 0
