"""Hostile input through the real daemon (root; namespaces ``nfqx<pid>...``).

Host B runs ``nfq-ipsec run`` (two queues); host A runs nothing: the test crafts packets with
the SA keys (through the core's suites, so the ESP is genuine where it needs to be) and puts
them on the wire from A's interface with an AF_PACKET socket. Every kind of bad packet is
dropped under its own reason, counted in ``nfq-ipsec status --json``; the workers keep running
(same pids, no restarts) and a good packet still gets through afterwards.

Also here: the exception storm (``NFQ_IPSEC_TEST_FAULT=raise-every-packet``: drops counted,
log rate-limited, no spinning, a status warning) and queue overflow (a deliberately slowed
worker: kernel drops counted and shown, recovery without a restart when the load falls), and
hostile clients of the control socket (deep nesting, a byte a second, silence) while a worker
is killed: the supervisor stays up, answers status and replaces the worker in the usual time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labutil import (
    ADDR_A,
    ADDR_B,
    FLOOD,
    PORTS,
    QUEUES,
    RECEIVER,
    SPI_AB,
    Daemon,
    Pair,
    cpu_seconds,
    daemon,
    end,
    inject,
    make_keys,
    make_pair,
    nfq_ipsec,
    ready,
    result,
    send,
)
from packets import fragments, ipv4, udp

from nfq_ipsec import control
from nfq_ipsec.core.esp import pad_length
from nfq_ipsec.core.suites import Suite, make_suite
from nfq_ipsec.nfqueue import kernel_queue_stats

SPOOFED = "10.81.0.99"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("h") as p:
        yield p


class Crafter:
    """ESP on SA ab<i> (A -> B, transport mode, AES-GCM-128) built from its key."""

    def __init__(self, keys: dict[str, str], index: int = 0) -> None:
        self.spi = SPI_AB + index
        self.port = PORTS[index]
        self.suite: Suite = make_suite("aes-gcm-128", bytes.fromhex(keys[f"ab{index}"]), None, b"")

    def esp(self, seq: int, payload: bytes, next_header: int = 17, src: str = ADDR_A,
            pad: bytes | None = None, spi: int | None = None) -> bytes:
        padlen = pad_length(len(payload), self.suite.align)
        padding = bytes(range(1, padlen + 1)) if pad is None else pad
        plaintext = payload + padding + bytes((len(padding), next_header))
        header = struct.pack("!II", self.spi if spi is None else spi, seq)
        return ipv4(src, ADDR_B, 50, header + self.suite.seal(header, b"", seq, plaintext))

    def udp(self, text: str, dport: int | None = None, src: str = ADDR_A) -> bytes:
        """The transport-mode payload: a UDP header (checksum 0) and the text."""
        data = text.encode()
        return struct.pack("!HHHH", 40000, dport or self.port, 8 + len(data), 0) + data


def _drops(st: dict[str, Any]) -> Counter[str]:
    """Every drop the status reports: the workers' by reason, and our DROP rules' (never queued),
    but IPv6: the namespace's own link traffic (router solicitations, MLD reports) is dropped
    and counted there whenever the kernel sends some, whatever the test injects."""
    total: Counter[str] = Counter()
    for w in st["workers"]:
        total.update(w["drops"] or {})
    total.update(st["kernel_drops"] or {})
    total.pop("ipv6", None)
    return total


def test_hostile_packets_are_dropped_by_reason(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    keys = make_keys()
    b = daemon(pair, tmp_path, False, keys, daemons)
    b.start()
    st0 = b.wait_running()
    pids = [w["pid"] for w in st0["workers"]]
    c = Crafter(keys)
    seq = iter(range(1000, 100000))

    valid = c.esp(next(seq), c.udp("valid-first"))
    tamper_base = [c.esp(next(seq), c.udp(f"tamper-{i}" + "x" * 40)) for i in range(8)]
    ihl = 20
    positions = [ihl + 4, ihl + 8, ihl + 12, ihl + 16, ihl + 30, -17, -8, -1]  # seq, IV, data, ICV
    tampered = []
    for pkt, pos in zip(tamper_base, positions, strict=True):
        b2 = bytearray(pkt)
        b2[pos] ^= 0x80 if pos == ihl + 4 else 0x01
        tampered.append(bytes(b2))
    good = c.esp(next(seq), c.udp("to-truncate" + "y" * 64))
    # shorter than an ESP header: the kernel's esp match (--espspi) drops it itself
    stub = ipv4(ADDR_A, ADDR_B, 50, good[ihl:ihl + 4])
    truncated = [ipv4(ADDR_A, ADDR_B, 50, good[ihl:ihl + n]) for n in (8, 8 + 20)]  # < IV + ICV
    cut_icv = ipv4(ADDR_A, ADDR_B, 50, good[ihl:-6])  # ICV cut: can't authenticate
    # 65 KB: the wire needs fragments; reassembly (which our inbound chain turns on) makes it
    # whole again before the raw table, and it is a valid packet: it arrives
    big = c.esp(next(seq), c.udp("oversized" + "z" * 65400))
    oversized = fragments(ipv4(ADDR_A, ADDR_B, 50, big[ihl:]), 8000)
    unknown = c.esp(next(seq), c.udp("unknown-spi"), spi=0xDEAD)
    bad_pad = c.esp(next(seq), c.udp("bad-padding" + "p"), pad=b"\x00\x00\x00\x00\x00")
    wrong_nh = c.esp(next(seq), c.udp("wrong-next-header"), next_header=4)
    dummy = c.esp(next(seq), c.udp("dummy"), next_header=59)
    spoofed = c.esp(next(seq), c.udp("spoofed-source"), src=SPOOFED)
    wrong_port = c.esp(next(seq), c.udp("wrong-port", dport=9999))
    clear = udp(ADDR_A, ADDR_B, 40000, PORTS[0], b"cleartext-where-esp-is-required")
    clear_spoofed = udp(SPOOFED, ADDR_B, 40000, PORTS[0], b"cleartext-from-nobody")

    cases: list[tuple[str, list[bytes], dict[str, int]]] = [
        ("valid", [valid], {}),
        ("replayed", [valid, valid], {"replay": 2}),
        ("tampered", tampered, {"integrity": len(tampered)}),
        ("shorter than an ESP header", [stub], {}),
        ("truncated", truncated, {"malformed": len(truncated)}),
        ("icv cut", [cut_icv], {"integrity": 1}),
        ("oversized", oversized, {}),
        ("unknown spi", [unknown], {"unknown_spi": 1}),
        ("bad padding", [bad_pad], {"bad_padding": 1}),
        ("wrong next header", [wrong_nh], {"bad_next_header": 1}),
        ("dummy (next header 59)", [dummy], {"dummy": 1}),
        ("spoofed inner source", [spoofed], {"policy_mismatch": 1}),
        ("inner packet outside the policy", [wrong_port], {"policy_mismatch": 1}),
        ("cleartext where ESP is required", [clear], {"cleartext_protected": 1}),
        ("cleartext from outside every policy", [clear_spoofed], {"no_policy": 1}),
    ]
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, (*PORTS, 9999))), "0", stdin=True)
    report = {}
    try:
        ready(receiver)
        before = _drops(st0)
        for name, packets, expected in cases:
            inject(pair, packets)
            want = before + Counter(expected)
            deadline = time.monotonic() + 20
            while True:
                st = b.status()
                assert st is not None
                now = _drops(st)
                if now == want or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert dict(now - before) == expected, (name, dict(now - before))
            assert [w["pid"] for w in st["workers"]] == pids, name  # the workers survived
            report[name] = dict(now - before)
            before = now
        final = c.esp(next(seq), c.udp("valid-last"))
        inject(pair, [final])
        time.sleep(0.5)
        got = [text for _, text in result(receiver, stdin="")]
    finally:
        end(receiver)
    assert got == ["valid-first", "oversized" + "z" * 65400, "valid-last"]
    st = b.status()
    assert st is not None
    assert all(w["restarts"] == 0 for w in st["workers"])
    ab0 = b.sa(st, "ab0")
    assert ab0["replay_drops"] == 2 and ab0["integrity_drops"] == len(tampered) + 1
    print(f"\nhostile input, drops by case: {json.dumps(report)}")
    assert b.stop() == 0


def test_exception_storm_is_counted_quiet_and_idle(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    a = daemon(pair, tmp_path, True, make_keys(), daemons, NFQ_IPSEC_TEST_FAULT="raise-every-packet")
    a.start()
    st = a.wait_running()
    pids = [w["pid"] for w in st["workers"]]
    count = 1500
    for port in PORTS:
        proc = pair.python(pair.a, FLOOD, ADDR_B, str(port), str(count), "storm")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and int(out) == count, err
    st = a.wait_for(lambda s: all(w["packets_in"] + (w["kernel_queue_dropped"] or 0)
                                  + (w["user_dropped"] or 0) == count for w in s["workers"]),
                    what="every packet handled or counted by the kernel")
    for w in st["workers"]:
        assert w["drops"]["internal"] == w["packets_in"] and w["packets_out"] == 0
        assert any(f"queue {w['queue']}: {w['drops']['internal']} packet(s) dropped after an internal "
                   "error" in line for line in st["warnings"])
    assert [w["pid"] for w in st["workers"]] == pids and all(w["restarts"] == 0 for w in st["workers"])
    text = pair.run(pair.a, *nfq_ipsec(), "status", "--config", str(a.config)).stdout
    assert f"WARNING: queue {QUEUES[0]}:" in text and f"WARNING: queue {QUEUES[1]}:" in text
    # idle after the storm: no spinning
    cpu0 = [cpu_seconds(p) for p in pids]
    time.sleep(3.0)
    idle = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    assert all(x < 0.3 for x in idle), idle
    log = a.log_text()
    for q in QUEUES:  # one traceback per worker per 10 s, not one per packet
        assert sum(f"nfq-ipsec[q{q}] ERROR: internal error handling a packet" in line
                   for line in log.splitlines()) <= 2
    print(f"\nexception storm: {2 * count} packets, CPU while idle 3 s: {idle}")
    assert a.stop() == 0


def test_queue_overflow_is_counted_and_recovers(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons, NFQ_IPSEC_TEST_FAULT="slow:0.0005")
    b = daemon(pair, tmp_path, False, keys, daemons)
    a.start()
    b.start()
    st = a.wait_running()
    b.wait_running()
    pid = st["workers"][0]["pid"]
    # B would answer the flood (nothing listens) with port unreachables, which come back to the
    # flooded worker through ESP and blur the count: B keeps quiet
    pair.run(pair.b, "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "icmp", "-j", "DROP")
    count = 8000
    proc = pair.python(pair.a, FLOOD, ADDR_B, str(PORTS[0]), str(count), "flood")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    sent = int(out)

    def drained(s: dict[str, Any]) -> bool:
        w = s["workers"][0]  # counters are null while the busy worker can't answer in time
        return w["packets_in"] is not None and (
            w["packets_in"] + w["kernel_queue_dropped"] + w["user_dropped"] == sent)

    st = a.wait_for(drained, timeout=120, what="the flood handled or dropped")
    w = st["workers"][0]
    lost = w["kernel_queue_dropped"] + w["user_dropped"]
    assert lost > 0, w
    assert w["drops"]["queue_overflow"] == lost
    assert any("the kernel dropped" in line and f"queue {QUEUES[0]}" in line for line in st["warnings"])
    # the load falls: everything gets through again, same worker, no restart
    got = send(pair, [(PORTS[0], f"after-{i}") for i in range(40)], gap=0.01)
    assert got == [f"after-{i}" for i in range(40)]
    after = a.status()
    assert after is not None
    w2 = after["workers"][0]
    assert w2["pid"] == pid and w2["restarts"] == 0
    assert w2["kernel_queue_dropped"] + w2["user_dropped"] == lost
    print(f"\nqueue overflow: {sent} offered, {lost} dropped by the kernel "
          f"(queue {w2['kernel_queue_dropped']}, socket {w2['user_dropped']}), then 40/40 delivered")
    assert a.stop() == 0 and b.stop() == 0




class HostileClients:
    """Control socket clients that misbehave over and over, each in a thread, until ``stop``:
    deep nesting (60,000 levels: json's RecursionError; 100,000: longer than a request may
    be), one byte a second, and connect-and-say-nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = threading.Event()
        self.answers: list[bytes] = []  # to the deep ones
        self.connections = 0
        self.threads = [threading.Thread(target=t, daemon=True)
                        for t in (self._deep, self._deep, self._trickle, self._trickle,
                                  self._silent, self._silent)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(15)

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(self.path)
        self.connections += 1
        return s

    def _deep(self) -> None:
        depth = 60_000
        while not self.done.is_set():
            try:
                with self._connect() as s:
                    s.sendall(b"[" * depth + b"\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                    self.answers.append(data)
            except OSError:
                time.sleep(0.1)  # the daemon is gone: the test will say so
            depth = 160_000 - depth  # 60,000 and 100,000 in turn

    def _trickle(self) -> None:
        while not self.done.is_set():
            try:
                with self._connect() as s:
                    for byte in b'{"command": "status"}\n':
                        s.send(bytes([byte]))
                        if self.done.wait(1.0):
                            break
            except OSError:
                pass  # dropped at its deadline: start over

    def _silent(self) -> None:
        while not self.done.is_set():
            try:
                with self._connect() as s:
                    s.recv(1)  # until the daemon drops us
            except OSError:
                time.sleep(0.1)


def test_hostile_control_clients_while_a_worker_is_killed(pair: Pair, tmp_path: Path,
                                                          daemons: list[Daemon]) -> None:
    b = daemon(pair, tmp_path, False, make_keys(), daemons)
    b.start()
    st = b.wait_running()
    supervisor = st["daemon"]["pid"]
    victim, survivor = (w["pid"] for w in st["workers"])
    queues = f"/proc/{supervisor}/net/netfilter/nfnetlink_queue"  # the daemon's namespace
    bound_before = kernel_queue_stats(queues)[QUEUES[0]].portid
    hostile = HostileClients(str(b.config.parent / "run" / "ctl.sock"))
    hostile.start()
    rebound = None
    try:
        time.sleep(2.5)  # every kind connected, the trickling ones half-way through a request
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # the replacement binds the queue: seen in the kernel's table, not through the daemon
        while time.monotonic() - killed < 10:
            q = kernel_queue_stats(queues).get(QUEUES[0])
            if q is not None and q.portid != bound_before:
                rebound = time.monotonic() - killed
                break
            time.sleep(0.005)
        # status answers while they go on
        st = b.wait_for(lambda s: s["workers"][0]["restarts"] == 1 and s["workers"][0]["state"] == "ready",
                        timeout=20, what="the killed worker replaced")
        time.sleep(1.0)
        again = b.status()
    finally:
        hostile.stop()
    assert rebound is not None, "the killed worker's queue was not bound again within 10 s"
    # the usual restart: 0.1 s backoff and a worker's start, never a client's deadline
    assert rebound < 1.5, rebound
    outage = st["workers"][0]["last_outage"]
    assert isinstance(outage, float) and control.CLIENT_TIMEOUT > outage >= 0.1, outage
    assert abs(outage - rebound) < 0.25, (outage, rebound)  # measured from the death itself
    assert st["workers"][1]["pid"] == survivor and st["workers"][1]["restarts"] == 0
    assert again is not None and again["daemon"]["pid"] == supervisor
    assert again["daemon"]["state"] == "running"
    assert again["daemon"]["control_errors"] >= 4
    assert again["daemon"]["control_clients"] <= len(hostile.threads) + 1
    assert hostile.answers and all(json.loads(a)["error"].startswith("bad request") for a in hostile.answers)
    assert {json.loads(a)["error"] for a in hostile.answers} == {
        "bad request: nested too deeply",
        f"bad request: request longer than {control.MAX_REQUEST} bytes"}
    log = b.log_text()
    assert "supervisor failed" not in log and "bad request" not in log and "Traceback" not in log
    print(f"\nhostile control clients: {hostile.connections} connections; worker killed -> queue "
          f"bound again {rebound:.3f} s, last_outage {outage:.3f} s; control_errors "
          f"{again['daemon']['control_errors']}")
    assert b.stop() == 0
