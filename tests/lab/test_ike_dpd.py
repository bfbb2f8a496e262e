"""A dead peer found by the liveness check, and the connection brought back by itself.

Two namespaces (``ikd<pid>-<n>da``/``db``) each run ``nfq-ipsec run`` with one connection
(transport mode, PSK); A starts it and checks liveness after 2 s of silence
(``dpd_delay = 2``). B's daemon is then killed outright (SIGKILL of its supervisor and
workers, as a crash of the machine would): B answers nothing. A's liveness check goes
unanswered five times (1 + 2 + 4 + 8 + 16 s), its IKE SA fails and its Child SAs go at once,
so A's traffic to B is dropped, never sent in clear (B's side of the link is captured
meanwhile). B is started again; A, whose connection starts, initiates again by itself after
its retry wait, and traffic flows. Needs root and the lab's tools.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ikepeers import connection_daemon_config
from labutil import ADDR_A, ADDR_B, QUEUES, Daemon, Pair, Sniffer, env, make_pair

from nfq_ipsec.agent import RETRY_MIN
from nfq_ipsec.ike.session import RETRANSMIT_TIMEOUT, RETRANSMIT_TRIES
from nfq_ipsec_lab.lab import traffic
from nfq_ipsec_lab.lab.netns import LabError

PSK = "a pre-shared key for the dpd lab only"
DPD = 2
PROBE_PORT = 9400


def negotiated(d: Daemon) -> list[str]:
    return [sa["spi"] for sa in d.status()["sas"] if sa["name"].startswith("peer.")]


def up(pair: Pair, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if traffic.ping(pair.host(pair.a), ADDR_B, 1, 0.5).received == 1:
                return True
        except LabError:  # sendto refused: no Child SA, the policy drops
            time.sleep(0.3)
    return False


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Pair, Daemon, Daemon]]:
    started: list[Daemon] = []
    with make_pair("d", prefix="ikd") as pair:
        try:
            for name, me, peer, start, ns, iface in (("a", ADDR_A, ADDR_B, "start", pair.a, pair.va),
                                                     ("b", ADDR_B, ADDR_A, "none", pair.b, pair.vb)):
                path = connection_daemon_config(tmp_path / name, iface, me, peer, PSK, QUEUES,
                                                esp="aes128gcm16", mode="transport",
                                                start_action=start, dpd_delay=DPD if name == "a" else 0)
                d = Daemon(name, pair.host(ns), path, env=env(), log=tmp_path / name / "daemon.log",
                           lab=pair.lab)
                started.append(d)
            for d in reversed(started):
                d.start()
                d.wait_running()
            yield pair, started[0], started[1]
        finally:
            for d in started:
                d.cleanup()


def test_a_dead_peer_fails_the_ike_sa_and_the_connection_comes_back(
        bed: tuple[Pair, Daemon, Daemon], tmp_path: Path) -> None:
    pair, a, b = bed
    assert up(pair, 20), a.log_text()[-2000:]
    first = set(negotiated(a))
    b.crash()
    t0 = time.monotonic()
    give_up = DPD + sum(RETRANSMIT_TIMEOUT * 2 ** k for k in range(RETRANSMIT_TRIES))
    sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / "dead.pcap")
    try:
        a.wait_for(lambda st: not [sa for sa in st["sas"] if sa["name"].startswith("peer.")],
                   timeout=give_up + 15, what="the Child SAs out after the failed liveness check")
        failed_after = time.monotonic() - t0
        probe = traffic.udp_probe(pair.lab, pair.host(pair.a), pair.host(pair.b), ADDR_B,
                                  PROBE_PORT, count=10)
    finally:
        assert sniffer.stop() == 0
    assert failed_after >= give_up - DPD - 1, failed_after  # not before the tries ran out
    assert probe.refused == 10 and probe.received == 0, probe  # dropped on A, fail closed
    leaked = [p for p in sniffer.packets() if p[0] >> 4 == 4 and p[9] == 17
              and int.from_bytes(p[(p[0] & 0x0F) * 4 + 2:(p[0] & 0x0F) * 4 + 4], "big") == PROBE_PORT]
    assert leaked == []
    assert "IKE SA failed" in a.log_text()
    b.start()
    b.wait_running()
    assert up(pair, RETRY_MIN * 2 + 20), a.log_text()[-3000:]  # A initiated again by itself
    assert not first & set(negotiated(a))
    assert "initiating again in" in a.log_text()
