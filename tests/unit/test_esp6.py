"""ESP for IPv6 (core/esp6.py and the processor's IPv6 path), proven against an independent
implementation: scapy's SecurityAssociation, in both directions, for transport mode (with
extension headers), IPv6 tunnels and mixed tunnels (4-in-6, 6-in-4). Published ESP test
vectors are IPv4 only; scapy is the oracle here, not a model to copy."""

from __future__ import annotations

import random
from ipaddress import ip_network

import pytest
from scapy.layers.inet import ICMP as ICMP4
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.packet import Packet, Raw

from nfq_ipsec.core import (
    SPD,
    Action,
    DropReason,
    Mode,
    Policy,
    Processor,
    SADirection,
    SAParams,
    Secret,
    Selector,
    Verdict,
    ipv6,
)
from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING
from nfq_ipsec.core.suites import ENCRYPTION, HMACS

A6, B6 = "2001:db8:1::1", "2001:db8:2::2"  # inner (or transport) hosts, IPv6
A4, B4 = "10.1.0.1", "10.2.0.2"  # inner hosts, IPv4
GW6_A, GW6_B = "2001:db8:ff::1", "2001:db8:ff::2"  # tunnel endpoints, IPv6
GW4_A, GW4_B = "192.0.2.1", "198.51.100.2"  # tunnel endpoints, IPv4
SPI_OUT, SPI_IN = 0x1001, 0x2002

SCAPY_CRYPT = {"aes-gcm-128": "AES-GCM", "chacha20-poly1305": "CHACHA20-POLY1305",
               "aes-cbc-128": "AES-CBC", "null": "NULL"}
SCAPY_AUTH = {None: None, "hmac-sha256-128": "SHA2-256-128"}
SUITES: list[tuple[str, str | None]] = [
    ("aes-gcm-128", None), ("chacha20-poly1305", None), ("aes-cbc-128", "hmac-sha256-128"),
    ("null", "hmac-sha256-128"),
]


def addr(text: str) -> int:
    net = ip_network(text)
    return int(net.network_address) | (ipv6.V6 if net.version == 6 else 0)


class Pair:
    """Our processor with one outbound and one inbound SA, and scapy's twins of them."""

    def __init__(self, enc: str, mac: str | None, local: str, remote: str,
                 tunnel: tuple[str, str] | None = None, seed: int = 1,
                 ipv6_link: bool = True) -> None:
        rnd = random.Random(seed)
        key = rnd.randbytes(ENCRYPTION[enc].keymat_size)
        ikey = rnd.randbytes(HMACS[mac].key_size) if mac else b""
        mode = Mode.TUNNEL if tunnel else Mode.TRANSPORT
        tl, tr = (addr(tunnel[0]), addr(tunnel[1])) if tunnel else (None, None)
        sas = [
            SAParams("out", SPI_OUT, SADirection.OUT, enc, Secret(key), mac, Secret(ikey), mode,
                     tl, tr),
            SAParams("in", SPI_IN, SADirection.IN, enc, Secret(key), mac, Secret(ikey), mode,
                     tr, tl),
        ]
        sel = Selector(ip_network(local), ip_network(remote))
        policies = [Policy("p", sel, Action.PROTECT, sa_names=("out", "in"))]
        self.proc = Processor(SPD(policies), sas, 0.0, ipv6_link=ipv6_link)

        def header(src: str, dst: str) -> Packet | None:
            if tunnel is None:
                return None
            return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)

        common = {"crypt_algo": SCAPY_CRYPT[enc], "crypt_key": key,
                  "auth_algo": SCAPY_AUTH[mac], "auth_key": ikey or None}
        self.peer_rx = ScapySA(ESP, spi=SPI_OUT, tunnel_header=header(*tunnel) if tunnel else None,
                               **common)
        self.peer_tx = ScapySA(ESP, spi=SPI_IN,
                               tunnel_header=header(tunnel[1], tunnel[0]) if tunnel else None,
                               **common)


def inner6(n: int, src: str = A6, dst: str = B6) -> Packet:
    rnd = random.Random(n)
    payload = rnd.randbytes(rnd.choice([0, 1, 5, 15, 16, 17, 100, 300]))
    l4 = [UDP(sport=1000 + n, dport=53) / Raw(payload),
          ICMPv6EchoRequest(id=n, seq=n, data=payload)][n % 2]
    return IPv6(bytes(IPv6(src=src, dst=dst, tc=rnd.choice([0, 0x28, 0xB8]), fl=n,
                           hlim=rnd.randint(2, 255)) / l4))


def inner4(n: int) -> Packet:
    return IP(bytes(IP(src=A4, dst=B4, id=n, tos=0x28) / UDP(sport=2000 + n, dport=53) / Raw(b"v4" * n)))


@pytest.mark.parametrize(("enc", "mac"), SUITES)
def test_transport_outbound_decrypts_in_scapy(enc: str, mac: str | None) -> None:
    pair = Pair(enc, mac, A6 + "/128", B6 + "/128")
    for n in range(8):
        pkt = inner6(n)
        res = pair.proc.process(bytes(pkt), len(pkt), LEAVING, 0.0)
        assert res.verdict is Verdict.ACCEPT and res.packet is not None, res.detail
        wire = IPv6(res.packet)
        assert wire.nh == 50 and wire[ESP].spi == SPI_OUT and wire[ESP].seq == n + 1
        assert wire.plen == len(res.packet) - 40
        assert bytes(pair.peer_rx.decrypt(wire)) == bytes(pkt)


@pytest.mark.parametrize(("enc", "mac"), SUITES)
def test_transport_inbound_from_scapy(enc: str, mac: str | None) -> None:
    pair = Pair(enc, mac, A6 + "/128", B6 + "/128")
    for n in range(8):
        pkt = inner6(n, src=B6, dst=A6)
        wire = pair.peer_tx.encrypt(pkt, seq_num=n + 1)
        res = pair.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
        assert res.verdict is Verdict.ACCEPT and res.packet is not None, res.detail
        assert res.packet == bytes(pkt)


def test_transport_keeps_the_headers_routers_read_in_front() -> None:
    pair = Pair("aes-gcm-128", None, A6 + "/128", B6 + "/128")
    pkt = IPv6(bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                     / IPv6ExtHdrRouting(addresses=[]) / IPv6ExtHdrDestOpt()
                     / UDP(sport=5, dport=6) / b"payload"))
    res = pair.proc.process(bytes(pkt), len(pkt), LEAVING, 0.0)
    assert res.packet is not None
    wire = IPv6(res.packet)
    routing = wire[IPv6ExtHdrRouting]
    assert wire.nh == 0 and wire[IPv6ExtHdrHopByHop].nh == 60 and routing.nh == 50
    assert bytes(pair.peer_rx.decrypt(wire)) == bytes(pkt)
    # and back: scapy leaves the destination options in front of ESP too (RFC 4303 allows
    # either); we walk hop-by-hop and destination options to ESP, decrypt and rebuild
    back = IPv6(bytes(IPv6(src=B6, dst=A6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                      / UDP(sport=6, dport=5) / b"reply"))
    wire = pair.peer_tx.encrypt(back)
    assert IPv6(bytes(wire))[IPv6ExtHdrDestOpt].nh == 50
    res = pair.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
    assert res.verdict is Verdict.ACCEPT, res.detail
    assert res.packet == bytes(back)


@pytest.mark.parametrize(("enc", "mac"), SUITES)
def test_tunnel_6in6_both_directions(enc: str, mac: str | None) -> None:
    pair = Pair(enc, mac, "2001:db8:1::/48", "2001:db8:2::/48", (GW6_A, GW6_B))
    for n in range(6):
        pkt = inner6(n)
        res = pair.proc.process(bytes(pkt), len(pkt), FORWARDED, 0.0)
        assert res.packet is not None, res.detail
        wire = IPv6(res.packet)
        assert (wire.src, wire.dst, wire.nh, wire.hlim) == (GW6_A, GW6_B, 50, 64)
        assert (wire.tc, wire.fl) == (pkt.tc, pkt.fl)  # traffic class and flow label copied
        assert bytes(pair.peer_rx.decrypt(wire)) == bytes(pkt)
        back = inner6(n + 50, src=B6, dst=A6)
        wire = pair.peer_tx.encrypt(back, seq_num=n + 1)
        res = pair.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
        assert res.verdict is Verdict.ACCEPT, res.detail
        assert res.packet == bytes(back)


def test_tunnel_4in6_both_directions() -> None:
    pair = Pair("aes-gcm-128", None, "10.1.0.0/16", "10.2.0.0/16", (GW6_A, GW6_B))
    for n in range(4):
        pkt = inner4(n)
        res = pair.proc.process(bytes(pkt), len(pkt), FORWARDED, 0.0)
        assert res.packet is not None, res.detail
        assert res.verdict is Verdict.CROSS  # the other family: the shell sends it on its own
        wire = IPv6(res.packet)
        assert (wire.src, wire.dst, wire.nh, wire.tc) == (GW6_A, GW6_B, 50, 0x28)
        inner = pair.peer_rx.decrypt(wire)
        assert bytes(inner) == bytes(pkt)
        back = IP(bytes(IP(src=B4, dst=A4) / UDP(sport=53, dport=2000 + n) / b"x"))
        wire = pair.peer_tx.encrypt(back, seq_num=n + 1)
        res = pair.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
        assert res.verdict is Verdict.CROSS, res.detail
        assert res.packet == bytes(back)


def test_tunnel_6in4_both_directions() -> None:
    pair = Pair("aes-cbc-128", "hmac-sha256-128", "2001:db8:1::/48", "2001:db8:2::/48",
                (GW4_A, GW4_B))
    for n in range(4):
        pkt = inner6(n)
        res = pair.proc.process(bytes(pkt), len(pkt), FORWARDED, 0.0)
        assert res.packet is not None, res.detail
        assert res.verdict is Verdict.CROSS  # the other family: the shell sends it on its own
        wire = IP(res.packet)
        assert (wire.src, wire.dst, wire.proto, wire.flags.DF) == (GW4_A, GW4_B, 50, True)
        assert bytes(pair.peer_rx.decrypt(wire)) == bytes(pkt)
        back = inner6(n + 9, src=B6, dst=A6)
        wire = pair.peer_tx.encrypt(back, seq_num=n + 1)
        res = pair.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
        assert res.verdict is Verdict.CROSS, res.detail
        assert res.packet == bytes(back)


def test_the_other_family_inside_an_sa_is_a_policy_mismatch() -> None:
    """An SA serves one policy of one family: an IPv4 packet inside the IPv6 policy's tunnel
    (and the other way round) is dropped after decryption."""
    six = Pair("aes-gcm-128", None, "::/0", "::/0", (GW6_A, GW6_B))
    wire = six.peer_tx.encrypt(IP(bytes(IP(src=B4, dst=A4) / UDP())))
    res = six.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
    assert res.reason is DropReason.POLICY_MISMATCH
    four = Pair("aes-gcm-128", None, "0.0.0.0/0", "0.0.0.0/0", (GW4_A, GW4_B))
    wire = four.peer_tx.encrypt(IPv6(bytes(IPv6(src=B6, dst=A6) / UDP())))
    res = four.proc.process(bytes(wire), len(wire), ARRIVING, 0.0)
    assert res.reason is DropReason.POLICY_MISMATCH


def test_ipv4_packets_never_match_ipv6_policies() -> None:
    pair = Pair("aes-gcm-128", None, "::/0", "::/0")
    pkt = inner4(1)
    assert pair.proc.process(bytes(pkt), len(pkt), LEAVING, 0.0).reason is DropReason.NO_POLICY
    pkt6 = inner6(1)
    assert pair.proc.process(bytes(pkt6), len(pkt6), LEAVING, 0.0).verdict is Verdict.ACCEPT


def test_neighbour_discovery_passes_unless_turned_off() -> None:
    ns = bytes(IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt="fe80::2"))
    on = Pair("aes-gcm-128", None, A6 + "/128", B6 + "/128")
    for where in (LEAVING, ARRIVING):
        res = on.proc.process(ns, len(ns), where, 0.0)
        assert res.verdict is Verdict.ACCEPT and res.packet is None
    off = Pair("aes-gcm-128", None, A6 + "/128", B6 + "/128", ipv6_link=False)
    for where in (LEAVING, ARRIVING):
        assert off.proc.process(ns, len(ns), where, 0.0).reason is DropReason.NO_POLICY


def test_cleartext_where_protection_applies_is_dropped() -> None:
    pair = Pair("aes-gcm-128", None, A6 + "/128", B6 + "/128")
    pkt = bytes(inner6(3, src=B6, dst=A6))
    assert pair.proc.process(pkt, len(pkt), ARRIVING, 0.0).reason is DropReason.CLEARTEXT_PROTECTED


def test_forwarded_packet_too_big_after_esp_gets_packet_too_big() -> None:
    """Its sender is told, and the packet goes on encrypted: reassembled by the gateway's
    kernel from its sender's fragments, it is fragmented again after ESP; whole, the kernel
    drops it and the sender, told, fragments the next ones."""
    pair = Pair("aes-gcm-128", None, "2001:db8:1::/48", "2001:db8:2::/48", (GW6_A, GW6_B))
    big = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / bytes(1500 - 48))
    res = pair.proc.process(big, len(big), FORWARDED, 0.0)
    assert res.verdict is Verdict.ACCEPT and res.packet is not None and len(res.packet) > 1500
    assert bytes(pair.peer_rx.decrypt(IPv6(res.packet))) == big
    assert res.reply is not None and pair.proc.icmp_replies == 1
    reply = IPv6(res.reply)
    ptb = reply[ICMPv6PacketTooBig]
    assert reply.dst == A6 and reply.plen == len(res.reply) - 40 <= 1280 - 40
    # 1500 less the outer IPv6 header, ESP header, IV, ICV and trailer, within the alignment
    assert 1500 - 40 - 8 - 8 - 16 - 2 - 3 <= ptb.mtu <= 1500 - 40 - 8 - 8 - 16 - 2
    assert bytes(ptb.payload)[:48] == big[:48]
    fits = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / bytes(ptb.mtu - 48))
    res = pair.proc.process(fits, len(fits), FORWARDED, 0.0)
    assert res.verdict is Verdict.ACCEPT and res.packet is not None and len(res.packet) <= 1500
    local = pair.proc.process(big, len(big), LEAVING, 0.0)  # never dropped: see below
    assert local.verdict is Verdict.REPLACE and local.packets


def reassemble6(fragments: list[bytes]) -> bytes:
    """The packet ``fragments`` came from, put together here (RFC 8200 4.5), independently of
    the product's reassembly: the unfragmentable part of the first, the fragment header out."""
    frags = [IPv6(f) for f in fragments]
    body = b""
    for f in sorted(frags, key=lambda f: f[IPv6ExtHdrFragment].offset):
        fh = f[IPv6ExtHdrFragment]
        assert fh.offset * 8 == len(body) and fh.id == frags[0][IPv6ExtHdrFragment].id
        body += bytes(fh.payload)
    assert [f[IPv6ExtHdrFragment].m for f in frags] == [1] * (len(frags) - 1) + [0]
    first = fragments[0]
    unfrag_len = len(first) - len(bytes(frags[0][IPv6ExtHdrFragment]))
    head = bytearray(first[:unfrag_len])
    nh_at = 6 if unfrag_len == 40 else 40  # here: the fixed header, or one hop-by-hop header
    head[nh_at] = frags[0][IPv6ExtHdrFragment].nh
    plen = unfrag_len - 40 + len(body)
    head[4:6] = plen.to_bytes(2, "big")
    return bytes(head) + body


@pytest.mark.parametrize("tunnel", [None, (A6, B6)], ids=["transport", "tunnel"])
@pytest.mark.parametrize("hop_by_hop", [False, True], ids=["plain", "hop-by-hop"])
def test_a_local_packet_too_big_after_esp_leaves_in_fragments(
        tunnel: tuple[str, str] | None, hop_by_hop: bool) -> None:
    """A local IPv6 packet that fits the interface but not after ESP: its ESP packet is sent as
    fragments that fit (RFC 8200 4.5), never handed back whole, which the local kernel would
    drop for a socket with IPV6_DONTFRAG or IPV6_PMTUDISC_DO. Scapy opens the reassembled
    ESP packet; a forwarded one still gets "packet too big" (above)."""
    pair = Pair("aes-gcm-128", None, A6 + "/128", B6 + "/128", tunnel)
    hbh = IPv6ExtHdrHopByHop() if hop_by_hop and tunnel is None else None
    inner = IPv6(src=A6, dst=B6) / (hbh / UDP(sport=7, dport=9) if hbh else UDP(sport=7, dport=9))
    big = bytes(inner / Raw((bytes(range(256)) * 6)[:1500 - len(inner)]))
    assert len(big) == 1500
    res = pair.proc.process(big, len(big), LEAVING, 0.0)
    assert res.verdict is Verdict.REPLACE and res.packet is None and res.sa is not None
    assert res.packets is not None and len(res.packets) == 2
    assert all(len(f) <= 1500 for f in res.packets) and len(res.packets[1]) < 200
    esp = reassemble6(res.packets)
    assert IPv6(esp)[ESP].spi == SPI_OUT and IPv6(esp)[ESP].seq == res.seq == 1
    opened = pair.peer_rx.decrypt(IPv6(esp))
    assert bytes(opened).endswith(big[len(inner) - 8:])  # the UDP header and its payload
    # a packet whose ESP fits is accepted whole, and the next datagram has another identification
    small = bytes(IPv6(src=A6, dst=B6) / UDP(sport=7, dport=9) / bytes(100))
    assert pair.proc.process(small, len(small), LEAVING, 0.0).verdict is Verdict.ACCEPT
    again = pair.proc.process(big, len(big), LEAVING, 0.0)
    assert again.packets is not None
    assert IPv6(again.packets[0])[IPv6ExtHdrFragment].id != IPv6(res.packets[0])[IPv6ExtHdrFragment].id
    assert pair.proc.fragmented6 == 2


def test_mixed_tunnel_packets_are_held_only_for_df() -> None:
    """A mixed tunnel's ESP packet goes in fragments the worker makes (its raw socket never
    fragments): 6-in-4 IPv6 packets pass whatever their size, local or forwarded, and so do
    4-in-6 IPv4 packets without DF; an IPv4 packet with DF that won't fit gets
    "fragmentation needed", local or forwarded (it can't be to the SA's peer itself)."""
    six = Pair("aes-gcm-128", None, "2001:db8:1::/48", "2001:db8:2::/48", (GW4_A, GW4_B))
    big6 = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / bytes(1500 - 48))
    for where in (LEAVING, FORWARDED):
        res = six.proc.process(big6, len(big6), where, 0.0)
        assert res.packet is not None and res.reply is None, res
        assert len(res.packet) > 1500 and res.packet[0] >> 4 == 4
    four = Pair("aes-gcm-128", None, "10.1.0.0/16", "10.2.0.0/16", (GW6_A, GW6_B))
    for where in (LEAVING, FORWARDED):
        big4 = bytes(IP(src=A4, dst=B4, flags="DF") / UDP(sport=1, dport=2) / bytes(1500 - 28))
        res = four.proc.process(big4, len(big4), where, 0.0)
        assert res.verdict is Verdict.DROP and res.reason is DropReason.PATH_MTU, res
        assert res.reply is not None and IP(res.reply).dst == A4
        no_df = bytes(IP(src=A4, dst=B4, flags=0) / UDP(sport=1, dport=2) / bytes(1500 - 28))
        res = four.proc.process(no_df, len(no_df), where, 0.0)
        assert res.packet is not None and len(res.packet) > 1500 and res.packet[0] >> 4 == 6


def test_fragmented_esp_is_dropped_as_fragment() -> None:
    pair = Pair("aes-gcm-128", None, A6 + "/128", B6 + "/128")
    wire = bytes(pair.peer_tx.encrypt(inner6(2, src=B6, dst=A6)))
    frag = bytes(IPv6(src=B6, dst=A6) / IPv6ExtHdrFragment(nh=50, m=1, id=7) / Raw(wire[40:]))
    assert pair.proc.process(frag, len(frag), ARRIVING, 0.0).reason is DropReason.FRAGMENT


def test_icmpv4_still_works_beside_ipv6_policies() -> None:
    """The IPv4 path is untouched by IPv6 policies in the same SPD."""
    v4 = Policy("v4", Selector(ip_network("0.0.0.0/0"), ip_network("0.0.0.0/0")), Action.BYPASS)
    v6 = Policy("v6", Selector(ip_network("::/0"), ip_network("::/0")), Action.DISCARD)
    proc = Processor(SPD([v6, v4]), [], 0.0)
    ping = bytes(IP(src=A4, dst=B4) / ICMP4())
    assert proc.process(ping, len(ping), LEAVING, 0.0).verdict is Verdict.ACCEPT
    ping6 = bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest())
    assert proc.process(ping6, len(ping6), LEAVING, 0.0).reason is DropReason.POLICY_DISCARD
