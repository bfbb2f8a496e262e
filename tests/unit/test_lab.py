"""The lab's pieces that need no root: config and key generation, the tshark SA entries, the
wire analysis, iptables snapshot normalisation and namespace naming."""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import gate
import pytest
from packets import icmp_echo_message, ipv4

from nfq_ipsec.config import load_config
from nfq_ipsec.core import Action, Mode, Processor, Verdict
from nfq_ipsec.pcap import read_frames
from nfq_ipsec_lab.lab import labconfig, netns
from nfq_ipsec_lab.lab.daemon import normalise_iptables_save
from nfq_ipsec_lab.lab.labconfig import LabSA, PeerSpec, generate, parse_encryption
from nfq_ipsec_lab.lab.traffic import (
    PROTO_TCP,
    PROTO_UDP,
    Flow,
    analyse_wire,
    tshark_argv,
    tshark_uat_entries,
    tshark_verify,
)

HOST_A = PeerSpec("a", "eth1", IPv4Address("192.168.56.10"), IPv4Network("192.168.56.10/32"), "host")
HOST_B = PeerSpec("b", "eth1", IPv4Address("192.168.56.11"), IPv4Network("192.168.56.11/32"), "host")
GW_A = PeerSpec("a", "wan0", IPv4Address("192.168.56.10"), IPv4Network("10.1.0.0/24"), "gateway")
GW_B = PeerSpec("b", "wan0", IPv4Address("192.168.56.11"), IPv4Network("10.2.0.0/24"), "gateway")


# -- encryption names -------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("aes-gcm-128", ("aes-gcm-128", None)),
    ("aes-gcm-256", ("aes-gcm-256", None)),
    ("chacha20-poly1305", ("chacha20-poly1305", None)),
    ("aes-cbc-128", ("aes-cbc-128", "hmac-sha256-128")),
    ("aes-cbc-256", ("aes-cbc-256", "hmac-sha256-128")),
    ("aes-cbc-256+hmac-sha512-256", ("aes-cbc-256", "hmac-sha512-256")),
])
def test_parse_encryption(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_encryption(text) == expected


@pytest.mark.parametrize("text", ["des", "3des", "null", "aes-gcm-128+hmac-sha256-128",
                                  "aes-cbc-128+hmac-md5-96", "rot13"])
def test_parse_encryption_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_encryption(text)


# -- configuration generation -----------------------------------------------------------------

@pytest.mark.parametrize("encryption", ["aes-gcm-128", "aes-gcm-256", "chacha20-poly1305",
                                        "aes-cbc-128", "aes-cbc-256"])
@pytest.mark.parametrize("queues", [1, 2, 3])
def test_generated_host_configs_load(tmp_path: Path, encryption: str, queues: int) -> None:
    lc = generate(tmp_path / "cfg", HOST_A, HOST_B, encryption, queues)
    assert lc.mode == "transport" and lc.queues == tuple(100 + i for i in range(queues))
    assert len(lc.sas) == 2 * queues
    a = load_config(lc.peer("a").path, online_cpus=[0, 1])
    b = load_config(lc.peer("b").path, online_cpus=[0, 1])
    assert not a.warnings and not b.warnings
    for cfg, me in ((a, HOST_A), (b, HOST_B)):
        assert cfg.node.interface == "eth1" and cfg.node.role == "host"
        assert cfg.node.default_action is Action.DISCARD
        assert cfg.queue_numbers == lc.queues
        assert [p.action for p in cfg.policies] == [Action.BYPASS, Action.DISCARD, Action.PROTECT]
        assert cfg.policies[2].selector.local == me.protected
        # RFC 9611: one SA per queue and direction, owned by that queue
        for q in lc.queues:
            held = cfg.sas_for_queue(q)
            assert sorted(sa.direction.value for sa in held) == ["in", "out"]
        assert all(sa.mode is Mode.TRANSPORT for sa in cfg.sas)
        assert cfg.daemon.control_socket == str(lc.peer(me.name).control_socket)
    # the same SA on both sides: same SPI and keys, directions swapped
    for sa in a.sas:
        other = b.sa(sa.name)
        assert (sa.spi, sa.key, sa.integrity_key, sa.queue) == (
            other.spi, other.key, other.integrity_key, other.queue)
        assert sa.direction is not other.direction


def test_generated_gateway_configs_are_tunnel_mode(tmp_path: Path) -> None:
    lc = generate(tmp_path / "cfg", GW_A, GW_B, "aes-gcm-128", 2)
    assert lc.mode == "tunnel"
    a = load_config(lc.peer("a").path, online_cpus=[0, 1])
    assert a.node.role == "gateway" and a.node.interface == "wan0"
    for sa in a.sas:
        assert sa.mode is Mode.TUNNEL
        assert sa.tunnel_local == int(GW_A.address) and sa.tunnel_remote == int(GW_B.address)
    protect = a.policies[2]
    assert (protect.selector.local, protect.selector.remote) == (GW_A.protected, GW_B.protected)


def test_bypass_and_discard_ports_sit_on_peer_b(tmp_path: Path) -> None:
    lc = generate(tmp_path / "cfg", HOST_A, HOST_B, "aes-gcm-128", 1)
    a = load_config(lc.peer("a").path, online_cpus=[0])
    b = load_config(lc.peer("b").path, online_cpus=[0])
    port = lc.bypass_port
    assert a.policies[0].selector.remote_ports == (port, port) and a.policies[0].selector.local_ports is None
    assert b.policies[0].selector.local_ports == (port, port) and b.policies[0].selector.remote_ports is None
    assert a.policies[1].selector.protocol == PROTO_UDP
    assert a.policies[1].selector.remote_ports == (lc.discard_port, lc.discard_port)


def test_key_files_are_private_and_fresh(tmp_path: Path) -> None:
    lc1 = generate(tmp_path / "one", HOST_A, HOST_B, "aes-cbc-128", 2)
    lc2 = generate(tmp_path / "two", HOST_A, HOST_B, "aes-cbc-128", 2)
    assert stat.S_IMODE((tmp_path / "one").stat().st_mode) == 0o700
    keyfiles = list((tmp_path / "one").rglob("*.key"))
    assert len(keyfiles) == 2 * 2 * 4  # per peer: 4 SAs, a cipher and an HMAC key each
    for f in keyfiles:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for f in (tmp_path / "one").rglob("*.toml"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        text = f.read_text()
        for sa in lc1.sas:  # keys only in key files, never inline
            assert sa.key.hex() not in text and sa.integrity_key.hex() not in text
    keys1 = {k for sa in lc1.sas for k in (sa.key, sa.integrity_key)}
    keys2 = {k for sa in lc2.sas for k in (sa.key, sa.integrity_key)}
    assert len(keys1) == 8 and not keys1 & keys2
    assert "key=" not in repr(lc1.sas[0]) and lc1.sas[0].key.hex() not in repr(lc1)


def test_generate_refuses_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "x", HOST_A, HOST_A, "aes-gcm-128", 1)
    with pytest.raises(ValueError):
        generate(tmp_path / "x", HOST_A, HOST_B, "aes-gcm-128", 0)
    with pytest.raises(ValueError):
        generate(tmp_path / "x", GW_A, GW_B, "aes-gcm-128", 1, mode="transport")


def _icmp_echo(src: str, dst: str, seq: int) -> bytes:
    body = b"lab unit test %d" % seq
    return ipv4(src, dst, 1, icmp_echo_message(7, seq, body))


@pytest.mark.parametrize(("a", "b", "src", "dst"), [
    (HOST_A, HOST_B, "192.168.56.10", "192.168.56.11"),
    (GW_A, GW_B, "10.1.0.2", "10.2.0.2"),
], ids=["transport", "tunnel"])
@pytest.mark.parametrize("encryption", ["aes-gcm-128", "chacha20-poly1305", "aes-cbc-128"])
def test_generated_peers_understand_each_other(
    tmp_path: Path, a: PeerSpec, b: PeerSpec, src: str, dst: str, encryption: str,
) -> None:
    """a's worker for each queue seals, b's worker for the same queue opens: keys, SPIs, modes
    and selectors of the two generated files fit together."""
    lc = generate(tmp_path / "cfg", a, b, encryption, 2)
    ca = load_config(lc.peer("a").path, online_cpus=[0, 1])
    cb = load_config(lc.peer("b").path, online_cpus=[0, 1])
    for q in lc.queues:
        pa = Processor(ca.spd, ca.sas_for_queue(q), 0.0)
        pb = Processor(cb.spd, cb.sas_for_queue(q), 0.0)
        inner = _icmp_echo(src, dst, q)
        out = pa.outbound(inner, 0.0)
        assert out.verdict is Verdict.ACCEPT and out.packet is not None, out
        assert out.packet[9] == 50
        assert out.packet[12:20] == a.address.packed + b.address.packed
        back = pb.inbound(out.packet, 0.0)
        assert back.verdict is Verdict.ACCEPT, back
        assert back.packet is not None and back.packet[20:] == inner[20:]


# -- tshark SA entries ------------------------------------------------------------------------

def _sa(encryption: str, integrity: str | None, key: bytes, ikey: bytes = b"") -> LabSA:
    return LabSA("a-to-b-0", 0x1000, "a", "b", IPv4Address("192.168.56.10"),
                 IPv4Address("192.168.56.11"), encryption, integrity, key, ikey)


def test_uat_entry_aead() -> None:
    key = bytes(range(20))
    [entry] = tshark_uat_entries([_sa("aes-gcm-128", None, key)])
    assert entry == ('uat:esp_sa:"IPv4","192.168.56.10","192.168.56.11","0x00001000",'
                     '"AES-GCM with 16 octet ICV [RFC4106]","0x000102030405060708090a0b0c0d0e0f10111213",'
                     '"NULL",""')


def test_uat_entry_cbc_hmac() -> None:
    [entry] = tshark_uat_entries([_sa("aes-cbc-256", "hmac-sha256-128", b"\x11" * 32, b"\x22" * 32)])
    assert entry == ('uat:esp_sa:"IPv4","192.168.56.10","192.168.56.11","0x00001000",'
                     f'"AES-CBC [RFC3602]","0x{"11" * 32}","HMAC-SHA-256-128 [RFC4868]","0x{"22" * 32}"')


def test_uat_entries_cover_every_generated_sa(tmp_path: Path) -> None:
    lc = generate(tmp_path / "cfg", GW_A, GW_B, "aes-cbc-128", 2)
    entries = tshark_uat_entries(lc.sas)
    assert len(entries) == 4
    assert sum('"192.168.56.10","192.168.56.11"' in e for e in entries) == 2
    assert sum('"192.168.56.11","192.168.56.10"' in e for e in entries) == 2
    argv = tshark_argv("tshark", tmp_path / "x.pcap", lc.sas)
    assert argv.count("-o") == 2 + 4  # decrypt, authenticate; one esp_sa entry per SA
    assert argv.count("--disable-protocol") == 2  # the decrypted packets: not past IP
    assert "esp.icv_good" in argv and "esp.icv_bad" in argv
    # ESP in UDP: tshark finds the ESP through UDP (its udpencap dissector), so UDP stays on
    udp = [dataclasses.replace(sa, encapsulation="udp") for sa in lc.sas]
    argv = tshark_argv("tshark", tmp_path / "x.pcap", udp)
    assert argv[argv.index("--disable-protocol") + 1] == "tcp" and "udp" not in argv


# -- capture analysis -------------------------------------------------------------------------

def _write_pcap(path: Path, frames: list[bytes], linktype: int = 1) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype))
        for i, frame in enumerate(frames):
            f.write(struct.pack("<IIII", 1_700_000_000, i, len(frame), len(frame)))
            f.write(frame)


def _eth(etype: int, payload: bytes, vlan: bool = False) -> bytes:
    mac = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
    if vlan:
        return mac + struct.pack("!HHH", 0x8100, 5, etype) + payload
    return mac + struct.pack("!H", etype) + payload


def test_analyse_wire_sorts_ipv6_frames(tmp_path: Path) -> None:
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import ICMPv6ND_NS, IPv6, IPv6ExtHdrDestOpt
    from scapy.layers.ipsec import ESP

    a, b = "2001:db8:56::10", "2001:db8:56::11"
    frames = [
        _eth(0x86DD, bytes(IPv6(src=a, dst=b) / ESP(spi=0x1000, seq=1, data=b"\0" * 32))),
        _eth(0x86DD, bytes(IPv6(src=b, dst=a) / IPv6ExtHdrDestOpt() / ESP(spi=0x2000, seq=1))),
        _eth(0x86DD, bytes(IPv6(src="fe80::1", dst="ff02::1:ff00:11", hlim=255)
                           / ICMPv6ND_NS(tgt=b))),
        _eth(0x86DD, bytes(IPv6(src=a, dst=b) / TCP(sport=40000, dport=2222))),
        _eth(0x86DD, bytes(IPv6(src=a, dst=b) / UDP(sport=1, dport=9998))),
        _eth(0x86DD, bytes(IPv6(src=a, dst="2001:db8:56::99") / ESP(spi=0x1000, seq=2))),
    ]
    pcap = tmp_path / "wire6.pcap"
    _write_pcap(pcap, frames)
    rep = analyse_wire(pcap, (a, b), [Flow(PROTO_TCP, 2222)])
    assert (rep.frames, rep.ipv4, rep.ipv6, rep.esp, rep.link, rep.bypassed, rep.cleartext,
            rep.other) == (6, 0, 6, 2, 1, 1, 2, 0)
    assert rep.esp_by_spi == {0x1000: 1, 0x2000: 1}
    assert any("9998" in e for e in rep.examples) and any("2001:db8:56::99" in e for e in rep.examples)


def test_analyse_wire_sorts_frames(tmp_path: Path) -> None:
    a, b = "192.168.56.10", "192.168.56.11"
    esp = struct.pack("!II", 0x1000, 1) + b"\x00" * 40
    tcp_bypass = struct.pack("!HH", 40000, 2222) + b"\x00" * 16
    tcp_clear = struct.pack("!HH", 40001, 5201) + b"\x00" * 16
    frames = [
        _eth(0x0800, ipv4(a, b, 50, esp)),
        _eth(0x0800, ipv4(b, a, 50, struct.pack("!II", 0x2000, 1) + b"\x00" * 40), vlan=True),
        _eth(0x0806, b"\x00" * 28),
        _eth(0x0800, ipv4("10.1.0.2", "10.2.0.2", 6, tcp_bypass)),
        _eth(0x0800, ipv4("10.1.0.2", "10.2.0.2", 6, tcp_clear)),
        _eth(0x0800, ipv4(a, "192.168.56.99", 50, esp)),  # ESP, but not between the peers
        _eth(0x86DD, b"\x60" + b"\x00" * 39),
    ]
    pcap = tmp_path / "wire.pcap"
    _write_pcap(pcap, frames)
    assert [t for t, _ in read_frames(pcap)] == [0x0800, 0x0800, 0x0806, 0x0800, 0x0800, 0x0800, 0x86DD]
    rep = analyse_wire(pcap, (a, b), [Flow(PROTO_TCP, 2222)])
    # the IPv6 frame: a hop-by-hop header in an empty payload, cleartext that can't be read
    assert (rep.frames, rep.ipv4, rep.ipv6, rep.esp, rep.arp, rep.bypassed, rep.cleartext,
            rep.other) == (7, 5, 1, 2, 1, 1, 3, 0)
    assert rep.esp_by_spi == {0x1000: 1, 0x2000: 1}
    assert not rep.ok
    assert any("5201" in e for e in rep.examples)
    assert any("IPv6" in e and "bad_ext_header" in e for e in rep.examples)
    clean = tmp_path / "clean.pcap"
    _write_pcap(clean, frames[:4])
    assert analyse_wire(clean, (a, b), [Flow(PROTO_TCP, 2222)]).ok


def test_analyse_wire_counts_esp_in_udp_only_where_expected(tmp_path: Path) -> None:
    """With ``udp_port``, ESP in UDP between the peers counts as ESP (by its SPI); a keepalive,
    the non-ESP marker, another port or another host on that port stay cleartext; without it,
    all of them are cleartext."""
    a, b = "192.168.56.10", "192.168.56.11"

    def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
        return _eth(0x0800, ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport,
                                                          8 + len(payload), 0) + payload))

    esp = struct.pack("!II", 0x1001, 7) + b"\x00" * 32
    frames = [
        udp(a, b, 4500, 4500, esp),
        udp(b, a, 4500, 4500, struct.pack("!II", 0x2001, 7) + b"\x00" * 32),
        udp(a, b, 4500, 4500, b"\xff"),  # a NAT-keepalive
        udp(a, b, 4500, 4500, b"\x00" * 4 + b"IKE message...."),  # the non-ESP marker
        udp(a, b, 4501, 4500, esp),
        udp(a, "192.168.56.99", 4500, 4500, esp),
    ]
    pcap = tmp_path / "udp.pcap"
    _write_pcap(pcap, frames)
    rep = analyse_wire(pcap, (a, b), udp_port=4500)
    assert (rep.ipv4, rep.esp, rep.esp_in_udp, rep.cleartext) == (6, 2, 2, 4)
    assert rep.esp_by_spi == {0x1001: 1, 0x2001: 1}
    assert "(2 in UDP)" in rep.summary()
    plain = analyse_wire(pcap, (a, b))
    assert (plain.esp, plain.cleartext) == (0, 6)


def test_tshark_checks_our_esp_with_generated_entries(tmp_path: Path) -> None:
    """The uat entries really work: tshark authenticates ESP made by the core with lab SAs."""
    tshark = gate.tool("tshark", "tshark")
    lc = generate(tmp_path / "cfg", GW_A, GW_B, "aes-cbc-128", 2)
    ca = load_config(lc.peer("a").path, online_cpus=[0, 1])
    frames = []
    for q in lc.queues:
        proc = Processor(ca.spd, ca.sas_for_queue(q), 0.0)
        for seq in range(3):
            res = proc.outbound(_icmp_echo("10.1.0.2", "10.2.0.2", seq), 0.0)
            assert res.packet is not None
            frames.append(_eth(0x0800, res.packet))
    frames[-1] = frames[-1][:-1] + bytes([frames[-1][-1] ^ 1])  # one bad ICV
    pcap = tmp_path / "esp.pcap"
    _write_pcap(pcap, frames)
    rep = tshark_verify(pcap, lc.sas, tshark)
    assert rep.supported and (rep.esp, rep.icv_good, rep.icv_bad) == (6, 5, 1), rep


# -- iptables snapshot ------------------------------------------------------------------------

SAVE_PRISTINE = """# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*filter
:INPUT ACCEPT [12:3456]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [7:890]
-A INPUT -s 203.0.113.99/32 -j DROP
COMMIT
# Completed on Mon Jan  1 00:00:00 2024
"""
SAVE_AFTER = """# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Jan  1 00:05:00 2024
*raw
:PREROUTING ACCEPT [100:20000]
:OUTPUT ACCEPT [90:10000]
COMMIT
*filter
:INPUT ACCEPT [99:9999]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [70:8900]
-A INPUT -s 203.0.113.99/32 -j DROP
COMMIT
"""


def test_iptables_normalisation_ignores_counters_comments_and_empty_tables() -> None:
    assert normalise_iptables_save(SAVE_PRISTINE) == normalise_iptables_save(SAVE_AFTER)
    leftover = SAVE_AFTER.replace(":OUTPUT ACCEPT [90:10000]\n",
                                  ":OUTPUT ACCEPT [90:10000]\n:NFQIPSEC-IN - [0:0]\n")
    assert normalise_iptables_save(leftover) != normalise_iptables_save(SAVE_PRISTINE)
    policy = SAVE_AFTER.replace(":FORWARD ACCEPT", ":FORWARD DROP")
    assert normalise_iptables_save(policy) != normalise_iptables_save(SAVE_PRISTINE)
    rule = SAVE_AFTER.replace("COMMIT\n*filter", "-A PREROUTING -p esp -j DROP\nCOMMIT\n*filter")
    assert normalise_iptables_save(rule) != normalise_iptables_save(SAVE_PRISTINE)


# -- namespace names --------------------------------------------------------------------------

def test_namespace_names_are_unique_per_run(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
    labs = [netns.Lab(workdir=tmp_path / f"w{i}") for i in range(2)]
    try:
        assert labs[0].tag != labs[1].tag
        for lab in labs:
            assert lab.tag.startswith(f"nfql{os.getpid()}-")
            assert netns._NAME_RE.match(lab.tag + "gwa")
            assert len(lab.tag + "gwa") < 32
    finally:
        for lab in labs:
            lab.keep = True  # nothing was created; don't touch ip netns without root
            lab.close()


def test_sa_key_sizes_follow_the_algorithm(tmp_path: Path) -> None:
    lc = generate(tmp_path / "cfg", HOST_A, HOST_B, "aes-gcm-256", 1)
    assert {len(sa.key) for sa in lc.sas} == {36}
    lc = generate(tmp_path / "cfg2", HOST_A, HOST_B, "aes-cbc-128+hmac-sha384-192", 1)
    assert {(len(sa.key), len(sa.integrity_key)) for sa in lc.sas} == {(16, 48)}
    assert all(sa.integrity == "hmac-sha384-192" for sa in lc.sas)
    assert labconfig.SPI_BASE[("a", "b")] >= 256


def test_lab_cli_rejects_bad_encryption(capsys: pytest.CaptureFixture[str]) -> None:
    from nfq_ipsec.cli import main

    assert main(["lab", "demo", "--encryption", "3des"]) == 2
    assert "3des" in capsys.readouterr().out



def test_tcp_complete_allows_only_what_sockets_can_still_hold() -> None:
    from nfq_ipsec_lab.lab.traffic import TCP_SNDBUF_MAX, IperfResult

    def tcp(sent: int, received: int, streams: int = 1) -> IperfResult:
        return IperfResult("tcp", 2.0, sent, received, 1.0, streams=streams)

    assert tcp(100_000_000, 91_000_000).tcp_complete  # within 10 %
    assert tcp(27_434_693, 24_320_721).tcp_complete  # 3.1 MB unread: a send buffer's worth
    assert not tcp(27_434_693, 27_434_693 - TCP_SNDBUF_MAX - 1).tcp_complete
    assert not tcp(100_000_000, 80_000_000).tcp_complete
    assert not tcp(1000, 0).tcp_complete
    # Eight connections can each still hold a send buffer (6.66 MB unread out of 54.6 MB).
    assert not tcp(54_568_542, 47_907_561).tcp_complete
    assert tcp(54_568_542, 47_907_561, streams=8).tcp_complete
    assert not tcp(54_568_542, 54_568_542 - 8 * TCP_SNDBUF_MAX - 1, streams=8).tcp_complete
