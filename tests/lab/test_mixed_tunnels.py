"""Mixed tunnels live: IPv4 LANs joined over IPv6 (4-in-6) and IPv6 LANs joined over IPv4
(6-in-4), the real daemon on both gateways (topologies ``gateway4in6`` and ``gateway6in4``),
and two hosts whose own IPv4 addresses talk through a 4-in-6 tunnel (``host4in6``: the
decrypted packets go to the host itself, through lo).

An NFQUEUE verdict cannot change a packet's family: the kernel reinjects the verdict's bytes
into the hook of the family the packet was queued in. So the worker sends a result of the other
family through a raw socket of that family, with the daemon's mark, and drops the queued
original (counted as ``crossed_family``). One lab per topology, one queue per peer; while
tcpdump records the wire: ping, TCP (iperf3, four flows) and UDP (iperf3, 1200-byte
datagrams), a 1 MiB file over TCP with its SHA-256, UDP to a protected port
and to the discarded one; then pings too big for the wire after ESP, which cross in fragments
of the outer family that the worker makes. Checked: the traffic arrived (the discarded UDP did
not), the wire holds ESP of the outer family between the peers and nothing else (the link's own
neighbour discovery aside), tshark authenticates every ESP packet, both workers crossed
families both ways and dropped nothing, and the daemons leave their rules closed.

The gateways' LANs have no route across the wire in their own family, and the hosts' IPv4
packets would show on the wire as IPv4: what reaches the other side went through the daemon.
Needs root; the namespaces are named ``ngw<pid>-<n>...``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from labutil import StepRun

from nfq_ipsec_lab.lab.checks import PROTECTED_UDP_PORT
from nfq_ipsec_lab.lab.session import LabSession
from nfq_ipsec_lab.lab.traffic import (
    PROTO_TCP,
    Flow,
    IperfResult,
    PingResult,
    TransferResult,
    TsharkReport,
    UdpProbeResult,
    WireReport,
    analyse_wire,
    iperf3_tcp,
    iperf3_udp,
    ping,
    random_file,
    send_file,
    tshark_verify,
    udp_probe,
)

KINDS = ["gateway4in6", "gateway6in4", "host4in6"]
UDP_COUNT = 20
BIG_PING = 1460  # ICMP bytes: with IP and ESP over 1500, so the outer packet goes in fragments


class Run(StepRun):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind



@pytest.fixture(scope="module", params=KINDS)
def run(request: pytest.FixtureRequest) -> Run:
    r = Run(request.param)
    t0 = time.monotonic()
    with LabSession(r.kind, "aes-gcm-128", queues=1, prefix="ngw") as s:
        topo, cfg, lab, work = s.topology, s.config, s.lab, s.workdir
        c, srv, addr = topo.client, topo.server, topo.server_addr
        r.step("start", s.start_daemons)
        if "start" not in r.errors:
            cap = s.capture()
            r.step("ping", lambda: ping(c, addr, count=3))
            r.step("tcp", lambda: iperf3_tcp(lab, c, srv, addr, seconds=2, parallel=4))
            r.step("udp", lambda: iperf3_udp(lab, c, srv, addr, seconds=2, bitrate="20M",
                                             length=1200))
            data = random_file(work / "random.bin", 1 << 20)
            r.step("file", lambda: send_file(lab, c, srv, addr, data, port=5001))
            r.step("udp_control", lambda: udp_probe(lab, c, srv, addr, PROTECTED_UDP_PORT,
                                                    UDP_COUNT))
            r.step("discard", lambda: udp_probe(lab, c, srv, addr, cfg.discard_port, UDP_COUNT))
            r.step("status", lambda: {n: d.status() for n, d in s.daemons.items()})
            r.step("status_text", lambda: s.daemons["a"].status_text())
            pcap: Path = cap.stop()
            r.values["capture_dropped"] = cap.kernel_dropped
            r.step("wire", lambda: analyse_wire(pcap, s.peer_addresses,
                                                [Flow(PROTO_TCP, cfg.bypass_port)]))
            r.step("tshark", lambda: tshark_verify(pcap, cfg.sas))
            r.step("big_ping", lambda: ping(c, addr, count=4, size=BIG_PING))
            r.step("status_after", lambda: {n: d.status() for n, d in s.daemons.items()})
            r.step("stop", s.stop_daemons)
        r.values["iptables_stopped"] = dict(s.iptables_stopped)
        r.values["iptables_before"] = dict(s.iptables_before)
        r.values["iptables_after"] = dict(s.iptables_after)
        r.values["logs"] = {n: d.output() for n, d in s.daemons.items()}
        r.values["outer"] = topo.a.spec.address.version
    r.timings["total"] = time.monotonic() - t0
    print(f"\nlab {r.kind}: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
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


def test_protected_udp_arrives_and_discarded_does_not(run: Run) -> None:
    control: UdpProbeResult = run.get("udp_control")
    assert control.received == UDP_COUNT, control
    discard: UdpProbeResult = run.get("discard")
    assert discard.received == 0, discard


def test_wire_holds_only_esp_of_the_outer_family(run: Run) -> None:
    wire: WireReport = run.get("wire")
    assert run.values.get("capture_dropped") == 0
    assert wire.cleartext == 0 and wire.other == 0, wire.summary() + "\n" + "\n".join(wire.examples)
    assert wire.esp > 700, wire.summary()  # 1 MiB of TCP alone is over 700 packets
    if run.values["outer"] == 6:
        assert wire.ipv4 == 0 and wire.esp + wire.link == wire.ipv6, wire.summary()
    else:
        assert wire.ipv6 == 0 and wire.esp == wire.ipv4, wire.summary()
    assert set(wire.esp_by_spi) == {0x1000, 0x2000}, wire.esp_by_spi


def test_tshark_authenticates_every_esp_packet(run: Run) -> None:
    ts: TsharkReport = run.get("tshark")
    wire: WireReport = run.get("wire")
    assert ts.supported, ts.reason
    assert ts.esp == wire.esp, f"tshark saw {ts.esp} ESP packets, the capture has {wire.esp}"
    assert ts.icv_bad == 0 and ts.icv_good == ts.esp and ts.unchecked == 0, ts


def test_workers_cross_families_and_drop_nothing_unexpected(run: Run) -> None:
    """Each worker sent its results through the other family's raw socket, both ways (the
    packets it encrypted and those it decrypted), and dropped only the discarded UDP."""
    status: dict[str, dict[str, Any]] = run.get("status")
    wire: WireReport = run.get("wire")
    crossed = 0
    for peer, st in status.items():
        (w,) = st["workers"]
        drops = w["drops"] or {}
        assert set(drops) <= {"policy_discard"}, f"peer {peer}: {drops}"
        out_sa, in_sa = sorted(st["sas"], key=lambda sa: sa["direction"] != "out")
        assert out_sa["packets"] > 0 and in_sa["packets"] > 0, st["sas"]
        assert w["crossed_family"] == out_sa["packets"] + in_sa["packets"], (w, st["sas"])
        crossed += w["crossed_family"]
    assert crossed >= wire.esp, f"{crossed} crossed, {wire.esp} ESP packets on the wire"
    text: str = run.get("status_text")  # read just after the status above
    shown = re.search(r"q100 sent on in the other IP family \(mixed tunnel\): (\d+)", text)
    assert shown is not None, text
    assert int(shown.group(1)) >= status["a"]["workers"][0]["crossed_family"] > 0


def test_stop_closes_the_rules_and_remove_takes_them_out(run: Run) -> None:
    codes = run.get("stop")
    logs = run.values.get("logs", {})
    for peer, code in codes.items():
        assert code == 0, f"daemon {peer} exited with {code}:\n{logs.get(peer, '')[-3000:]}"
    before, after = run.values["iptables_before"], run.values["iptables_after"]
    stopped = run.values["iptables_stopped"]
    for peer in before:
        assert "NFQIPSEC-P2" in stopped[peer] and "-j NFQUEUE" not in stopped[peer], stopped[peer]
        assert after[peer] == before[peer], f"peer {peer}:\nbefore:\n{before[peer]}\nafter:\n{after[peer]}"


def test_a_packet_too_big_for_the_wire_crosses_in_fragments(run: Run) -> None:
    """A raw socket never fragments: the worker sends an ESP packet bigger than the MTU in
    fragments of the outer family, and the peer's kernel reassembles them before its queue.
    6-in-4: every ping arrives, no drop. 4-in-6: the client's kernel sets DF on the first
    (it fits the LAN), which gets "fragmentation needed" (``path_mtu``); it fragments the
    next ones, the gateway's kernel reassembles them (DF clear), and they arrive."""
    p: PingResult = run.get("big_ping")
    four = run.values["outer"] == 6
    assert p.received >= (3 if four else 4), p.output
    for peer, st in run.get("status_after").items():
        (w,) = st["workers"]
        allowed = {"policy_discard", "path_mtu"} if four and peer == "a" else {"policy_discard"}
        assert set(w["drops"] or {}) <= allowed, f"peer {peer}: {w['drops']}"
