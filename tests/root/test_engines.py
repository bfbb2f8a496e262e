"""The crypto engines in the real daemon (root; a namespace pair, one policy protecting all
traffic between the hosts, two queues each), under a paced TCP flow from A to B while B's
interface is captured:

- ``engine disable openssl`` on both peers moves every SA to another engine at once (status
  names it), ``engine enable openssl`` moves them back, no restart; the flow never stalls for
  1 s (the longest gap between received bytes is measured), every byte arrives;
- an engine whose suites start raising in A's workers (injected by tests/faults): the packets
  that hit it are dropped as ``engine_failed``, the engine is excluded, its SAs move to
  OpenSSL, and the counters agree (worker drops = SA drops = the engine's faults);
- an engine whose output turns wrong (injected) under ``crypto.self_check = 1``: every packet
  is done again on another engine, so the first wrong one is dropped (``engine_failed``)
  before it leaves, and the engine is excluded;
- an engine whose known-answer tests start failing (injected): the next periodic check
  (``crypto.verify_interval = 1``) excludes it and moves its SAs, no packet dropped;
- an engine that hangs for good on the packet path (injected): the watchdog restarts the
  worker, whose start-up known-answer tests exclude the engine at their deadline;
- crypto offload (``crypto.offload_helpers``): helpers killed mid-flow, the packets they held
  dropped and counted exactly, the SAs go on in their workers, ESP order kept on the wire;
- in all: no TCP in clear on the wire, and tshark authenticates every ESP packet with the
  configured keys (nothing wrong reached the wire).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import textwrap
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from labutil import (
    ADDR_A,
    ADDR_B,
    QUEUES,
    SPI_AB,
    SPI_BA,
    Daemon,
    Pair,
    Sniffer,
    end,
    env,
    make_keys,
    make_pair,
    ready,
    result,
    write_config,
)

from nfq_ipsec_lab.lab.labconfig import LabSA
from nfq_ipsec_lab.lab.traffic import tshark_verify

TCP_PORT = 7300
STALL = 1.0  # seconds: the longest TCP stall allowed during disable/enable (docs/engines.md)

TCP_RECEIVER = textwrap.dedent("""
    import json, socket, sys, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(1)
    print("READY", flush=True)
    c, _ = s.accept()
    c.settimeout(30)
    total, gap, last = 0, 0.0, None
    while True:
        data = c.recv(65536)
        now = time.monotonic()
        if not data:
            break
        if last is not None:
            gap = max(gap, now - last)
        last = now
        total += len(data)
    print(json.dumps({"bytes": total, "max_gap": gap}), flush=True)
""")

TCP_SENDER = textwrap.dedent("""
    import json, socket, sys, time
    # 2 KiB every 2 ms for the given seconds: a steady flow in which any pause shows
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    print("READY", flush=True)
    seconds, sent, start = float(sys.argv[3]), 0, time.monotonic()
    chunk = bytes(range(256)) * 8
    n = 0
    while time.monotonic() - start < seconds:
        c.sendall(chunk)
        sent += len(chunk)
        n += 1
        time.sleep(max(0.0, start + n * 0.002 - time.monotonic()))
    c.close()
    print(json.dumps({"bytes": sent}), flush=True)
""")


UDP_CHATTER = textwrap.dedent("""
    import socket, sys, time
    # 16 datagrams (ports 9000..9015) every 20 ms for the given seconds
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print("READY", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        for port in range(9000, 9016):
            try:
                s.sendto(b"x", (sys.argv[1], port))
            except OSError:
                pass
        time.sleep(0.02)
""")


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("e") as p:
        yield p


def _daemon(pair: Pair, tmp: Path, a_side: bool, keys: dict[str, str], crypto: str,
            daemons: list[Daemon], **extra_env: str) -> Daemon:
    name = "a" if a_side else "b"
    cfg = write_config(tmp / name, a_side, pair.va if a_side else pair.vb, keys, per_port=False)
    cfg.write_text(cfg.read_text() + crypto)
    d = Daemon(name, pair.host(pair.a if a_side else pair.b), cfg, env=env(**extra_env),
               log=tmp / name / "daemon.log", lab=pair.lab)
    daemons.append(d)
    return d


def _lab_sas(keys: dict[str, str]) -> list[LabSA]:
    out = []
    for d, spi, src, dst in (("ab", SPI_AB, ADDR_A, ADDR_B), ("ba", SPI_BA, ADDR_B, ADDR_A)):
        for i in range(len(QUEUES)):
            out.append(LabSA(f"{d}{i}", spi + i, "a" if d == "ab" else "b", "b" if d == "ab" else "a",
                             IPv4Address(src), IPv4Address(dst), "aes-gcm-128", None,
                             bytes.fromhex(keys[f"{d}{i}"])))
    return out


def _flow(pair: Pair, tmp: Path, seconds: float, during: list[tuple[float, Any]]) -> dict[str, Any]:
    """A paced TCP flow A -> B for ``seconds`` while B's interface is captured; ``during``:
    (at seconds, action) run in order. The receiver's bytes and longest gap, the sender's
    bytes, the capture."""
    sniffer = Sniffer(pair, pair.b, pair.vb, tmp / "wire.pcap")
    receiver = pair.python(pair.b, TCP_RECEIVER, ADDR_B, str(TCP_PORT), stdin=True)
    sender = None
    try:
        ready(receiver)
        sender = pair.python(pair.a, TCP_SENDER, ADDR_B, str(TCP_PORT), str(seconds))
        ready(sender)
        start = time.monotonic()
        for at, action in during:
            time.sleep(max(0.0, start + at - time.monotonic()))
            action()
        sent = result(sender, timeout=60)
        got = result(receiver, timeout=60)
    finally:
        end(sender, receiver)
        drops = sniffer.stop()
    assert drops == 0
    return {"sent": sent["bytes"], "got": got["bytes"], "max_gap": got["max_gap"],
            "packets": sniffer.packets(), "pcap": tmp / "wire.pcap"}


def _wire_is_good(flow: dict[str, Any], keys: dict[str, str]) -> None:
    assert flow["got"] == flow["sent"] > 0
    assert not [p for p in flow["packets"] if p[9] == 6], "TCP in clear on the wire"
    esp = [p for p in flow["packets"] if p[9] == 50]
    assert len(esp) > 1000
    ts = tshark_verify(flow["pcap"], _lab_sas(keys))
    assert ts.supported and ts.esp == len(esp), ts
    assert ts.icv_good == ts.esp and ts.icv_bad == 0 and ts.unchecked == 0, ts


def _engines_of(d: Daemon) -> dict[str, str]:
    return {sa["name"]: sa["engine"] for sa in d.status()["sas"]}


def test_disable_and_enable_under_a_tcp_flow(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    keys = make_keys()
    a = _daemon(pair, tmp_path, True, keys, "", daemons)
    b = _daemon(pair, tmp_path, False, keys, "", daemons)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    assert set(_engines_of(a).values()) == {"openssl"}  # fastest here, measured at start
    seen: dict[str, Any] = {}

    def engine(action: str) -> None:
        for d in (a, b):
            res = d.ask("engine", action, "openssl")
            assert res.returncode == 0, res.stderr
            seen.setdefault(action, []).append(res.stdout)

    def look() -> None:
        seen["while_disabled"] = (_engines_of(a), _engines_of(b))
        seen["engines_text"] = a.ask("engines").stdout

    flow = _flow(pair, tmp_path, 6.0, [(1.5, lambda: engine("disable")), (3.0, look),
                                       (4.0, lambda: engine("enable"))])
    moved = seen["disable"][0]
    assert "4 SA(s) moved" in moved and "-> pycryptodome" in moved, moved
    assert "4 SA(s) moved" in seen["enable"][0] and "-> openssl" in seen["enable"][0]
    for engines in seen["while_disabled"]:
        assert set(engines.values()) == {"pycryptodome"}, engines
    assert "openssl: disabled" in seen["engines_text"], seen["engines_text"]
    assert set(_engines_of(a).values()) == {"openssl"} == set(_engines_of(b).values())
    print(f"\nengine disable/enable under TCP: longest gap {flow['max_gap'] * 1000:.1f} ms, "
          f"{flow['got']} bytes")
    assert flow["max_gap"] < STALL
    _wire_is_good(flow, keys)
    row = {r["name"]: r for r in a.status()["engines"]}["openssl"]
    assert (row["state"], row["moved_away"], row["faults"]) == ("ready", 4, 0)
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.parametrize("fault", ["engine-raise", "engine-corrupt"])
def test_an_engine_that_fails_is_excluded_and_its_sas_move(pair: Pair, tmp_path: Path,
                                                          daemons: list[Daemon], fault: str) -> None:
    keys = make_keys()
    prefer = '\n[crypto]\npolicy = "prefer"\nprefer = ["pycryptodome"]\n'
    if fault == "engine-corrupt":
        prefer += "self_check = 1\n"
    a = _daemon(pair, tmp_path, True, keys, prefer, daemons,
                NFQ_IPSEC_TEST_FAULT=f"{fault}:pycryptodome:300")
    b = _daemon(pair, tmp_path, False, keys, prefer, daemons)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    assert set(_engines_of(a).values()) == {"pycryptodome"}
    flow = _flow(pair, tmp_path, 4.0, [])
    st = a.status()
    failed = sum(w["drops"].get("engine_failed", 0) for w in st["workers"])
    row = {r["name"]: r for r in st["engines"]}["pycryptodome"]
    print(f"\n{fault}: {failed} packet(s) dropped as engine_failed, longest gap "
          f"{flow['max_gap'] * 1000:.1f} ms; {json.dumps(row)}")
    assert failed >= 1
    assert row["faults"] == failed == sum(sa["other_drops"] for sa in st["sas"])
    assert row["state"] == "excluded" and "on the packet path" in row["reason"], row
    used = {sa["name"] for sa in st["sas"] if sa["packets"]}
    assert {_engines_of(a)[n] for n in used} == {"openssl"}
    assert {r["name"]: r for r in b.status()["engines"]}["pycryptodome"]["state"] == "ready"
    _wire_is_good(flow, keys)
    assert a.stop() == 0 and b.stop() == 0


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the sandboxed workers' user may look into (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="nfq-ipsec-kat-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_failing_periodic_known_answer_test_excludes_the_engine(pair: Pair, tmp_path: Path,
                                                                   daemons: list[Daemon],
                                                                   shared_dir: Path) -> None:
    keys = make_keys()
    crypto = '\n[crypto]\npolicy = "prefer"\nprefer = ["pycryptodome"]\nverify_interval = 1\n'
    trigger = shared_dir / "kat-fails-now"
    a = _daemon(pair, tmp_path, True, keys, crypto, daemons,
                NFQ_IPSEC_TEST_FAULT=f"kat-fail:pycryptodome:{trigger}")
    b = _daemon(pair, tmp_path, False, keys, crypto, daemons)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    assert set(_engines_of(a).values()) == {"pycryptodome"}
    flow = _flow(pair, tmp_path, 5.0, [(1.5, trigger.touch)])
    st = a.status()
    row = {r["name"]: r for r in st["engines"]}["pycryptodome"]
    print(f"\nperiodic known-answer failure: longest gap {flow['max_gap'] * 1000:.1f} ms; "
          f"{row['state']}: {row['reason'][:120]}")
    assert row["state"] == "excluded" and "known-answer test failed" in row["reason"], row
    assert row["moved_away"] == 4 and row["sas"] == 0 and row["faults"] == 0
    assert set(_engines_of(a).values()) == {"openssl"}
    assert sum(w["drops"].get("engine_failed", 0) for w in st["workers"]) == 0
    assert flow["max_gap"] < STALL
    _wire_is_good(flow, keys)
    assert a.stop() == 0 and b.stop() == 0


def test_an_engine_that_hangs_is_excluded_by_the_restarted_worker(pair: Pair, tmp_path: Path,
                                                                  daemons: list[Daemon],
                                                                  shared_dir: Path) -> None:
    """An engine that hangs for good on the packet path (injected: ``engine-hang``) hangs its
    worker: the watchdog (1 s) kills it, the new worker's start-up known-answer tests do not
    finish within ``crypto.verify_timeout`` and the engine is excluded there, the SAs go to
    OpenSSL and the flow goes on; nothing wrong or in clear on the wire."""
    keys = make_keys()
    crypto = '\n[crypto]\npolicy = "prefer"\nprefer = ["pycryptodome"]\nverify_timeout = 0.5\n'
    a = _daemon(pair, tmp_path, True, keys, crypto, daemons,
                NFQ_IPSEC_TEST_FAULT=f"engine-hang:pycryptodome:300:{shared_dir / 'hung'}")
    text = a.config.read_text()
    assert 'log_level = "info"\n' in text
    a.config.write_text(text.replace('log_level = "info"\n', 'log_level = "info"\nwatchdog = 1\n'))
    b = _daemon(pair, tmp_path, False, keys, crypto, daemons)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    assert set(_engines_of(a).values()) == {"pycryptodome"}
    # A restarted worker treats the inbound numbers up to its saved floor (a margin past
    # what it had seen) as received: B's side of the flow (ACKs) alone would take many of
    # TCP's backed-off retransmissions to get past it. UDP from B on many ports (both
    # queues) carries B's SAs past it at once.
    chatter = pair.python(pair.b, UDP_CHATTER, ADDR_A, "12")
    try:
        ready(chatter)
        flow = _flow(pair, tmp_path, 6.0, [])
    finally:
        end(chatter)
    st = a.status()
    row = {r["name"]: r for r in st["engines"]}["pycryptodome"]
    restarts = sum(w["restarts"] for w in st["workers"])
    print(f"\nhung engine: {restarts} worker restart(s), longest gap "
          f"{flow['max_gap'] * 1000:.0f} ms; {row['state']}: {row['reason'][:100]}")
    assert (shared_dir / "hung").read_text() == "hung"  # the fault did fire
    assert restarts >= 1
    assert row["state"] == "excluded" and "did not finish in 0.5 s" in row["reason"], row
    used = {sa["name"] for sa in st["sas"] if sa["packets"]}
    assert {_engines_of(a)[n] for n in used} == {"openssl"}
    _wire_is_good(flow, keys)
    assert a.stop() == 0 and b.stop() == 0


def _helpers_of(d: Daemon) -> list[int]:
    """The crypto offload helpers of ``d``'s workers (their children named nfq-ipsec-o*)."""
    out = []
    for w in d.status()["workers"]:
        pid = w["pid"]
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in map(int, children):
            if Path(f"/proc/{child}/comm").read_text().startswith("nfq-ipsec-o"):
                out.append(child)
    return out


def _esp_in_order(packets: list[bytes]) -> int:
    """ESP sequence numbers strictly increasing per SPI on the wire (gaps allowed: dropped
    packets); returns how many ESP packets were looked at."""
    last: dict[bytes, int] = {}
    n = 0
    for p in packets:
        if p[9] != 50:
            continue
        spi, seq = p[20:24], int.from_bytes(p[24:28], "big")
        assert seq > last.get(spi, 0), f"SPI {spi.hex()}: {seq} after {last.get(spi)}"
        last[spi] = seq
        n += 1
    return n


def test_offload_helpers_killed_mid_flow(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """A's outbound seals go to one helper per worker (``crypto.offload_helpers = 1``, the
    workers sandboxed as by default), B seals in process. Mid-flow A's helpers are killed:
    the packets they held are dropped and counted ``engine_failed`` (worker, SA and offload
    counters agree), the SAs go on sealing in their workers, TCP delivers every byte; on the
    wire every ESP packet authenticates (tshark), none is in clear and each SA's sequence
    numbers only go up (order kept)."""
    keys = make_keys()
    a = _daemon(pair, tmp_path, True, keys,
                "\n[crypto]\noffload_helpers = 1\noffload_batch = 8\n", daemons)
    b = _daemon(pair, tmp_path, False, keys, "", daemons)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    helpers = _helpers_of(a)
    assert len(helpers) == len(QUEUES), helpers
    seen: dict[str, Any] = {}

    def kill() -> None:
        seen["before"] = sum(w["offload"]["jobs"] for w in a.status()["workers"])
        for pid in helpers:
            os.kill(pid, signal.SIGKILL)

    flow = _flow(pair, tmp_path, 4.0, [(1.5, kill)])
    st = a.status()
    offload = [w["offload"] for w in st["workers"]]
    lost = sum(o["lost"] for o in offload)
    failed = sum(w["drops"].get("engine_failed", 0) for w in st["workers"])
    print(f"\noffload: {seen['before']} seals offloaded before the kill, {lost} lost with the "
          f"helpers; longest gap {flow['max_gap'] * 1000:.0f} ms; {json.dumps(offload)}")
    assert seen["before"] > 100  # the seals did go to the helpers
    assert lost >= 1 and lost == failed == sum(sa["other_drops"] for sa in st["sas"])
    hit = [o for o in offload if o["lost"]]
    assert hit and all(not o["active"] and "died" in o["failed"] and o["helpers"] == 0
                       for o in hit), offload
    _wire_is_good(flow, keys)
    assert _esp_in_order(flow["packets"]) > 1000
    assert a.stop() == 0 and b.stop() == 0
