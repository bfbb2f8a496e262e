"""End to end over IPv6: the real daemon (``nfq-ipsec run``) in the ``host6`` lab (two hosts,
transport mode, IPv6 only) and the ``gateway6`` lab (two gateways, tunnel mode between IPv6
LANs over an IPv6 wire), checked on the wire.

One lab per topology and algorithm, with fresh keys and two queues per peer; while tcpdump
records the wire we send what the IPv4 lab sends (``checks.traffic_and_capture``: ping, TCP and
UDP with iperf3, a 1 MiB file with its SHA-256, the bypass and discard flows); then both
daemons stop. Checked: the traffic arrived, the wire holds nothing but ESP between the peers,
the bypassed flow and neighbour discovery / MLD (which must pass, or the link dies), tshark
authenticates every ESP packet with the configured keys, every worker carried traffic, and the
daemons leave their IPv6 rules closed and take them out on ``rules remove``. Across the
gateways also: a ping too big for the tunnel (1400 bytes of ICMPv6) makes the gateway tell its
sender "packet too big", after which the sender fragments and the pings arrive.

Needs root; the namespaces are named ``nf6<pid>-<n>...``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from labutil import StepRun

from nfq_ipsec_lab.lab.checks import traffic_and_capture
from nfq_ipsec_lab.lab.netns import Host
from nfq_ipsec_lab.lab.session import LabSession
from nfq_ipsec_lab.lab.traffic import (
    IperfResult,
    PingResult,
    TransferResult,
    TsharkReport,
    UdpProbeResult,
    WireReport,
    ping,
)

COMBOS = [("host6", "aes-gcm-128"), ("host6", "aes-cbc-128"), ("gateway6", "aes-gcm-128")]
QUEUES = 2
UDP_COUNT = 20
BIG_PING = 1400  # ICMPv6 bytes: 1440 with the IPv6 header, over 1500 after tunnel-mode ESP


class Run(StepRun):
    def __init__(self, topology: str, encryption: str) -> None:
        super().__init__()
        self.topology, self.encryption = topology, encryption



def too_bigs_received(host: Host) -> int:
    """ICMPv6 "packet too big" messages ``host``'s kernel took in (its own count)."""
    out = host.run(["nstat", "-az", "Icmp6InPktTooBigs"]).stdout.split()
    return int(out[out.index("Icmp6InPktTooBigs") + 1])


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{t}-{e}" for t, e in COMBOS])
def run(request: pytest.FixtureRequest) -> Run:
    r = Run(*request.param)
    t0 = time.monotonic()
    with LabSession(r.topology, r.encryption, queues=QUEUES, prefix="nf6") as s:
        r.step("start", s.start_daemons)
        if "start" not in r.errors:
            traffic_and_capture(s.lab, s.endpoints, s.config, s.workdir, s.daemons, seconds=2,
                                parallel=8, file_size=1 << 20, udp_count=UDP_COUNT, run=r)
            if r.topology == "gateway6":
                topo = s.topology
                ends = (topo.client, topo.server)
                r.step("told_before", lambda: [too_bigs_received(h) for h in ends])
                r.step("big_ping", lambda: ping(topo.client, topo.server_addr, count=4,
                                                size=BIG_PING))
                r.step("told_after", lambda: [too_bigs_received(h) for h in ends])
            r.step("stop", s.stop_daemons)
        r.values["iptables_before"] = dict(s.iptables_before)
        r.values["iptables_stopped"] = dict(s.iptables_stopped)
        r.values["iptables_after"] = dict(s.iptables_after)
        r.values["logs"] = {n: d.output() for n, d in s.daemons.items()}
    r.timings["total"] = time.monotonic() - t0
    print(f"\nlab {r.topology}/{r.encryption}: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    return r


def test_ping(run: Run) -> None:
    p: PingResult = run.get("ping")
    assert p.ok, p.output


def test_tcp_and_udp(run: Run) -> None:
    tcp: IperfResult = run.get("tcp")
    assert tcp.bytes_received > 1_000_000 and tcp.tcp_complete, tcp
    udp: IperfResult = run.get("udp")
    assert udp.packets > 100 and udp.lost_packets <= udp.packets * 0.05, udp


def test_file_arrives_with_same_sha256(run: Run) -> None:
    tr: TransferResult = run.get("file")
    assert tr.size == 1 << 20
    assert tr.ok, tr


def test_bypass_and_discard(run: Run) -> None:
    assert run.get("bypass").ok
    control: UdpProbeResult = run.get("udp_control")
    assert control.received == UDP_COUNT, control
    discard: UdpProbeResult = run.get("discard")
    assert discard.received == 0, discard


def test_wire_holds_only_esp_and_the_link(run: Run) -> None:
    wire: WireReport = run.get("wire")
    assert run.values.get("capture_dropped") == 0
    assert wire.ipv4 == 0 and wire.ipv6 > 1000, wire.summary()
    assert wire.cleartext == 0 and wire.other == 0, wire.summary() + "\n" + "\n".join(wire.examples)
    assert wire.link > 0, "no neighbour discovery on the wire: " + wire.summary()
    assert wire.esp + wire.bypassed + wire.link == wire.ipv6, wire.summary()
    spis = {0x1000 + i for i in range(QUEUES)} | {0x2000 + i for i in range(QUEUES)}
    assert set(wire.esp_by_spi) == spis, {hex(k): v for k, v in wire.esp_by_spi.items()}


def test_tshark_authenticates_every_esp_packet(run: Run) -> None:
    ts: TsharkReport = run.get("tshark")
    wire: WireReport = run.get("wire")
    assert ts.supported, ts.reason
    assert ts.esp == wire.esp, f"tshark saw {ts.esp} ESP packets, the capture has {wire.esp}"
    assert ts.icv_bad == 0 and ts.icv_good == ts.esp and ts.unchecked == 0, ts


def test_every_worker_carries_traffic(run: Run) -> None:
    status: dict[str, dict[str, Any]] = run.get("status")
    for peer, st in status.items():
        assert "neighbour discovery and MLD pass in clear" in st["daemon"]["ipv6"], st["daemon"]
        for w in st["workers"]:
            assert w["packets_out"] and w["packets_out"] > 0, f"peer {peer} queue {w['queue']}: {w}"


def test_stop_closes_the_ipv6_rules_and_remove_takes_them_out(run: Run) -> None:
    codes = run.get("stop")
    logs = run.values.get("logs", {})
    for peer, code in codes.items():
        assert code == 0, f"daemon {peer} exited with {code}:\n{logs.get(peer, '')[-3000:]}"
    before, after = run.values["iptables_before"], run.values["iptables_after"]
    stopped = run.values["iptables_stopped"]
    for peer in before:
        assert "NFQIPSEC-P2" in stopped[peer] and "-j NFQUEUE" not in stopped[peer], stopped[peer]
        assert after[peer] == before[peer], f"peer {peer}:\nbefore:\n{before[peer]}\nafter:\n{after[peer]}"


def test_a_gateway_answers_a_packet_too_big_for_the_tunnel(run: Run) -> None:
    """RFC 4301 8.2.2 over IPv6: the first oversize echo request makes gateway a tell the
    client "packet too big", the first oversize reply (to the second request) gateway b the
    server (each kernel counts what it was told); from then on both fragment, each gateway's
    kernel reassembles before the queue and fragments the ESP packet again, and the last two
    pings of four arrive."""
    if run.topology != "gateway6":
        pytest.skip("a transport-mode host's own kernel fragments its ESP packets")
    p: PingResult = run.get("big_ping")
    assert "reply seq=3 " in p.output and "reply seq=4 " in p.output, p.output
    before, after = run.get("told_before"), run.get("told_after")
    assert after[0] > before[0] and after[1] > before[1], (before, after)
