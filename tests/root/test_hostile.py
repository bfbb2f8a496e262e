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

And IPv6, against one IPv6 daemon for the module: ESP behind chains of extension headers (valid
ones decrypt up to the core's bound, the rest drop with a reason; the deepest chain that fits
the link shows what the kernel queues), and ESP in fragments (reassembled by the kernel before
our rules; overlapping, tiny and incomplete fragments never give a packet that was not sent).
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
    ADDR6_A,
    ADDR6_B,
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
    daemon_of,
    end,
    env,
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
from nfq_ipsec.core.ipv6 import MAX_EXT_HEADERS
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


# -- IPv6: extension-header chains and fragments --------------------------------------------------
# One IPv6 daemon for these tests (host B, transport mode between ADDR6_A and ADDR6_B); the ESP
# is scapy's (its SecurityAssociation with the SA's key), the chains in front of it are built by
# hand where scapy would refuse to build them.
NH_HOP, NH_ROUTING, NH_FRAGMENT, NH_DEST, NH_ESP = 0, 43, 44, 60, 50


def ext_headers(kinds: list[int], last: int, ident: int = 1) -> bytes:
    """Extension headers of the given kinds in order, the last naming ``last``: options headers
    8 bytes (a 4-byte PadN), routing type 0 with no segments left, fragment headers atomic
    (offset 0, no more fragments)."""
    out = b""
    for i, kind in enumerate(kinds):
        nh = kinds[i + 1] if i + 1 < len(kinds) else last
        if kind == NH_FRAGMENT:
            out += struct.pack("!BBHI", nh, 0, 0, ident)
        elif kind == NH_ROUTING:
            out += bytes((nh, 0, 0, 0, 0, 0, 0, 0))
        else:
            out += bytes((nh, 0, 1, 4, 0, 0, 0, 0))
    return out


def ipv6(first: int, body: bytes, src: str = ADDR6_A, dst: str = ADDR6_B,
         plen: int | None = None) -> bytes:
    """An IPv6 packet: fixed header (next header ``first``) and ``body``."""
    return (struct.pack("!IHBB", 0x60000000, len(body) if plen is None else plen, first, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + body)


class Crafter6:
    """IPv6 ESP on SA ab0 (A -> B, transport mode, AES-GCM-128), sealed by scapy."""

    def __init__(self, keys: dict[str, str]) -> None:
        from scapy.layers.ipsec import ESP
        from scapy.layers.ipsec import SecurityAssociation as ScapySA

        self.sa = ScapySA(ESP, spi=SPI_AB, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(keys["ab0"]))
        self.seq = 1000

    def packet(self, text: str, front: Any = None) -> bytes:
        """A whole ESP packet: scapy puts ESP after the headers of ``front`` (scapy layers)."""
        from scapy.layers.inet import UDP
        from scapy.layers.inet6 import IPv6

        self.seq += 1
        pkt = IPv6(src=ADDR6_A, dst=ADDR6_B)
        if front is not None:
            pkt = pkt / front
        pkt = IPv6(bytes(pkt / UDP(sport=40000, dport=PORTS[0]) / text.encode()))
        return bytes(self.sa.encrypt(pkt, seq_num=self.seq))

    def esp(self, text: str) -> bytes:
        """The ESP header, body and ICV alone, to put behind a chain of our own."""
        return self.packet(text)[40:]

    def behind(self, kinds: list[int], text: str = "", esp: bytes | None = None) -> bytes:
        return ipv6(kinds[0] if kinds else NH_ESP,
                    ext_headers(kinds, NH_ESP) + (self.esp(text) if esp is None else esp))


def fragments6(packet: bytes, size: int, ident: int, first_nh_at: int = 6) -> list[bytes]:
    """An IPv6 packet with no extension headers cut into fragments of ``size`` bytes of payload
    (a multiple of 8) by scapy's fragment6."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6

    pkt = IPv6(packet)
    framed = IPv6(src=pkt.src, dst=pkt.dst) / IPv6ExtHdrFragment(id=ident, nh=pkt.nh) / pkt.payload
    return [bytes(f) for f in fragment6(framed, size + 48)]


def frag(body: bytes, offset: int, more: bool, ident: int, nh: int = NH_ESP) -> bytes:
    """One fragment by hand: ``body`` at byte ``offset`` of the fragmentable part."""
    return ipv6(NH_FRAGMENT, struct.pack("!BBHI", nh, 0, offset | int(more), ident) + body)


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, Daemon, Crafter6]]:
    """Host B's IPv6 daemon, running for every test of this part, and A's crafter (one, so
    the sequence numbers go on rising from test to test)."""
    keys = make_keys()
    started: list[Daemon] = []
    with make_pair("s") as p:
        for ns, ifname, addr, peer, mac in ((p.a, p.va, ADDR6_A, ADDR6_B, p.mac_b),
                                            (p.b, p.vb, ADDR6_B, ADDR6_A, p.mac_a)):
            p.run(ns, "ip", "-6", "addr", "add", f"{addr}/64", "dev", ifname, "nodad")
            p.run(ns, "ip", "-6", "neigh", "replace", peer, "lladdr", mac, "dev", ifname,
                  "nud", "permanent")
        try:
            b = daemon_of(p, tmp_path_factory.mktemp("six"), False, keys, started, True, env())
            b.start()
            b.wait_running()
            yield p, b, Crafter6(keys)
        finally:
            for d in started:
                d.cleanup()


def _queued(st: dict[str, Any]) -> int:
    return sum(w["packets_in"] or 0 for w in st["workers"])


def run_cases(pair: Pair, b: Daemon, cases: list[tuple[str, list[bytes], dict[str, int], bool]],
              texts: list[str]) -> dict[str, dict[str, int]]:
    """Inject each case from A and wait for its drops: exactly ``expected``, the workers the
    same processes. ``queued`` False: the kernel drops it before any worker sees it (nothing
    queued, nothing counted). What B's receiver got must be ``texts``, in order; the daemon's
    log grows by a few lines at most."""
    st0 = b.status()
    pids = [w["pid"] for w in st0["workers"]]
    log_before = len(b.log_text().splitlines())
    receiver = pair.python(pair.b, RECEIVER, ADDR6_B, ",".join(map(str, PORTS)), "0", stdin=True)
    report = {}
    try:
        ready(receiver)
        before, queued_before = _drops(st0), _queued(st0)
        for name, packets, expected, queued in cases:
            inject(pair, packets)
            want = before + Counter(expected)
            deadline = time.monotonic() + 20
            while True:
                if not queued:  # nothing to wait for: give the kernel the time it would take
                    time.sleep(0.5)
                st = b.status()
                now = _drops(st)
                done = now == want if expected else _queued(st) > queued_before
                if not queued or done or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert dict(now - before) == expected, (name, dict(now - before))
            if not queued:
                assert _queued(st) == queued_before, (name, "reached a worker")
            assert [w["pid"] for w in st["workers"]] == pids, name
            report[name] = dict(now - before)
            before, queued_before = now, _queued(st)
        time.sleep(0.5)
        got = [text for _, text in result(receiver, stdin="")]
    finally:
        end(receiver)
    assert got == texts
    st = b.status()
    assert all(w["restarts"] == 0 for w in st["workers"])
    log = b.log_text().splitlines()[log_before:]
    assert len(log) <= 5, log  # drops are counted, not logged one by one
    return report


def test_ipv6_extension_header_chains(six: tuple[Pair, Daemon, Crafter6]) -> None:
    """ESP behind chains of extension headers: valid chains are walked (up to the bound,
    ``MAX_EXT_HEADERS``), the rest dropped with a reason; nothing else arrives."""
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    pair, b, c = six
    plain = c.packet("plain")
    tampered = bytearray(c.behind([NH_DEST], "tampered"))
    tampered[-3] ^= 1
    cut = c.behind([NH_DEST, NH_DEST], esp=c.esp("cut")[:-20])  # shorter than IV and ICV
    lying = c.behind([NH_DEST], "lying")
    bound = MAX_EXT_HEADERS
    deepest = (9000 - 40 - 100) // 8  # destination options that fit the link's MTU with ESP
    wrong_len = bytearray(c.behind([NH_DEST], "wrong-length"))
    wrong_len[41] = 1  # 16 bytes: the chain lands 8 bytes into ESP
    cases: list[tuple[str, list[bytes], dict[str, int], bool]] = [
        ("valid", [plain], {}, True),
        ("behind hop-by-hop and destination options (scapy's)",
         [c.packet("hbh-dest", IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt())], {}, True),
        ("behind hop-by-hop, routing and destination options",
         [c.behind([NH_HOP, NH_ROUTING, NH_DEST], "hbh-rt-dest")], {}, True),
        (f"behind {bound} destination options (the bound)",
         [c.behind([NH_DEST] * bound, f"dest-{bound}")], {}, True),
        (f"behind {bound + 1} destination options", [c.behind([NH_DEST] * (bound + 1), "deep")],
         {"ext_chain_too_long": 1}, True),
        (f"behind {deepest} destination options (the link's MTU)",
         [c.behind([NH_DEST] * deepest, "deepest")], {"ext_chain_too_long": 1}, True),
        ("hop-by-hop not first", [c.behind([NH_DEST, NH_HOP], "hbh-second")],
         {"bad_ext_header": 1}, True),
        ("replayed behind another chain", [c.behind([NH_DEST], esp=plain[40:])], {"replay": 1},
         True),
        ("tampered behind a chain", [bytes(tampered)], {"integrity": 1}, True),
        ("ESP cut short behind a chain", [cut], {"malformed": 1}, True),
        ("payload length beyond the packet", [lying[:-10]], {}, False),
        ("a header length landing inside ESP", [bytes(wrong_len)], {"unknown_spi": 1}, False),
        ("unknown next header in the chain",
         [ipv6(NH_DEST, ext_headers([NH_DEST], 253) + c.esp("unknown-nh"))], {"no_policy": 1},
         False),
        ("a header running past the packet",
         [ipv6(NH_DEST, bytes((NH_ESP, 200)) + c.esp("past-the-end")[:40])], {}, False),
    ]
    cases += [
        ("behind an atomic fragment header", [c.behind([NH_FRAGMENT], "atomic")], {}, True),
        ("two fragment headers", [c.behind([NH_FRAGMENT, NH_FRAGMENT], "two-frag")],
         {"fragment": 1}, True),
    ]
    texts = ["plain", "hbh-dest", "hbh-rt-dest", f"dest-{bound}", "atomic", "last"]
    cases.append(("valid after all that", [c.packet("last")], {}, True))
    report = run_cases(pair, b, cases, texts)
    print(f"\nIPv6 chains, drops by case: {json.dumps(report)}")


def test_ipv6_fragmented_esp(six: tuple[Pair, Daemon, Crafter6]) -> None:
    """IPv6 ESP in fragments from the peer: the kernel reassembles it before our rules (their
    first rule turns that on) and the worker decrypts it whole; overlapping, tiny and
    incomplete fragments never yield a packet that was not sent."""
    pair, b, c = six
    big = c.packet("fragmented-" + "f" * 20000)
    small = c.packet("tiny-" + "t" * 200)
    tampered = bytearray(c.packet("tampered-" + "x" * 3000))
    tampered[2000] ^= 1
    forged = c.packet("overlap-" + "o" * 3000)  # its middle sent twice, the copy different
    body = forged[40:]
    copy = bytearray(body[1224:2448])
    copy[100] ^= 0xFF
    overlap = [frag(body[:1232], 0, True, 0x7003), frag(bytes(copy), 1224, True, 0x7003),
               frag(body[1232:2464], 1232, True, 0x7003), frag(body[2464:], 2464, False, 0x7003)]
    unfinished = c.packet("incomplete-" + "i" * 3000)
    first_short = c.behind([NH_DEST] * 4, "first-fragment-short")
    chain = first_short[40:]
    # the deepest chain a datagram holds: ESP behind destination options up to 65,535 bytes
    deepest = (65535 - 200) // 8
    body = c.behind([NH_DEST] * deepest, "deepest")[40:]
    deep = [frag(body[at:at + 1232], at, at + 1232 < len(body), 0x7007, NH_DEST)
            for at in range(0, len(body), 1232)]
    pieces = fragments6(big, 1232, 0x7001)
    cases: list[tuple[str, list[bytes], dict[str, int], bool]] = [
        (f"20 KB in {len(pieces)} fragments", pieces, {}, True),
        ("8-byte fragments", fragments6(small, 8, 0x7002), {}, True),
        ("tampered, in fragments", fragments6(bytes(tampered), 1232, 0x7004), {"integrity": 1},
         True),
        ("overlapping fragments (RFC 5722: the datagram is discarded)", overlap, {}, False),
        ("incomplete: no last fragment", fragments6(unfinished, 1232, 0x7005)[:-1], {}, False),
        # RFC 7112 would have it dropped; Linux's reassembly only refuses a first fragment whose
        # chain ends in it without the upper-layer header, so this authentic packet arrives
        ("the first fragment stops inside the header chain",
         [frag(chain[:16], 0, True, 0x7006, NH_DEST), frag(chain[16:], 16, False, 0x7006, NH_DEST)],
         {}, True),
        (f"behind {deepest} destination options, in {len(deep)} fragments", deep,
         {"ext_chain_too_long": 1}, True),
        ("valid after all that", [c.packet("last")], {}, True),
    ]
    texts = ["fragmented-" + "f" * 20000, "tiny-" + "t" * 200, "first-fragment-short", "last"]
    report = run_cases(pair, b, cases, texts)
    print(f"\nIPv6 fragments, drops by case: {json.dumps(report)}")
