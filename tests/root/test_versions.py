"""Comparing ESP versions in the data path (``daemon.versions``, ``daemon.compare``), with the
real daemon in namespaces of our own (root):

- ``compare = "all"`` on both peers carries UDP both ways as ESP; the capture holds ESP only,
  tshark authenticates every ESP packet, and every packet was compared and agreed;
- a fault injected into the independent version of A (tests/faults: ``version:KIND``) puts
  nothing on the wire with ``all``: a flipped ciphertext byte or a wrong sequence number is a
  disagreement (the packet dropped), three in a row take the version out and then the SA's
  traffic is dropped; an exception takes it out at once; the counters are exact;
- a fault in B's independent version on the way in (an accept where the core drops, a skipped
  replay check): replayed ESP never reaches B's application;
- a version that hangs stops its worker (nothing cuts it off in-process): its packets are
  not sent, the watchdog replaces the worker, and the new one compares again;
- after a restart both versions resume from the state files and still agree;
- ``sample:2`` with the flipped byte: the compared packets that disagree are dropped, the
  rest leave with the core's bytes, which tshark authenticates;
- ``majority`` over three versions (the core, the independent one, the core's source), one
  pair of daemons for every fault in turn: a fault in one version (either of the two beside
  the core) never stops the traffic, every ESP packet on the wire authenticates in tshark, no
  replay reaches the application, the faulty version is named in the log and the status and
  taken out, and the counters are exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from labutil import (
    ADDR_A,
    ADDR_B,
    PORTS,
    QUEUES,
    RECEIVER,
    SPI_AB,
    SPI_BA,
    Daemon,
    Pair,
    Sniffer,
    daemon,
    end,
    env,
    esp_ids,
    inject,
    make_keys,
    make_pair,
    ready,
    result,
    send,
)

from nfq_ipsec.versions import MISMATCH_LIMIT
from nfq_ipsec_lab.lab.labconfig import LabSA
from nfq_ipsec_lab.lab.traffic import tshark_verify


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("v") as p:
        yield p


THREE = '["core", "independent", "core-source"]'


def comparing(pair: Pair, tmp: Path, a_side: bool, keys: dict[str, str], started: list[Daemon],
              compare: str = "all", extra: str = "", names: str = '["core", "independent"]',
              start: bool = True, **env: str) -> Daemon:
    """A peer's daemon with the versions ``names`` and ``compare`` (and ``extra`` lines of
    [daemon]), started and running (unless not ``start``)."""
    d = daemon(pair, tmp, a_side, keys, started, **env)
    if compare != "off":
        text = d.config.read_text()
        d.config.write_text(text.replace(
            'log_level = "info"\n',
            f'log_level = "info"\nversions = {names}\ncompare = "{compare}"\n'
            + extra, 1))
    if start:
        d.start()
        d.wait_running()
    return d


def lab_sas(keys: dict[str, str]) -> list[LabSA]:
    a, b = IPv4Address(ADDR_A), IPv4Address(ADDR_B)
    out = []
    for i in range(len(QUEUES)):
        out.append(LabSA(f"ab{i}", SPI_AB + i, "a", "b", a, b, "aes-gcm-128", None,
                         bytes.fromhex(keys[f"ab{i}"])))
        out.append(LabSA(f"ba{i}", SPI_BA + i, "b", "a", b, a, "aes-gcm-128", None,
                         bytes.fromhex(keys[f"ba{i}"])))
    return out


def worker(d: Daemon, queue: int) -> dict[str, Any]:
    st = d.status()
    assert st is not None
    [w] = [w for w in st["workers"] if w["queue"] == queue]
    assert isinstance(w, dict)
    return w


def versions_of(d: Daemon, queue: int) -> dict[str, Any]:
    v = worker(d, queue)["versions"]
    assert isinstance(v, dict)
    return v


def capture(pair: Pair, tmp: Path, ns: str, iface: str) -> Sniffer:
    return Sniffer(pair, ns, iface, tmp / f"wire-{iface}.pcap")


def ipv4_protocols(packets: list[bytes]) -> list[int]:
    return [p[9] for p in packets if p and p[0] >> 4 == 4]


def test_compare_all_carries_traffic_as_authenticated_esp(pair: Pair, tmp_path: Path,
                                                          daemons: list[Daemon]) -> None:
    keys = make_keys()
    a = comparing(pair, tmp_path, True, keys, daemons)
    b = comparing(pair, tmp_path, False, keys, daemons)
    sniffer = capture(pair, tmp_path, pair.b, pair.vb)
    messages = [(PORTS[i % 2], f"compare-{i}-" + "x" * (10 + 97 * i)) for i in range(30)]
    got = send(pair, messages)
    assert sniffer.stop() == 0
    assert sorted(got) == sorted(text for _, text in messages)
    packets = sniffer.packets()
    assert set(ipv4_protocols(packets)) == {50}, ipv4_protocols(packets)  # ESP only
    assert len(esp_ids(packets)) == len(messages)
    ts = tshark_verify(sniffer.path, lab_sas(keys))
    assert ts.supported, ts.reason
    assert (ts.esp, ts.icv_good, ts.icv_bad) == (len(messages), len(messages), 0), ts.summary()
    for d in (a, b):
        total = 0
        for q in QUEUES:
            v, w = versions_of(d, q), worker(d, q)
            [p] = v["pairs"]
            assert v["compare"] == "all" and all(x["in_service"] for x in v["versions"])
            assert p["mismatches"] == 0 and p["agreed"] == v["compared"] == v["packets"]
            assert v["packets"] == w["packets_in"] == w["packets_out"]
            total += p["agreed"]
        assert total == len(messages), d.name  # A sealed, B opened, every one compared
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.parametrize("kind", ["flip-byte", "wrong-seq", "raise"])
def test_a_faulty_version_puts_nothing_on_the_wire(pair: Pair, tmp_path: Path,
                                                   daemons: list[Daemon], kind: str) -> None:
    keys = make_keys()
    a = comparing(pair, tmp_path, True, keys, daemons, NFQ_IPSEC_TEST_FAULT=f"version:{kind}")
    b = comparing(pair, tmp_path, False, keys, daemons, compare="off")
    sniffer = capture(pair, tmp_path, pair.b, pair.vb)
    count = 10
    got = send(pair, [(PORTS[0], f"faulty-{i}") for i in range(count)])
    assert sniffer.stop() == 0
    assert got == []
    assert esp_ids(sniffer.packets()) == []  # nothing of A's SAs on the wire
    assert 17 not in ipv4_protocols(sniffer.packets())  # nor in clear
    v, w = versions_of(a, QUEUES[0]), worker(a, QUEUES[0])
    [p] = v["pairs"]
    [core, independent] = v["versions"]
    assert core["in_service"] and not independent["in_service"]
    mismatches = 0 if kind == "raise" else MISMATCH_LIMIT
    assert (p["agreed"], p["mismatches"]) == (0, mismatches)
    assert w["drops"] == {"version_out": count - mismatches,
                          **({"version_mismatch": mismatches} if mismatches else {})}
    assert v["sa_mismatches"] == ({"ab0": mismatches} if mismatches else {})
    assert independent["out_reason"] == ("raised RuntimeError" if kind == "raise"
                                         else f"disagreed {MISMATCH_LIMIT} times in a row")
    assert a.stop() == 0 and b.stop() == 0
    log = a.log_text()
    assert "version independent taken out of service" in log
    if mismatches:
        assert "versions core and independent disagree on a packet of SA ab0" in log
    for key in keys.values():
        assert key not in log


@pytest.mark.parametrize("kind", ["accept-drop", "skip-replay"])
def test_a_version_that_would_let_a_replay_in_is_outvoted_by_failing_closed(
        pair: Pair, tmp_path: Path, daemons: list[Daemon], kind: str) -> None:
    keys = make_keys()
    a = comparing(pair, tmp_path, True, keys, daemons, compare="off")
    b = comparing(pair, tmp_path, False, keys, daemons, NFQ_IPSEC_TEST_FAULT=f"version:{kind}")
    sniffer = capture(pair, tmp_path, pair.a, pair.va)
    count = 6
    messages = [(PORTS[0], f"once-{i}") for i in range(count)]
    assert sorted(send(pair, messages)) == sorted(t for _, t in messages)
    assert sniffer.stop() == 0
    esp = [p for p in sniffer.packets() if p[0] >> 4 == 4 and p[9] == 50]
    assert len(esp) == count
    # the same ESP packets again, from below A's netfilter: replays for B
    replayed = send_after(pair, lambda: inject(pair, esp))
    assert replayed == []  # not one replay reached the application
    v, w = versions_of(b, QUEUES[0]), worker(b, QUEUES[0])
    [p] = v["pairs"]
    assert (p["agreed"], p["mismatches"]) == (count, MISMATCH_LIMIT)
    # then, the version out: the core drops the rest as what they are (version_out is for
    # packets only the core would have passed)
    assert w["drops"] == {"version_mismatch": MISMATCH_LIMIT, "replay": count - MISMATCH_LIMIT}
    assert not v["versions"][1]["in_service"]
    assert a.stop() == 0 and b.stop() == 0


def send_after(pair: Pair, action: Any) -> list[str]:
    """What B's application receives while ``action`` runs."""
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, PORTS)), "0", stdin=True)
    try:
        ready(receiver)
        action()
        time.sleep(0.5)
        got = result(receiver, stdin="")
    finally:
        end(receiver)
    return [text for _, text in got]


def test_sample_n_drops_the_disagreements_and_sends_the_cores_bytes(
        pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    keys = make_keys()
    a = comparing(pair, tmp_path, True, keys, daemons, compare="sample:2",
                  NFQ_IPSEC_TEST_FAULT="version:flip-byte")
    b = comparing(pair, tmp_path, False, keys, daemons, compare="off")
    sniffer = capture(pair, tmp_path, pair.b, pair.vb)
    count = 10
    got = send(pair, [(PORTS[0], f"sampled-{i}") for i in range(count)])
    assert sniffer.stop() == 0
    # compared: the 2nd, 4th and 6th (dropped, then the version is out); the rest leave
    assert got == [f"sampled-{i}" for i in range(count) if i not in (1, 3, 5)]
    ts = tshark_verify(sniffer.path, lab_sas(keys))
    assert ts.supported, ts.reason
    assert (ts.esp, ts.icv_good, ts.icv_bad) == (count - 3, count - 3, 0), ts.summary()
    v = versions_of(a, QUEUES[0])
    assert v["pairs"][0]["mismatches"] == MISMATCH_LIMIT and v["packets"] == count
    assert worker(a, QUEUES[0])["drops"] == {"version_mismatch": MISMATCH_LIMIT}
    assert a.stop() == 0 and b.stop() == 0


def test_a_hung_version_stops_its_worker_until_the_watchdog_replaces_it(
        pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    marker = tmp_path / "version-hung"
    keys = make_keys()
    b = comparing(pair, tmp_path, False, keys, daemons, compare="off")
    sniffer = capture(pair, tmp_path, pair.b, pair.vb)
    a = comparing(pair, tmp_path, True, keys, daemons, extra="watchdog = 2\n",
                  NFQ_IPSEC_TEST_FAULT=f"version:hang-once:{marker}")
    assert send(pair, [(PORTS[0], f"hung-{n}") for n in range(5)]) == []
    assert marker.read_text() == "hung"  # queue 0's independent version took the first packet
    st = a.wait_for(lambda s: s["workers"][0]["state"] == "ready" and s["workers"][0]["restarts"] == 1,
                    timeout=40, what="the watchdog's restart")
    messages = [(PORTS[0], f"after-{n}") for n in range(10)]
    assert send(pair, messages) == [m for _, m in messages]
    assert sniffer.stop() == 0
    packets = sniffer.packets()
    assert 17 not in ipv4_protocols(packets)  # nothing in clear, while hung or after
    assert len(esp_ids(packets)) == len(messages)  # the hung worker's packets never left
    v = versions_of(a, QUEUES[0])
    assert all(x["in_service"] for x in v["versions"]) and v["pairs"][0]["agreed"] == len(messages)
    assert "(daemon.watchdog = 2 s): killing it" in a.log_text()
    assert st["workers"][1]["restarts"] == 0
    assert a.stop() == 0 and b.stop() == 0


def test_after_a_restart_both_versions_resume_from_the_state_files(
        pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """After a clean stop the core resumes an SA's sequence numbers and replay window from its
    state files (not from 1 and 0); the independent version keeps no files and takes that
    state before its first packet, so the two still agree after a restart."""
    keys = make_keys()
    a = comparing(pair, tmp_path, True, keys, daemons)
    b = comparing(pair, tmp_path, False, keys, daemons)
    first = [(PORTS[0], f"before-{n}") for n in range(5)]
    assert send(pair, first) == [m for _, m in first]
    assert a.stop() == 0 and b.stop() == 0
    for d in (a, b):
        d.start()
        d.wait_running()
    second = [(PORTS[0], f"after-{n}") for n in range(5)]
    assert send(pair, second) == [m for _, m in second]
    for d in (a, b):
        v = versions_of(d, QUEUES[0])
        assert (v["pairs"][0]["agreed"], v["pairs"][0]["mismatches"]) == (5, 0), (d.name, v)
    st = a.status()
    assert st is not None
    [ab0] = [s for s in st["sas"] if s["name"] == "ab0"]
    assert ab0["seq"] == 10  # resumed after the first five (sent from 1, both would disagree)
    assert a.stop() == 0 and b.stop() == 0


# -- majority over three versions ---------------------------------------------------------------
def restart_with(tmp: Path, faults: list[tuple[Daemon, str]]) -> None:
    """Each daemon again, with its fault injected and a log of its own (started together)."""
    for d, fault in faults:
        d.env = env(NFQ_IPSEC_TEST_FAULT=f"version:{fault}")
        d.log = tmp / f"{d.name}-{fault.replace(':', '-').replace('@', '-')}.log"
        d.start()
    for d, _ in faults:
        d.wait_running()


def faulty_and_good(fault: str) -> tuple[str, str]:
    bad = fault.partition("@")[2] or "independent"
    return bad, "core-source" if bad == "independent" else "independent"


# (A's fault, on the way out; B's, on the way in): each kind once, in one version or the other
ROUNDS = [("flip-byte@core-source", "accept-drop"), ("wrong-seq", "skip-replay@core-source"),
          ("raise@core-source", "raise")]


def standing(d: Daemon) -> tuple[dict[str, Any], dict[str, tuple[int, int]], dict[str, Any]]:
    """Queue 0's versions by name, its pairs' (agreed, mismatches), and its worker."""
    v, w = versions_of(d, QUEUES[0]), worker(d, QUEUES[0])
    pairs = {"+".join(p["versions"]): (p["agreed"], p["mismatches"]) for p in v["pairs"]}
    return {x["name"]: x for x in v["versions"]} | {"sa_mismatches": v["sa_mismatches"]}, pairs, w


def test_majority_carries_the_traffic_past_a_fault_in_each_version(
        pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    """A seals with a faulty version, B opens with one: every message arrives once, every ESP
    packet on the wire authenticates, and the same packets replayed reach nobody."""
    keys = make_keys()
    a = comparing(pair, tmp_path, True, keys, daemons, "majority", names=THREE, start=False)
    b = comparing(pair, tmp_path, False, keys, daemons, "majority", names=THREE, start=False)
    count = MISMATCH_LIMIT + 1
    for n, (out_fault, in_fault) in enumerate(ROUNDS):
        restart_with(tmp_path, [(a, out_fault), (b, in_fault)])
        sniffer = capture(pair, tmp_path, pair.b, pair.vb)
        messages = [(PORTS[0], f"{n}-majority-{i}") for i in range(count)]
        assert send(pair, messages) == [text for _, text in messages], out_fault  # in order
        assert sniffer.stop() == 0
        ts = tshark_verify(sniffer.path, lab_sas(keys))
        assert ts.supported, ts.reason
        assert (ts.esp, ts.icv_good, ts.icv_bad) == (count, count, 0), (out_fault, ts.summary())
        packets = sniffer.packets()
        assert 17 not in ipv4_protocols(packets)  # nothing in clear
        esp = [p for p in packets if p[0] >> 4 == 4 and p[9] == 50]
        assert send_after(pair, partial(inject, pair, esp)) == [], in_fault  # no replay got in
        for d, fault, sent in ((a, out_fault, count), (b, in_fault, 2 * count)):
            bad, good = faulty_and_good(fault)
            st, pairs, w = standing(d)
            raised = fault.startswith("raise")
            assert st["core"]["in_service"] and st[good]["in_service"], fault
            assert not st[bad]["in_service"] and st[good]["outvoted"] == 0, fault
            assert st[bad]["out_reason"] == ("raised RuntimeError" if raised
                                             else f"disagreed {MISMATCH_LIMIT} times in a row")
            assert (st[bad]["outvoted"], st[bad]["errors"]) == ((0, 1) if raised
                                                                else (MISMATCH_LIMIT, 0)), fault
            assert pairs[f"core+{good}"] == (sent, 0), (fault, pairs)
            # outbound the faulty version disagreed on the first packets; inbound it agreed
            # on the genuine ones, then accepted the first replays
            mine = (0 if d is a else count, 0 if raised else MISMATCH_LIMIT)
            assert pairs[f"core+{bad}"] == ((0, 0) if raised else mine), (fault, pairs)
            assert st["sa_mismatches"] == ({} if raised else {"ab0": MISMATCH_LIMIT}), fault
            # A: nothing dropped; B: each replay dropped once, as what it is
            assert w["drops"] == ({} if d is a else {"replay": count}), (fault, w["drops"])
            assert d.stop() == 0
            log = d.log_text()
            assert f"version {bad} taken out of service" in log, fault
            if not raised:
                assert f"versions core and {bad} disagree on a packet of SA " in log, fault
                assert f"outvoted, the answer of core, {good} leaves" in log, fault
            for key in keys.values():
                assert key not in log
