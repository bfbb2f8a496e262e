"""ESP in UDP (RFC 3948, ``nfq_ipsec/core/udpencap.py`` and the processor's use of it).

scapy's SecurityAssociation with ``nat_t_header`` is the independent implementation: it opens
what we send and we open what it sends, tunnel and transport mode, and a NAT between the two
is played by rewriting the outer address and port of its packets.
"""

from __future__ import annotations

import random
import re
import secrets
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import sas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import ip4
from repo import ROOT, fuzz_script
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.packet import Packet, Raw

from nfq_ipsec.config import load_config, parse_config
from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
    Mode,
    Policy,
    Processor,
    SADirection,
    SecurityAssociation,
    Selector,
    Verdict,
    udpencap,
)
from nfq_ipsec.core.errors import ConfigError, DropReason
from nfq_ipsec.core.esp import overhead_for
from nfq_ipsec.core.sa import Encapsulation, PeerChange, SAEvent

LOCAL, REMOTE = "10.1.0.1", "10.2.0.2"  # transport: the hosts; tunnel: the inner hosts
GW_LOCAL, GW_REMOTE = "192.0.2.1", "198.51.100.2"  # tunnel endpoints
NAT_PUBLIC = "203.0.113.7"  # where a NAT in front of the peer makes its packets come from
SPI_OUT, SPI_IN = 0x1001, 0x2002
KEY_OUT = bytes(range(20))
KEY_IN = bytes(range(100, 120))
SUITE = ("aes-gcm-128", "AES-GCM")
CBC = ("aes-cbc-128", "AES-CBC")
HMAC_KEY = bytes(range(50, 82))


def processor(mode: Mode, *, follow: bool = False, enc: str = "aes-gcm-128",
              in_encap: Encapsulation = Encapsulation.UDP, keepalive: float = 20.0,
              remote: str = REMOTE) -> tuple[Processor, SecurityAssociation, SecurityAssociation]:
    common: dict[str, Any] = {"mode": mode, "peer_change": PeerChange.FOLLOW if follow
                              else PeerChange.DROP}
    if mode is Mode.TUNNEL:
        common |= {"local": GW_LOCAL, "remote": GW_REMOTE}
    mac = "hmac-sha256-128" if enc.startswith("aes-cbc") else None
    key_len = 16 if mac else 20
    out_p = sas.params("out", SPI_OUT, SADirection.OUT, enc, KEY_OUT[:key_len], mac,
                       HMAC_KEY if mac else b"", encapsulation=Encapsulation.UDP,
                       keepalive=keepalive, **common)
    in_p = sas.params("in", SPI_IN, SADirection.IN, enc, KEY_IN[:key_len], mac,
                      HMAC_KEY[::-1] if mac else b"", encapsulation=in_encap, **common)
    out_sa, in_sa = SecurityAssociation(out_p, 0.0), SecurityAssociation(in_p, 0.0)
    pol = Policy("p", Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network(f"{remote}/32")),
                 Action.PROTECT, Direction.BOTH, ("out", "in"))
    return Processor(SPD([pol]), [out_sa, in_sa], 0.0), out_sa, in_sa


def scapy_sa(spi: int, mode: Mode, key: bytes, *, sending: bool, sport: int = 4500,
             enc: tuple[str, str] = SUITE, ikey: bytes = b"") -> ScapySA:
    tunnel = None
    if mode is Mode.TUNNEL:
        tunnel = IP(src=GW_REMOTE, dst=GW_LOCAL) if sending else IP(src=GW_LOCAL, dst=GW_REMOTE)
    return ScapySA(ESP, spi=spi, crypt_algo=enc[1], crypt_key=key,
                   auth_algo="SHA2-256-128" if ikey else None, auth_key=ikey or None,
                   tunnel_header=tunnel, nat_t_header=UDP(sport=sport, dport=4500))


def inner(seed: int, src: str = LOCAL, dst: str = REMOTE) -> list[Packet]:
    rnd = random.Random(seed)
    out: list[Packet] = []
    for n in range(12):
        payload = Raw(rnd.randbytes(rnd.choice([0, 1, 3, 16, 17, 99, 300, 1001])))
        l4 = [ICMP(id=n, seq=n), UDP(sport=1000 + n, dport=53),
              TCP(sport=2000 + n, dport=443, flags="PA", seq=n)][n % 3]
        out.append(IP(bytes(IP(src=src, dst=dst, id=n) / l4 / payload)))
    return out


MODES = [Mode.TRANSPORT, Mode.TUNNEL]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("suite", [SUITE, CBC], ids=lambda s: s[0])
def test_ours_to_scapy(mode: Mode, suite: tuple[str, str]) -> None:
    proc, out_sa, _ = processor(mode, enc=suite[0])
    ikey = HMAC_KEY if suite is CBC else b""
    peer = scapy_sa(SPI_OUT, mode, KEY_OUT[:16 if ikey else 20], sending=False, enc=suite,
                    ikey=ikey)
    for n, pkt in enumerate(inner(1)):
        original = bytes(pkt)
        res = proc.outbound(original, now=5.0)
        assert res.verdict is Verdict.ACCEPT and res.packet is not None, res
        wire = IP(res.packet)
        assert wire.proto == 17 and wire.len == len(res.packet)
        assert (wire[UDP].sport, wire[UDP].dport, wire[UDP].chksum) == (4500, 4500, 0)
        assert wire[UDP].len == len(res.packet) - 20
        assert IP(bytes(wire)).chksum == IP(res.packet).chksum  # the IP checksum is right
        del wire.chksum
        assert IP(bytes(wire)).chksum == IP(res.packet).chksum
        assert wire[ESP].spi == SPI_OUT and wire[ESP].seq == n + 1
        assert (wire.src, wire.dst) == ((GW_LOCAL, GW_REMOTE) if mode is Mode.TUNNEL
                                        else (LOCAL, REMOTE))
        assert bytes(peer.decrypt(IP(res.packet))) == original
    assert res.packet is not None and len(res.packet) - len(original) <= overhead_for(out_sa.params)
    assert out_sa.max_overhead == overhead_for(out_sa.params)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_scapy_to_ours(mode: Mode) -> None:
    proc, _, in_sa = processor(mode)
    peer = scapy_sa(SPI_IN, mode, KEY_IN, sending=True)
    for n, pkt in enumerate(inner(2, src=REMOTE, dst=LOCAL)):
        original = bytes(pkt)
        wire = bytes(peer.encrypt(IP(original), seq_num=n + 1))
        assert IP(wire)[UDP].dport == 4500
        res = proc.inbound(wire, now=1.0)
        assert res.verdict is Verdict.ACCEPT and res.sa is in_sa, res
        assert res.packet == original
    assert not proc.drops and in_sa.packets == 12


def nat(wire: bytes, src: str, sport: int) -> bytes:
    """What a NAT in front of the sender does to its ESP-in-UDP packet: a new source address
    and port, the IP checksum redone, the UDP checksum (0) left alone."""
    pkt = IP(wire)
    pkt.src = src
    pkt[UDP].sport = sport
    del pkt.chksum
    return bytes(pkt)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_transport_behind_nat_fixes_the_inner_checksum(proto: str) -> None:
    """RFC 3948 3.1.2: the peer at a private address behind a NAT seals a TCP/UDP packet
    whose checksum covers its private address; the packet arrives from the NAT's public
    address, and after ESP its checksum must be right for that one (the kernel checks it)."""
    private = "10.77.0.5"
    proc, _, in_sa = processor(Mode.TRANSPORT, remote=NAT_PUBLIC, follow=True)
    peer = scapy_sa(SPI_IN, Mode.TRANSPORT, KEY_IN, sending=True)
    l4 = (TCP(sport=40000, dport=22, flags="S", seq=9) if proto == "tcp"
          else UDP(sport=40000, dport=53))
    for n, size in enumerate((0, 1, 2, 3, 1000, 1001)):
        sent = IP(bytes(IP(src=private, dst=LOCAL) / l4 / Raw(b"\xa5" * size)))
        wire = nat(bytes(peer.encrypt(sent, seq_num=n + 1)), NAT_PUBLIC, 31000)
        res = proc.inbound(wire, now=1.0)
        assert res.verdict is Verdict.ACCEPT and res.packet is not None, res
        got = IP(res.packet)
        assert got.src == NAT_PUBLIC
        want = IP(src=NAT_PUBLIC, dst=LOCAL, id=sent.id) / l4 / Raw(b"\xa5" * size)
        layer = TCP if proto == "tcp" else UDP
        assert got[layer].chksum == IP(bytes(want))[layer].chksum
        assert got[layer].chksum != sent[layer].chksum
    assert in_sa.packets == 6


def test_a_udp_checksum_of_zero_stays_zero() -> None:
    proc, _, _ = processor(Mode.TRANSPORT, remote=NAT_PUBLIC, follow=True)
    peer = scapy_sa(SPI_IN, Mode.TRANSPORT, KEY_IN, sending=True)
    sent = IP(bytes(IP(src="10.77.0.5", dst=LOCAL) / UDP(sport=1, dport=2, chksum=0) / b"x"))
    res = proc.inbound(nat(bytes(peer.encrypt(sent, seq_num=1)), NAT_PUBLIC, 4500), now=1.0)
    assert res.packet is not None and IP(res.packet)[UDP].chksum == 0


@pytest.mark.parametrize("seed", range(30))
def test_l4_checksum_matches_scapy(seed: int) -> None:
    rnd = random.Random(seed)
    src, dst = rnd.getrandbits(32), rnd.getrandbits(32)
    data = rnd.randbytes(rnd.randint(0, 1500)) if seed else b"\0" * 20
    pkt = IP(bytes(IP(src=str(IPv4Address(src)), dst=str(IPv4Address(dst))) /
                   UDP(sport=rnd.getrandbits(16), dport=rnd.getrandbits(16)) / data))
    seg = bytearray(bytes(pkt[UDP]))
    want = pkt[UDP].chksum
    seg[6:8] = b"\0\0"
    got = udpencap.l4_checksum(src, dst, 17, seg)
    assert (got or 0xFFFF) == want


def udp_to_port(payload: bytes, sport: int = 4500, dport: int = 4500,
                length: int | None = None) -> bytes:
    return bytes(IP(src=GW_REMOTE, dst=GW_LOCAL) /
                 UDP(sport=sport, dport=dport, len=length, chksum=0) / Raw(payload))


def test_a_keepalive_is_dropped_and_counted() -> None:
    proc, _, _ = processor(Mode.TUNNEL)
    for _ in range(3):
        res = proc.inbound(udp_to_port(b"\xff"), now=1.0)
        assert res.verdict is Verdict.DROP and res.reason is DropReason.NAT_KEEPALIVE
    assert proc.drops[DropReason.NAT_KEEPALIVE] == 3


@pytest.mark.parametrize("ike", [b"\0\0\0\0", b"\0\0\0\0" + bytes(range(60))])
def test_the_non_esp_marker_passes_untouched(ike: bytes) -> None:
    proc, _, in_sa = processor(Mode.TUNNEL)
    res = proc.inbound(udp_to_port(ike), now=1.0)
    assert res.verdict is Verdict.ACCEPT and res.packet is None and res.sa is None
    assert proc.udp_markers == 1 and not proc.drops and in_sa.packets == 0


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\xfe", b"\xff\xff", b"\0\0\0",
                                     b"\0\0\x20\x02", b"\0\0\x20\x02\0\0\0", b"\xff" * 7])
def test_runts_are_dropped(payload: bytes) -> None:
    proc, _, _ = processor(Mode.TUNNEL)
    res = proc.inbound(udp_to_port(payload), now=1.0)
    assert res.verdict is Verdict.DROP and res.reason is DropReason.UDP_RUNT, res


@pytest.mark.parametrize("length", [0, 7, 9, 30])
def test_a_wrong_udp_length_is_malformed(length: int) -> None:
    proc, _, _ = processor(Mode.TUNNEL)
    res = proc.inbound(udp_to_port(b"\0\0\x20\x02" + bytes(20), length=length), now=1.0)
    assert res.verdict is Verdict.DROP and res.reason is DropReason.UDP_MALFORMED, res


def test_udp_to_other_ports_is_cleartext() -> None:
    proc, _, _ = processor(Mode.TUNNEL)
    res = proc.inbound(udp_to_port(b"\xff", dport=4501), now=1.0)
    assert res.reason is DropReason.NO_POLICY


def test_an_spi_on_another_sas_port_is_unknown() -> None:
    """An SA of ESP in UDP takes its ESP on its own port only (the rules steer by both; the
    core checks again)."""
    _, _, in_sa = processor(Mode.TUNNEL)
    other = SecurityAssociation(sas.params("in-4501", 0x3003, SADirection.IN, key=bytes(20),
                                           encapsulation=Encapsulation.UDP,
                                           udp_destination_port=4501), 0.0)
    proc = Processor(SPD([]), [in_sa, other], 0.0)
    peer = scapy_sa(SPI_IN, Mode.TUNNEL, KEY_IN, sending=True)
    wire = IP(bytes(peer.encrypt(inner(5, REMOTE, LOCAL)[0])))
    wire[UDP].dport = 4501
    del wire.chksum
    res = proc.inbound(bytes(wire), now=1.0)
    assert res.reason is DropReason.UNKNOWN_SPI and in_sa.replay.top == 0


def test_unknown_spi_in_udp() -> None:
    proc, _, _ = processor(Mode.TUNNEL)
    res = proc.inbound(udp_to_port(b"\0\0\x99\x99" + bytes(40)), now=1.0)
    assert res.reason is DropReason.UNKNOWN_SPI


def test_an_sa_of_esp_in_udp_refuses_plain_esp() -> None:
    proc, _, in_sa = processor(Mode.TUNNEL)
    plain = ScapySA(ESP, spi=SPI_IN, crypt_algo="AES-GCM", crypt_key=KEY_IN,
                    tunnel_header=IP(src=GW_REMOTE, dst=GW_LOCAL))
    res = proc.inbound(bytes(plain.encrypt(inner(3, REMOTE, LOCAL)[0])), now=1.0)
    assert res.reason is DropReason.ENCAP_MISMATCH and res.sa is in_sa
    assert in_sa.drops[DropReason.ENCAP_MISMATCH] == 1 and in_sa.replay.top == 0


def test_an_sa_of_plain_esp_refuses_esp_in_udp() -> None:
    """With another SA of ESP in UDP on the port (without one, UDP to 4500 is just cleartext:
    nothing here takes it for ESP)."""
    _, _, in_sa = processor(Mode.TUNNEL, in_encap=Encapsulation.NONE)
    udp_sa = SecurityAssociation(sas.params("in-udp", 0x3003, SADirection.IN,
                                            encapsulation=Encapsulation.UDP), 0.0)
    proc = Processor(SPD([]), [in_sa, udp_sa], 0.0)
    peer = scapy_sa(SPI_IN, Mode.TUNNEL, KEY_IN, sending=True)
    res = proc.inbound(bytes(peer.encrypt(inner(4, REMOTE, LOCAL)[0])), now=1.0)
    assert res.reason is DropReason.ENCAP_MISMATCH and res.sa is in_sa
    assert in_sa.replay.top == 0


def sealed(peer: ScapySA, seq: int, src: str = GW_REMOTE, sport: int = 4500) -> bytes:
    return nat(bytes(peer.encrypt(inner(seq, REMOTE, LOCAL)[0], seq_num=seq)), src, sport)


def test_a_new_peer_is_dropped_unless_the_sa_follows() -> None:
    proc, out_sa, in_sa = processor(Mode.TUNNEL, follow=False)
    peer = scapy_sa(SPI_IN, Mode.TUNNEL, KEY_IN, sending=True)
    assert proc.inbound(sealed(peer, 1), 1.0).verdict is Verdict.ACCEPT
    res = proc.inbound(sealed(peer, 2, sport=1234), 1.0)
    assert res.reason is DropReason.PEER_CHANGED and in_sa.drops[DropReason.PEER_CHANGED] == 1
    res = proc.inbound(sealed(peer, 3, src=NAT_PUBLIC), 1.0)
    assert res.reason is DropReason.PEER_CHANGED
    assert out_sa.udp is not None and (out_sa.udp.peer_addr, out_sa.udp.peer_port) == (
        ip4(GW_REMOTE), 4500)


def sent_to(proc: Processor) -> tuple[str, int]:
    res = proc.outbound(bytes(inner(9)[0]), now=2.0)
    assert res.packet is not None
    wire = IP(res.packet)
    return wire.dst, wire[UDP].dport


def test_tunnel_follows_an_authenticated_new_peer() -> None:
    proc, _, in_sa = processor(Mode.TUNNEL, follow=True)
    peer = scapy_sa(SPI_IN, Mode.TUNNEL, KEY_IN, sending=True)
    assert sent_to(proc) == (GW_REMOTE, 4500)
    assert proc.inbound(sealed(peer, 5, src=NAT_PUBLIC, sport=1025), 1.0).verdict is Verdict.ACCEPT
    assert sent_to(proc) == (NAT_PUBLIC, 1025)
    assert in_sa.udp is not None and in_sa.udp.peer_changes == 1
    assert [e.kind for e in proc.drain_events()] == [SAEvent.PEER_CHANGED]
    # an older packet (within the window, not a replay) from elsewhere passes, moves nothing
    assert proc.inbound(sealed(peer, 3, src=GW_REMOTE, sport=9), 1.0).verdict is Verdict.ACCEPT
    assert sent_to(proc) == (NAT_PUBLIC, 1025)
    # a replay from a new place is dropped and moves nothing
    res = proc.inbound(sealed(peer, 5, src="192.0.2.99", sport=7), 1.0)
    assert res.reason is DropReason.REPLAY and sent_to(proc) == (NAT_PUBLIC, 1025)
    # a forgery (bad ICV) from a new place moves nothing
    bad = bytearray(sealed(peer, 6, src="192.0.2.99", sport=7))
    bad[-1] ^= 1
    assert proc.inbound(bytes(bad), 1.0).reason is DropReason.INTEGRITY
    assert sent_to(proc) == (NAT_PUBLIC, 1025)
    # a packet whose inner packet is outside the policy moves nothing
    wrong = IP(bytes(IP(src="10.9.9.9", dst=LOCAL) / ICMP()))
    res = proc.inbound(nat(bytes(peer.encrypt(wrong, seq_num=8)), "192.0.2.99", 7), 1.0)
    assert res.reason is DropReason.POLICY_MISMATCH and sent_to(proc) == (NAT_PUBLIC, 1025)
    assert in_sa.udp.peer_changes == 1


def test_transport_follows_the_port() -> None:
    proc, _, _ = processor(Mode.TRANSPORT, follow=True)
    peer = scapy_sa(SPI_IN, Mode.TRANSPORT, KEY_IN, sending=True)
    wire = nat(bytes(peer.encrypt(inner(1, REMOTE, LOCAL)[0], seq_num=1)), REMOTE, 2000)
    assert proc.inbound(wire, 1.0).verdict is Verdict.ACCEPT
    assert sent_to(proc) == (REMOTE, 2000)


def test_keepalives_go_while_the_sa_is_idle() -> None:
    proc, out_sa, _ = processor(Mode.TUNNEL, keepalive=20.0)
    assert out_sa.udp is not None
    (ka,) = proc.keepalives(now=100.0)
    pkt = IP(ka)
    assert (pkt.src, pkt.dst, pkt[UDP].sport, pkt[UDP].dport) == (GW_LOCAL, GW_REMOTE, 4500, 4500)
    assert bytes(pkt[UDP].payload) == b"\xff" and pkt[UDP].chksum == 0 and pkt.len == 29
    del pkt.chksum
    assert IP(bytes(pkt)).chksum == IP(ka).chksum
    assert proc.keepalives(now=119.0) == []
    proc.outbound(bytes(inner(9)[0]), now=130.0)  # traffic: no keepalive needed
    assert proc.keepalives(now=149.0) == []
    assert len(proc.keepalives(now=150.0)) == 1
    assert out_sa.udp.keepalives_sent == 2


def test_keepalives_off_and_transport_before_traffic() -> None:
    proc, _, _ = processor(Mode.TUNNEL, keepalive=0.0)
    assert proc.keepalives(now=1000.0) == []
    proc, _, _ = processor(Mode.TRANSPORT)
    assert proc.keepalives(now=1000.0) == []  # no address known yet
    proc.outbound(bytes(inner(9)[0]), now=1000.0)
    (ka,) = proc.keepalives(now=1020.0)
    assert (IP(ka).src, IP(ka).dst) == (LOCAL, REMOTE)


# -- configuration ------------------------------------------------------------------------------

def config(**sa_fields: object) -> dict[str, Any]:
    out = {"name": "o", "direction": "out", "spi": 0x1000, "encryption": "aes-gcm-128",
           "key": "11" * 20}
    in_ = {"name": "i", "direction": "in", "spi": 0x2000, "encryption": "aes-gcm-128",
           "key": "22" * 20}
    (out if sa_fields.pop("inbound", False) is False else in_).update(sa_fields)
    return {"daemon": {"queues": [100]},
            "policy": [{"name": "p", "action": "protect", "sa": ["o", "i"]}], "sa": [out, in_]}


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, online_cpus=[0])
    return info.value.problems


def test_config_defaults_and_values() -> None:
    cfg = parse_config(config(), online_cpus=[0])
    assert cfg.sas[0].encapsulation is Encapsulation.NONE
    cfg = parse_config(config(encapsulation="udp"), online_cpus=[0])
    sa = cfg.sas[0]
    assert (sa.encapsulation, sa.udp_source_port, sa.udp_destination_port, sa.peer_change,
            sa.keepalive) == (Encapsulation.UDP, 4500, 4500, PeerChange.DROP, 20.0)


@pytest.mark.parametrize(("fields", "message"), [
    ({"encapsulation": "tcp"}, "sa[0].encapsulation: must be one of none, udp, got 'tcp'"),
    ({"udp_source_port": 4501}, 'sa[0].udp_source_port: for ESP in UDP only: needs '
     'encapsulation = "udp"'),
    ({"keepalive": 5}, 'sa[0].keepalive: for ESP in UDP only: needs encapsulation = "udp"'),
    ({"encapsulation": "udp", "udp_destination_port": 0},
     "sa[0].udp_destination_port: must be 1..65535, got 0"),
    ({"encapsulation": "udp", "peer_change": "maybe"},
     "sa[0].peer_change: must be one of follow, drop, got 'maybe'"),
    ({"encapsulation": "udp", "keepalive": 0.5},
     "sa[0].keepalive: must be 0 (none) or 1..3600 seconds, got 0.5"),
    ({"encapsulation": "udp", "keepalive": 5, "inbound": True},
     "sa[1].keepalive: outbound SAs only: the side that sends keeps the NAT mapping"),
])
def test_config_refuses(fields: dict[str, object], message: str) -> None:
    assert message in problems(config(**fields))


# -- hostile input: never an exception, always a reason ------------------------------------------

@st.composite
def udp_garbage(draw: st.DrawFn) -> bytes:
    """UDP to port 4500: a known or unknown SPI, the marker, keepalive bytes or nothing, cut
    anywhere, with a UDP length that may lie."""
    head = draw(st.sampled_from([struct.pack("!I", SPI_IN), struct.pack("!I", 0x1001), b"\0" * 4,
                                 b"\xff", b"", struct.pack("!I", 0xFFFFFFFF)]))
    payload = (head + draw(st.binary(max_size=80)))[: draw(st.integers(0, 90))]
    length = draw(st.one_of(st.none(), st.integers(0, 0xFFFF)))
    flags = draw(st.sampled_from([0, 0x2000, 0x0001]))
    pkt = IP(src=GW_REMOTE, dst=GW_LOCAL, flags=flags >> 13, frag=flags & 0x1FFF) / UDP(
        sport=draw(st.sampled_from([4500, 1024])), dport=4500, len=length, chksum=0) / Raw(payload)
    return bytes(pkt)


ALLOWED = {DropReason.NAT_KEEPALIVE, DropReason.UDP_RUNT, DropReason.UDP_MALFORMED,
           DropReason.UNKNOWN_SPI, DropReason.INTEGRITY, DropReason.FRAGMENT, DropReason.REPLAY,
           DropReason.MALFORMED,
           DropReason.NO_POLICY}  # a non-first fragment has no port: cleartext, no policy here


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(udp_garbage())
def test_hostile_udp_is_dropped_with_a_reason(wire: bytes) -> None:
    proc, _, in_sa = processor(Mode.TUNNEL, follow=True)
    res = proc.inbound(wire, now=1.0)
    if res.verdict is Verdict.ACCEPT:  # only the marker passes, untouched
        assert res.packet is None and proc.udp_markers == 1
        assert bytes(IP(wire)[UDP].payload)[:4] == b"\0\0\0\0"
    else:
        assert res.reason in ALLOWED, res
    assert in_sa.udp is not None and in_sa.udp.peer_changes == 0  # nothing forged moved it


def test_the_fuzz_target_takes_its_seeds() -> None:
    fuzz = fuzz_script()
    assert "udp" in fuzz.TARGETS
    one = fuzz.udp_target()
    seeds = fuzz.udp_seeds()
    proc, _ = fuzz._udp_host()
    verdicts = [proc.inbound(fuzz._datagram(seed[1:]), 1.0) for seed in seeds]
    assert [r.sa.name if r.sa else r.reason for r in verdicts] == [
        DropReason.NAT_KEEPALIVE, None, DropReason.UDP_RUNT, DropReason.UDP_RUNT, "in0", "in1"]
    for seed in seeds:
        one(seed)


def test_the_readme_nat_pair_is_a_valid_pair(tmp_path: Path) -> None:
    """The README's example pair for a host behind a NAT loads, and its SAs mirror each other:
    the client's outbound SA is the server's inbound one (SPI and key file), and back."""
    text = (ROOT / "README.md").read_text()
    blocks = dict((m.group(1), m.group(0)) for m in re.finditer(
        r"# (client|server)\.toml: [^\n]*\n.*?(?=```)", text, re.S))
    assert set(blocks) == {"client", "server"}
    for name in ("to-server", "from-server"):
        (tmp_path / f"{name}.key").write_text(secrets.token_hex(20) + "\n")
        (tmp_path / f"{name}.key").chmod(0o600)
    cfgs = {}
    for side, body in blocks.items():
        path = tmp_path / f"{side}.toml"
        path.write_text(body)
        path.chmod(0o600)
        cfgs[side] = load_config(path, online_cpus=[0])
    client, server = ({sa.spi: sa for sa in cfgs[side].sas} for side in ("client", "server"))
    assert set(client) == set(server)
    for spi, sa in client.items():
        peer = server[spi]
        assert sa.direction is not peer.direction and sa.key == peer.key
        assert sa.encapsulation is peer.encapsulation is Encapsulation.UDP
    assert {sa.peer_change for sa in server.values()} == {PeerChange.FOLLOW}
    assert all(sa.keepalive for sa in client.values() if sa.direction is SADirection.OUT)


def test_an_outbound_sa_that_can_never_learn_is_warned_about() -> None:
    doc = config(encapsulation="udp", peer_change="follow")  # out follows, "i" is plain ESP
    cfg = parse_config(doc, online_cpus=[0])
    assert any("sa 'o': follows a new peer, but no inbound SA of policy 'p' on its queue 100"
               in w for w in cfg.warnings), cfg.warnings
    doc["sa"][1].update(encapsulation="udp", peer_change="follow")
    assert not any("follows a new peer" in w for w in parse_config(doc, online_cpus=[0]).warnings)


def test_esp_in_udp_over_ipv6_is_refused() -> None:
    """ESP in UDP is IPv4 only: an SA of it with IPv6 tunnel endpoints, or serving an IPv6
    policy in transport mode, is a configuration error naming the SA."""
    from configs import udp_data

    from nfq_ipsec.core.errors import ConfigError

    tunnel = udp_data()
    for sa in tunnel["sa"]:
        sa["tunnel_local"], sa["tunnel_remote"] = "2001:db8:1::1", "2001:db8:2::1"
    for pol in tunnel["policy"]:
        pol["local"], pol["remote"] = "2001:db8:a::/64", "2001:db8:b::/64"
    with pytest.raises(ConfigError) as err:
        parse_config(tunnel, online_cpus=[0, 1])
    assert "SA 'o0' is ESP in UDP" in str(err.value) and "IPv4 only" in str(err.value)
    transport = udp_data()
    for sa in transport["sa"]:
        sa["mode"] = "transport"
        del sa["tunnel_local"], sa["tunnel_remote"]
    for pol in transport["policy"]:
        pol["local"], pol["remote"] = "2001:db8:a::1/128", "2001:db8:b::1/128"
    with pytest.raises(ConfigError, match="SA 'i0' is ESP in UDP"):
        parse_config(transport, online_cpus=[0, 1])
    parse_config(udp_data(), online_cpus=[0, 1])  # the same over IPv4: fine
