"""The keying agent in the daemon: nfq-ipsec against nfq-ipsec with a pre-shared key.

Two namespaces (``ika<pid>-<n>ga``/``gb``), each running ``nfq-ipsec run`` with one
``[[connection]]`` and one protect policy that names it (transport mode between the two hosts,
every protocol), no static SA. A starts the connection, B waits for it; A rekeys the Child SA
every 10 s, B later (so that the rekeys under test are A's). Checked, in order: the
Child SA comes up and carries ping and a file over TCP (its sha256 the same on both sides);
a capture of the link holds ESP and IKE only, no cleartext; with ``rekey_time`` 10 s the Child
SA is rekeyed under a ping stream that loses nothing; ``nfq-ipsec ike terminate`` takes the
Child SAs out and the traffic is dropped, never sent in clear; ``nfq-ipsec ike initiate``
brings it back; the agent killed is restarted alone (the workers go on) and brings the
connection up again. And the leak matrix's rows for negotiated SAs, with UDP canaries from A to
B and B's side of the link captured: the agent killed while a rekey is half done, and A's
daemon restarted with its Child SAs up; no canary may cross in clear. A writes the key log
(daemon.key_log): tshark decrypts the IKE_AUTH exchange captured since before the start and
checks every ESP packet's ICV with it. Last, A's connection made a trap (start_action =
"trap"): the first ping triggers the exchange, dropped and counted as acquire, the later ones
get through. Needs root and the lab's tools.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gate
import pytest
from ikepeers import connection_daemon_config
from labutil import (
    ADDR_A,
    ADDR_B,
    PACED,
    QUEUES,
    RECEIVER,
    Daemon,
    Pair,
    Sniffer,
    end,
    env,
    make_pair,
    ready,
    result,
)
from statusschema import COMPARING, GOLDEN, OFFLOADING, check_answer

from nfq_ipsec_lab.lab import traffic
from nfq_ipsec_lab.lab.netns import LabError

PSK = "a pre-shared key for the lab only"
CANARY = f"IKECANARY{os.getpid()}x"
CANARY_PORTS = (9301, 9302)
REKEY = 10  # seconds: the shortest rekey_time the configuration takes
FILE_PORT = 9100
PROBE_PORT = 9200
RETRY_WAIT = 1.0  # seconds a trap connection is watched not initiating by itself

def config(directory: Path, me: str, peer: str, start: str, rekey: int) -> Path:
    return connection_daemon_config(directory, "{iface}", me, peer, PSK, QUEUES,
                                    ike="aes256gcm16-prfsha256-x25519", esp="aes128gcm16",
                                    mode="transport", start_action=start, rekey_time=rekey,
                                    dpd_delay=0)


class Bed:
    def __init__(self, pair: Pair, a: Daemon, b: Daemon, key_log: Path, boot: Sniffer) -> None:
        self.pair, self.a, self.b = pair, a, b
        self.key_log = key_log  # A's daemon.key_log
        self.boot: Sniffer | None = boot  # the link from before the daemons started

    def ping(self, count: int = 3, wait: float = 1.0) -> tuple[int, int]:
        """(sent, received) of pings from A to B, one after the other (0.1 s apart)."""
        res = traffic.ping(self.pair.host(self.pair.a), ADDR_B, count, wait)
        return res.sent, res.received

    def wait_up(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.ping(1, wait=0.5)[1] == 1:
                    return
            except LabError:  # sendto refused: the policy drops until a Child SA is up
                time.sleep(0.2)
        raise AssertionError(f"no Child SA after {timeout:g} s; A's log:\n{self.a.log_text()[-3000:]}"
                             f"\nB's log:\n{self.b.log_text()[-3000:]}")

    def negotiated(self, d: Daemon) -> list[dict[str, Any]]:
        return [sa for sa in d.status()["sas"] if sa["name"].startswith("peer.")]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    tmp = tmp_path_factory.mktemp("ike-agent")
    started: list[Daemon] = []
    boot: Sniffer | None = None
    bed: Bed | None = None
    with make_pair("g", prefix="ika") as pair:
        try:
            boot = Sniffer(pair, pair.b, pair.vb, tmp / "boot.pcap")
            # B rekeys later than A, so that the rekeys the tests look at are A's (two at once
            # are resolved by the session, tests/unit/test_ike_session.py)
            for name, me, peer, start, rekey, ns, iface in (
                    ("a", ADDR_A, ADDR_B, "start", REKEY, pair.a, pair.va),
                    ("b", ADDR_B, ADDR_A, "none", REKEY * 6, pair.b, pair.vb)):
                path = config(tmp / name, me, peer, start, rekey)
                text = path.read_text().replace("{iface}", iface)
                if name == "a":  # A writes the key log for tshark
                    text = text.replace("[daemon]\n", f'[daemon]\nkey_log = "{tmp / "keys"}"\n')
                path.write_text(text)
                d = Daemon(name, pair.host(ns), path, env=env(), log=tmp / name / "daemon.log",
                           lab=pair.lab)
                started.append(d)
            for d in reversed(started):  # B listens before A starts
                d.start()
                d.wait_running()
            bed = Bed(pair, started[0], started[1], tmp / "keys", boot)
            yield bed
        finally:
            if boot is not None and (bed is None or bed.boot is not None):
                boot.stop()
            for d in started:
                d.cleanup()


def test_child_sa_carries_ping_and_a_file_and_the_link_shows_only_esp_and_ike(
        bed: Bed, tmp_path: Path) -> None:
    bed.wait_up()
    sniffer = Sniffer(bed.pair, bed.pair.b, bed.pair.vb, tmp_path / "link.pcap")
    try:
        assert bed.ping(20) == (20, 20)
        blob = traffic.random_file(tmp_path / "file.bin")
        sent = traffic.send_file(bed.pair.lab, bed.pair.host(bed.pair.a),
                                 bed.pair.host(bed.pair.b), ADDR_B, blob, port=FILE_PORT)
    finally:
        assert sniffer.stop() == 0
    assert sent.ok, sent
    assert sent.sha256_received == hashlib.sha256(blob.read_bytes()).hexdigest()
    kinds: dict[str, int] = {}
    for p in sniffer.packets():
        if p[0] >> 4 != 4:
            continue
        proto, ihl = p[9], (p[0] & 0x0F) * 4
        if proto == 50:
            kind = "esp"
        elif proto == 17 and int.from_bytes(p[ihl + 2:ihl + 4], "big") in (500, 4500):
            kind = "ike"
        else:
            kind = f"cleartext proto {proto}"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"esp"} or set(kinds) == {"esp", "ike"}, kinds
    assert kinds["esp"] >= 40 + 100, kinds  # 20 pings each way and the file's segments
    for d in (bed.a, bed.b):
        log = d.log_text()
        assert "connection peer: Child SA established" in log
        assert PSK not in log
        status = d.status()
        assert check_answer(status) == set(GOLDEN) - COMPARING - OFFLOADING  # the agent's levels too
        (conn,) = status["ike"]["connections"]
        (ike_sa,) = [sa for sa in conn["ike_sas"] if sa["state"] == "established"]
        spis = {c["spi_in"] for c in ike_sa["children"]}
        # the Child SAs status shows are the ones installed (a rekey may be half way through)
        assert spis & {sa["spi"] for sa in bed.negotiated(d) if sa["direction"] == "in"}
        text = d.status_text()
        assert "IKE agent ready" in text and "Child SA in " in text and PSK not in text


def tshark(pcap: Path, key_log: Path, *args: str) -> str:
    """tshark over ``pcap`` with A's key log as its configuration (the keys never in argv)."""
    exe = gate.tool("tshark", "tshark")
    res = subprocess.run([exe, "-n", "-r", str(pcap), "--disable-protocol", "tcp",
                          "-o", "esp.enable_encryption_decode:TRUE",
                          "-o", "esp.enable_authentication_check:TRUE", *args],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LC_ALL": "C", "WIRESHARK_CONFIG_DIR": str(key_log)})
    assert res.returncode == 0, res.stderr[-500:]
    return res.stdout


def test_tshark_decrypts_ike_and_checks_every_esp_icv_with_the_key_log(bed: Bed, tmp_path: Path) -> None:
    """A's key log (daemon.key_log, 0600 files): tshark decrypts the IKE_AUTH exchange of the
    capture since before the start, and checks the ICV of every ESP packet of a ping run."""
    bed.wait_up()
    assert bed.boot is not None
    boot, bed.boot = bed.boot, None
    assert boot.stop() == 0
    for name in ("ikev2_decryption_table", "esp_sa"):
        assert stat.S_IMODE((bed.key_log / name).stat().st_mode) == 0o600
    text = tshark(boot.path, bed.key_log, "-V", "-Y", "isakmp")
    # both sides' identities (their addresses) and traffic selectors, read from the SK payload
    assert text.count("ID_IPV4_ADDR") >= 2, text[-3000:]
    assert "Traffic Selector" in text
    sniffer = Sniffer(bed.pair, bed.pair.b, bed.pair.vb, tmp_path / "esp.pcap")
    try:
        assert bed.ping(20) == (20, 20)
    finally:
        assert sniffer.stop() == 0
    lines = [ln.split("|") for ln in tshark(
        sniffer.path, bed.key_log, "-Y", "esp", "-T", "fields", "-E", "separator=|",
        "-e", "esp.spi", "-e", "esp.icv_good", "-e", "esp.icv_bad").splitlines() if ln.strip()]
    good = sum(1 for ln in lines if ln[1] == "1")
    assert len(lines) >= 40 and good == len(lines), (len(lines), good, lines[:5])
    status = bed.a.status()
    assert status["ike"]["key_log"] == str(bed.key_log)
    assert any("KEY LOG ON" in w for w in status["warnings"])
    assert "KEY LOG ON" in bed.a.log_text()
    assert bed.b.status()["ike"]["key_log"] is None


def test_child_sa_rekey_under_a_ping_stream_loses_nothing(bed: Bed) -> None:
    bed.wait_up()
    before = {sa["spi"] for sa in bed.negotiated(bed.a)}
    sent, got = bed.ping(int(REKEY * 1.6 / 0.1))
    after = {sa["spi"] for sa in bed.negotiated(bed.a)}
    assert "Child SA rekeyed" in bed.a.log_text() + bed.b.log_text()
    assert after - before, (before, after)  # new SPIs are in
    # the old pair retires (its inbound SA lingers a moment): one pair is left on each side
    # (a rekey cycle is REKEY seconds: within one there is such a moment on both sides)
    # (the next rekey may come any moment: what is asserted is one look at both sides)
    deadline = time.monotonic() + REKEY + 2
    while True:
        look = {d.name: (bed.negotiated(d), sorted((d.config.parent / "state").glob("q*/*.json")))
                for d in (bed.a, bed.b)}
        if all(len(sas) == 2 for sas, _ in look.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for sas, files in look.values():
        assert sorted(sa["direction"] for sa in sas) == ["in", "out"], sas
        # the retired pair's state files went with it: at most one file per SA left (a new SA
        # has one once it has carried a packet)
        assert len(files) <= 2, files
    if got != sent:  # where it went: each side's SAs' packets, and the drops
        seen = {d.name: ([(sa["name"], sa["packets"]) for sa in d.status()["sas"]],
                         d.status()["kernel_drops"], [w["drops"] for w in d.status()["workers"]])
                for d in (bed.a, bed.b)}
        pytest.fail(f"{sent - got} of {sent} pings lost across the rekey; {seen}")


def test_terminate_drops_the_traffic_and_initiate_brings_it_back(bed: Bed, tmp_path: Path) -> None:
    bed.wait_up()
    res = bed.a.ask("ike", "terminate", "peer")
    assert res.returncode == 0, res.stderr
    assert "terminated" in res.stdout
    deadline = time.monotonic() + 10
    while bed.negotiated(bed.a) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bed.negotiated(bed.a) == []
    sniffer = Sniffer(bed.pair, bed.pair.b, bed.pair.vb, tmp_path / "down.pcap")
    try:
        probe = traffic.udp_probe(bed.pair.lab, bed.pair.host(bed.pair.a),
                                  bed.pair.host(bed.pair.b), ADDR_B, PROBE_PORT, count=10)
    finally:
        assert sniffer.stop() == 0
    # dropped on A by the policy's fail-closed rule: sendto() itself fails
    assert (probe.sent, probe.refused, probe.received) == (10, 10, 0), probe
    leaked = [p for p in sniffer.packets() if p[0] >> 4 == 4 and p[9] in (1, 17)
              and int.from_bytes(p[(p[0] & 0x0F) * 4 + 2:(p[0] & 0x0F) * 4 + 4], "big") == PROBE_PORT]
    assert leaked == [], "cleartext left with the connection down"
    status = json.loads(bed.a.ask("status", "--json").stdout)
    assert status["kernel_drops"]["no_sa"] >= 10, status["kernel_drops"]  # counted by the rule
    res = bed.a.ask("ike", "initiate", "peer")
    assert res.returncode == 0, res.stderr
    bed.wait_up()
    assert bed.ping(5) == (5, 5)


def test_a_dead_agent_is_restarted_alone_and_its_connection_comes_back(bed: Bed) -> None:
    bed.wait_up()
    before = bed.a.status()
    workers = [w["pid"] for w in before["workers"]]
    agent_pid = before["ike"]["pid"]
    assert isinstance(agent_pid, int) and agent_pid not in workers
    os.kill(agent_pid, signal.SIGKILL)
    status = bed.a.wait_for(lambda st: st["ike"]["restarts"] == 1 and st["ike"]["state"] == "ready",
                            what="the agent restarted")
    assert [w["pid"] for w in status["workers"]] == workers  # the workers went on
    assert status["ike"]["pid"] != agent_pid
    bed.wait_up()  # start_action = "start": it initiates again
    assert bed.ping(5) == (5, 5)
    assert "agent (pid" in bed.a.log_text() and "died" in bed.a.log_text()


# -- the leak matrix's IKE rows: negotiated SAs in every state, no cleartext ------------------

def canary_stream(bed: Bed, tmp_path: Path, name: str, during: Any, seconds: float) -> tuple[int, int]:
    """UDP canaries from A to B every 5 ms for ``seconds`` while ``during()`` runs (after
    0.8 s), B's side of the link captured: no frame may carry the canary in clear. Returns
    (sent, received)."""
    pair = bed.pair
    sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / f"{name}.pcap")
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, CANARY_PORTS)), "0", stdin=True)
    sender = None
    try:
        ready(receiver)
        sender = pair.python(pair.a, PACED, ADDR_B, ",".join(map(str, CANARY_PORTS)), "1", "0.005",
                             str(seconds), CANARY)
        ready(sender)
        time.sleep(0.8)
        during()
        sent = sum(result(sender, timeout=seconds + 60).values())
        time.sleep(0.5)
        got = [text for _, text in result(receiver, stdin="") if text.startswith(CANARY)]
    finally:
        end(sender, receiver)
        assert sniffer.stop() == 0, "the capture is incomplete"
    cleartext = [f for f in sniffer.frames() if CANARY.encode() in f]
    assert not cleartext, f"{name}: {len(cleartext)} frames carry the canary in clear"
    assert sent > 100, sent
    print(f"\nleak matrix (IKE): {name}: 0 canaries in clear, lost {sent - len(got)} of {sent}")
    return sent, len(got)


def test_leak_agent_killed_mid_rekey(bed: Bed, tmp_path: Path) -> None:
    """The agent killed while a rekey is half done (the successor installed, the old pair still
    there): both pairs are taken out at once, the canaries are dropped, none in clear, and the
    connection comes back."""
    bed.wait_up()

    def kill_mid_rekey() -> None:
        st = bed.a.wait_for(lambda st: len([sa for sa in st["sas"] if sa["name"].startswith("peer.")]) > 2,
                            timeout=REKEY * 2.5, what="a rekey half done (two Child SA pairs)")
        os.kill(st["ike"]["pid"], signal.SIGKILL)
        bed.a.wait_for(lambda st: st["ike"]["restarts"] >= 1, what="the agent restarted")

    restarts = bed.a.status()["ike"]["restarts"]
    sent, got = canary_stream(bed, tmp_path, "agent_killed_mid_rekey", kill_mid_rekey, REKEY * 3.0)
    assert got < sent  # the Child SAs went with the agent: some canaries were dropped
    assert bed.a.status()["ike"]["restarts"] == restarts + 1
    bed.wait_up()
    assert bed.ping(5) == (5, 5)


def test_leak_daemon_restart_with_negotiated_sas(bed: Bed, tmp_path: Path) -> None:
    """A's daemon stopped (SIGTERM) and started again while the Child SAs carry canaries: the
    closed rules drop them while it is down, the new agent negotiates again, none in clear."""
    bed.wait_up()

    def bounce() -> None:
        assert bed.a.stop() == 0
        bed.a.start()
        bed.a.wait_running()

    sent, got = canary_stream(bed, tmp_path, "daemon_restart_negotiated", bounce, 8.0)
    assert 0 < got < sent, (sent, got)  # carried before, dropped while down or unkeyed
    bed.wait_up()
    assert bed.ping(5) == (5, 5)


def test_reload_keeps_an_unchanged_connection_and_renegotiates_a_changed_one(bed: Bed) -> None:
    """``nfq-ipsec reload`` with the connection unchanged keeps its IKE and Child SAs; with
    the connection changed (another ``ike_rekey_time``) the agent terminates it and negotiates
    it again, the workers and the agent process go on, and traffic flows on the new SAs."""
    bed.wait_up()
    st = bed.a.status()
    spis, agent_pid = {sa["spi"] for sa in bed.negotiated(bed.a)}, st["ike"]["pid"]
    res = bed.a.ask("reload")
    assert res.returncode == 0, res.stderr
    assert {sa["spi"] for sa in bed.negotiated(bed.a)} == spis  # nothing renegotiated
    text = bed.a.config.read_text()
    assert "ike_rekey_time" not in text
    bed.a.config.write_text(text + "ike_rekey_time = 7200\n")
    res = bed.a.ask("reload")
    assert res.returncode == 0, res.stderr
    assert "peer (re)started" in res.stdout, res.stdout
    bed.wait_up()
    assert bed.ping(5) == (5, 5)
    after = bed.a.status()
    assert after["ike"]["pid"] == agent_pid and after["ike"]["restarts"] == st["ike"]["restarts"]
    assert not spis & {sa["spi"] for sa in bed.negotiated(bed.a)}  # new Child SAs
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in st["workers"]]
    assert "connection peer: removed by a reload" in bed.a.log_text()


def test_a_start_connection_the_peer_deleted_comes_back_by_itself(bed: Bed) -> None:
    """B deletes the IKE SA (``ike terminate`` on B): A's Child SAs go at once, and A, whose
    connection starts, initiates again by itself after its retry wait."""
    from nfq_ipsec.agent import RETRY_MIN

    bed.wait_up()
    before = {sa["spi"] for sa in bed.negotiated(bed.a)}
    res = bed.b.ask("ike", "terminate", "peer")
    assert res.returncode == 0, res.stderr
    t0 = time.monotonic()
    bed.a.wait_for(lambda st: not [sa for sa in st["sas"] if sa["name"].startswith("peer.")],
                   timeout=10, what="A's Child SAs out")
    bed.wait_up(timeout=RETRY_MIN + 20)
    assert time.monotonic() - t0 >= RETRY_MIN - 1  # after the wait, not at once
    assert not before & {sa["spi"] for sa in bed.negotiated(bed.a)}
    assert bed.ping(5) == (5, 5)
    assert "initiating again in" in bed.a.log_text()


def test_a_trap_connection_negotiates_on_the_first_packet_and_drops_until_up(
        bed: Bed, tmp_path: Path) -> None:
    """A's connection made ``start_action = "trap"`` by a reload (which takes its SAs down and
    does not initiate): the first ping triggers the exchange (an acquire from the worker), it
    and the next ones until the Child SA is up are dropped and counted ``acquire``, none in
    clear, and the later pings get through. Prints the time from the first packet to the
    first answered ping (the figure, not an assertion on it)."""
    bed.wait_up()
    text = bed.a.config.read_text()
    assert 'start_action = "start"' in text
    bed.a.config.write_text(text.replace('start_action = "start"', 'start_action = "trap"'))
    res = bed.a.ask("reload")
    assert res.returncode == 0, res.stderr
    bed.a.wait_for(lambda st: not [sa for sa in st["sas"] if sa["name"].startswith("peer.")],
                   timeout=10, what="A's Child SAs out")
    time.sleep(RETRY_WAIT)  # nothing initiates by itself
    assert bed.negotiated(bed.a) == [] and "acquire" not in bed.a.log_text()

    def acquired(st: dict[str, Any]) -> int:
        return sum(w["drops"].get("acquire", 0) for w in st["workers"])

    before = acquired(bed.a.status())
    sniffer = Sniffer(bed.pair, bed.pair.b, bed.pair.vb, tmp_path / "trap.pcap")
    try:
        # one probe every 50 ms: (the first answered one - 1) x 50 ms is when the SA was up
        probe = traffic.ping(bed.pair.host(bed.pair.a), ADDR_B, 60, wait=0.05, interval=0.0)
    finally:
        assert sniffer.stop() == 0
    lines = [ln for ln in probe.output.splitlines() if ln.startswith(("reply", "timeout"))]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("reply"))
    assert first >= 1, lines[:5]  # the first packet was dropped: it only triggered the exchange
    assert all(ln.startswith("reply") for ln in lines[first:]), lines  # then nothing lost
    st = bed.a.status()
    dropped = acquired(st) - before
    # the unanswered pings before A's Child SA was in were counted acquire; one sent right
    # after it may have found B's inbound SA not installed yet (B answered first)
    assert 1 <= dropped <= first, (dropped, first)
    leaked = [p for p in sniffer.packets() if p[0] >> 4 == 4 and p[9] == 1]
    assert leaked == [], "an ICMP echo crossed in clear"
    log = bed.a.log_text()
    assert "connection peer: acquire" in log
    took = re.findall(r"Child SA negotiated ([0-9.]+) s after the acquire", log)
    assert took, log[-2000:]
    (conn,) = st["ike"]["connections"]
    assert conn["start_action"] == "trap"
    print(f"\ntrap: first packet to the first answered ping {first * 50} ms "
          f"({first} probes unanswered, {dropped} dropped as acquire); IKE exchange "
          f"{float(took[-1]) * 1000:.0f} ms from the agent's acquire to the Child SA")
