"""ESP framing (RFC 4303) and IPv4 header handling, checked against independent decoding.

Our outbound packets are taken apart here with ``cryptography`` primitives and ``hmac``
directly (not through our suites), so the wire layout is checked field by field: IPv4 header,
SPI, sequence number, IV, padding 1, 2, 3, ..., pad length, next header, ICV coverage.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from ipaddress import IPv4Address, IPv4Network

import packets
import pytest
import sas
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import checksum

from nfq_ipsec.core import (
    SPD,
    Action,
    DropReason,
    EspError,
    Mode,
    Policy,
    Processor,
    SADirection,
    SecurityAssociation,
    Selector,
    Verdict,
    esp,
)
from nfq_ipsec.core import packet as ip

SRC, DST = "10.0.0.1", "10.0.0.2"
GW_SRC, GW_DST = "192.0.2.1", "192.0.2.2"
SPI = 0x0000ABCD
GCM_KEY = bytes(range(16)) + b"SALT"
CHACHA_KEY = bytes(range(32)) + b"salt"
CBC_KEY = bytes(range(100, 132))
IKEY = bytes(range(200, 232))


def ipv4(
    payload: bytes, proto: int = 17, *, src: str = SRC, dst: str = DST, tos: int = 0,
    ident: int = 77, flags: int = 0, ttl: int = 33, options: bytes = b"",
) -> bytes:
    return packets.ipv4(src, dst, proto, payload, ident, flags, tos=tos, ttl=ttl, options=options)


def udp(payload: bytes, sport: int = 1234, dport: int = 5678) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def out_sa(
    enc: str = "aes-gcm-128", key: bytes = GCM_KEY, mac: str | None = None, ikey: bytes = b"",
    mode: Mode = Mode.TRANSPORT, esn: bool = False, next_seq: int = 1,
) -> SecurityAssociation:
    params = sas.params("out", SPI, SADirection.OUT, enc, key, mac, ikey, mode=mode, local=GW_SRC,
                        remote=GW_DST, esn=esn)
    return SecurityAssociation(params, 0.0, next_seq=next_seq)


def in_sa(
    enc: str = "aes-gcm-128", key: bytes = GCM_KEY, mac: str | None = None, ikey: bytes = b"",
    mode: Mode = Mode.TRANSPORT,
) -> SecurityAssociation:
    return SecurityAssociation(
        sas.params("in", SPI, SADirection.IN, enc, key, mac, ikey, mode=mode), 0.0,
    )


def check_trailer(plaintext: bytes, payload: bytes, next_header: int, align: int) -> None:
    """RFC 4303 2.4-2.6: payload || 1, 2, 3, ... || pad length || next header, aligned."""
    assert plaintext[-1] == next_header
    padlen = plaintext[-2]
    assert plaintext[: len(payload)] == payload
    assert len(plaintext) == len(payload) + padlen + 2
    assert plaintext[len(payload) : len(payload) + padlen] == bytes(range(1, padlen + 1))
    assert len(plaintext) % align == 0
    assert padlen < align  # no more padding than alignment needs (we send no TFC padding)


# --- padding arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize("align", [4, 16])
def test_pad_length_is_minimal_and_aligned(align: int) -> None:
    for n in range(0, 200):
        pad = esp.pad_length(n, align)
        assert 0 <= pad < align and (n + pad + 2) % align == 0


# --- outbound layout, decoded independently -------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 100, 1400])
def test_gcm_transport_layout(size: int) -> None:
    sa = out_sa()
    payload = udp(bytes(range(256)) * (size // 256) + bytes(range(size % 256)))
    pkt = ipv4(payload, options=b"\x94\x04\x00\x00")  # router alert option: kept in transport
    for expected_seq in (1, 2, 3):
        out = esp.encapsulate(sa, pkt, ip.parse_ipv4(pkt))
        hdr, body = out[:24], out[24:]
        # IPv4 header: the same except protocol 50, total length and checksum.
        assert hdr[0] == 0x46 and hdr[9] == 50
        assert int.from_bytes(hdr[2:4], "big") == len(out)
        assert hdr[1] == pkt[1] and hdr[4:9] == pkt[4:9] and hdr[12:24] == pkt[12:24]
        assert checksum(hdr) == 0
        spi, seq = struct.unpack("!II", body[:8])
        assert (spi, seq) == (SPI, expected_seq)
        iv = body[8:16]
        assert iv == expected_seq.to_bytes(8, "big")  # RFC 4106: any unique IV; ours: the counter
        plaintext = AESGCM(GCM_KEY[:16]).decrypt(GCM_KEY[16:] + iv, body[16:], body[:8])
        check_trailer(plaintext, payload, 17, 4)


def test_gcm_esn_wire_carries_low_half_and_aad_has_high_half() -> None:
    seq = (5 << 32) | 0xFFFFFFFF
    sa = out_sa(esn=True, next_seq=seq)
    pkt = ipv4(udp(b"esn"))
    for s in (seq, seq + 1):
        out = esp.encapsulate(sa, pkt, ip.parse_ipv4(pkt))
        body = out[20:]
        assert struct.unpack("!I", body[4:8])[0] == s & 0xFFFFFFFF
        aad = body[:4] + (s >> 32).to_bytes(4, "big") + body[4:8]  # RFC 4106 section 5
        plaintext = AESGCM(GCM_KEY[:16]).decrypt(GCM_KEY[16:] + body[8:16], body[16:], aad)
        check_trailer(plaintext, udp(b"esn"), 17, 4)


def test_chacha_tunnel_layout() -> None:
    sa = out_sa("chacha20-poly1305", CHACHA_KEY, mode=Mode.TUNNEL)
    inner = ipv4(udp(b"tunnelled"), tos=0xB9, ttl=3, flags=0x4000)
    out = esp.encapsulate(sa, inner, ip.parse_ipv4(inner))
    hdr, body = out[:20], out[20:]
    assert hdr[0] == 0x45 and hdr[9] == 50 and int.from_bytes(hdr[2:4], "big") == len(out)
    assert hdr[12:16] == IPv4Address(GW_SRC).packed and hdr[16:20] == IPv4Address(GW_DST).packed
    assert checksum(hdr) == 0
    plaintext = ChaCha20Poly1305(CHACHA_KEY[:32]).decrypt(CHACHA_KEY[32:] + body[8:16], body[16:], body[:8])
    check_trailer(plaintext, inner, 4, 4)  # next header 4: IPv4 in tunnel mode


@pytest.mark.parametrize("mac,digest,icv", [
    ("hmac-sha256-128", hashlib.sha256, 16), ("hmac-sha384-192", hashlib.sha384, 24),
    ("hmac-sha512-256", hashlib.sha512, 32),
])
@pytest.mark.parametrize("esn", [False, True])
def test_cbc_hmac_layout(mac: str, digest: object, icv: int, esn: bool) -> None:
    from nfq_ipsec.core.suites import HMACS
    ikey = bytes(range(HMACS[mac].key_size))
    seq0 = (3 << 32) | 9 if esn else 9
    sa = out_sa("aes-cbc-256", CBC_KEY, mac, ikey, esn=esn, next_seq=seq0)
    ivs = set()
    for n in range(40):
        payload = udp(bytes(n))
        pkt = ipv4(payload)
        out = esp.encapsulate(sa, pkt, ip.parse_ipv4(pkt))
        body = out[20:]
        seq = seq0 + n
        assert struct.unpack("!II", body[:8]) == (SPI, seq & 0xFFFFFFFF)
        iv, ct, tag = body[8:24], body[24:-icv], body[-icv:]
        seq_hi = (seq >> 32).to_bytes(4, "big") if esn else b""
        # RFC 4303 2.8 / 3.3.2.1: ICV over ESP header, IV, ciphertext, then the ESN high half.
        assert tag == hmac.new(ikey, body[:-icv] + seq_hi, digest).digest()[:icv]  # type: ignore[call-overload]
        dec = Cipher(algorithms.AES(CBC_KEY), modes.CBC(iv)).decryptor()
        check_trailer(dec.update(ct) + dec.finalize(), payload, 17, 16)
        assert iv != seq.to_bytes(16, "big")  # RFC 3602: not the predictable counter itself
        ivs.add(iv)
    assert len(ivs) == 40


def test_null_encryption_layout() -> None:
    sa = out_sa("null", b"", "hmac-sha256-128", IKEY)
    payload = udp(b"readable on the wire")
    pkt = ipv4(payload)
    out = esp.encapsulate(sa, pkt, ip.parse_ipv4(pkt))
    body = out[20:]
    check_trailer(body[8:-16], payload, 17, 4)  # RFC 2410: no IV, plaintext in the clear
    assert body[-16:] == hmac.new(IKEY, body[:-16], hashlib.sha256).digest()[:16]


def test_overhead_bounds_actual_growth() -> None:
    for enc, key, mac, ikey in [
        ("aes-gcm-128", GCM_KEY, None, b""), ("aes-cbc-256", CBC_KEY, "hmac-sha512-256", bytes(64)),
        ("null", b"", "hmac-sha256-128", IKEY), ("chacha20-poly1305", CHACHA_KEY, None, b""),
        ("aes-cbc-128", CBC_KEY[:16], "hmac-sha384-192", bytes(48)),
    ]:
        for mode in Mode:
            sa = out_sa(enc, key, mac, ikey, mode=mode)
            growth = set()
            for n in range(64):
                pkt = ipv4(bytes(n))
                growth.add(len(esp.encapsulate(sa, pkt, ip.parse_ipv4(pkt))) - len(pkt))
            assert max(growth) == esp.overhead(sa), (enc, mode)
            assert esp.overhead_for(sa.params) == esp.overhead(sa), (enc, mode)


# --- inbound framing errors -----------------------------------------------------------------


def _seal(sa_out: SecurityAssociation, plaintext: bytes, seq: int) -> bytes:
    esp_header = struct.pack("!II", SPI, seq)
    body = sa_out.suite.seal(esp_header, b"", seq, plaintext)
    return ipv4(esp_header + body, 50, src=GW_SRC, dst=GW_DST)


def test_next_header_must_fit_the_mode() -> None:
    sealer = out_sa()
    inner = ipv4(udp(b"x"))
    # Tunnel SA receiving next header 17.
    wire = _seal(sealer, udp(b"abc") + b"\x01\x02\x03\x03\x11", 1)
    sa = in_sa(mode=Mode.TUNNEL)
    with pytest.raises(EspError) as err:
        esp.decapsulate(wire, ip.parse_ipv4(wire), {SPI: sa}.get, 0.0)
    assert err.value.reason is DropReason.BAD_NEXT_HEADER
    # Transport SA receiving next header 4 (an IPv4 packet).
    pad = esp.pad_length(len(inner), 4)
    wire = _seal(sealer, inner + bytes(range(1, pad + 1)) + bytes((pad, 4)), 1)
    sa = in_sa(mode=Mode.TRANSPORT)
    with pytest.raises(EspError) as err:
        esp.decapsulate(wire, ip.parse_ipv4(wire), {SPI: sa}.get, 0.0)
    assert err.value.reason is DropReason.BAD_NEXT_HEADER


def test_tunnel_inner_packet_is_checked() -> None:
    sealer = out_sa()
    inner = bytearray(ipv4(udp(b"inner")))
    inner[2:4] = (len(inner) + 10).to_bytes(2, "big")  # claims more bytes than it has
    pad = esp.pad_length(len(inner), 4)
    wire = _seal(sealer, bytes(inner) + bytes(range(1, pad + 1)) + bytes((pad, 4)), 1)
    with pytest.raises(EspError) as err:
        esp.decapsulate(wire, ip.parse_ipv4(wire), {SPI: in_sa(mode=Mode.TUNNEL)}.get, 0.0)
    assert err.value.reason is DropReason.MALFORMED


def test_empty_plaintext_is_malformed() -> None:
    wire = _seal(out_sa(), b"", 1)
    with pytest.raises(EspError) as err:
        esp.decapsulate(wire, ip.parse_ipv4(wire), {SPI: in_sa()}.get, 0.0)
    assert err.value.reason in (DropReason.MALFORMED, DropReason.BAD_PADDING)


def test_fragments_are_refused() -> None:
    sa = out_sa()
    for flags in (0x2000, 0x0001, 0x2005):  # MF, offset, both
        frag = ipv4(udp(b"frag"), flags=flags)
        with pytest.raises(EspError) as err:
            esp.encapsulate(sa, frag, ip.parse_ipv4(frag))
        assert err.value.reason is DropReason.FRAGMENT
    # Tunnel mode carries fragments whole (the inner packet is opaque).
    tsa = out_sa(mode=Mode.TUNNEL)
    frag = ipv4(udp(b"frag"), flags=0x2000)
    assert esp.encapsulate(tsa, frag, ip.parse_ipv4(frag))
    # An ESP fragment must be reassembled before ESP processing (RFC 4303 3.4.1).
    good = esp.encapsulate(out_sa(), ipv4(udp(b"x")), ip.parse_ipv4(ipv4(udp(b"x"))))
    frag_esp = bytearray(good)
    frag_esp[6] |= 0x20
    frag_esp[10:12] = b"\0\0"
    frag_esp[10:12] = checksum(bytes(frag_esp[:20])).to_bytes(2, "big")
    with pytest.raises(EspError) as err:
        esp.decapsulate(bytes(frag_esp), ip.parse_ipv4(bytes(frag_esp)), {SPI: in_sa()}.get, 0.0)
    assert err.value.reason is DropReason.FRAGMENT


def test_too_big() -> None:
    sa = out_sa()
    pkt = ipv4(bytes(65535 - 20 - 30))
    with pytest.raises(EspError) as err:
        esp.encapsulate(sa, pkt, ip.parse_ipv4(pkt))
    assert err.value.reason is DropReason.TOO_BIG
    tsa = out_sa(mode=Mode.TUNNEL)
    with pytest.raises(EspError) as err:
        esp.encapsulate(tsa, pkt, ip.parse_ipv4(pkt))
    assert err.value.reason is DropReason.TOO_BIG
    # The largest packet that fits does fit.
    fits = ipv4(bytes(65535 - 20 - esp.overhead(sa)))
    assert len(esp.encapsulate(out_sa(), fits, ip.parse_ipv4(fits))) <= 65535


def test_transport_round_trip_restores_the_packet_byte_for_byte() -> None:
    pkt = ipv4(udp(b"hello"), options=b"\x01\x01\x01\x00", tos=0x10, ident=999, flags=0x4000)
    out = esp.encapsulate(out_sa(), pkt, ip.parse_ipv4(pkt))
    dec = esp.decapsulate(out, ip.parse_ipv4(out), {SPI: in_sa()}.get, 0.0)
    assert dec.packet == pkt
    assert dec.header == ip.parse_ipv4(pkt)


# --- IPv4 header parsing --------------------------------------------------------------------


def test_parse_ipv4_every_prefix_and_trailing_bytes() -> None:
    pkt = ipv4(udp(b"abcdef"), options=b"\x01\x01\x01\x00")
    hdr = ip.parse_ipv4(pkt)
    assert (hdr.ihl, hdr.total_length, hdr.protocol, hdr.ttl) == (24, len(pkt), 17, 33)
    assert (hdr.src, hdr.dst) == (int(IPv4Address(SRC)), int(IPv4Address(DST)))
    for n in range(len(pkt)):
        with pytest.raises(EspError) as err:
            ip.parse_ipv4(pkt[:n])
        assert err.value.reason is DropReason.MALFORMED
    assert ip.parse_ipv4(pkt + b"\0" * 9) == hdr


@pytest.mark.parametrize("mutate,reason", [
    (lambda h: h.__setitem__(0, 0x65), DropReason.NOT_IPV4),
    (lambda h: h.__setitem__(0, 0x44), DropReason.MALFORMED),  # IHL 4 < 5
    (lambda h: h.__setitem__(0, 0x4F), DropReason.MALFORMED),  # IHL 15 > packet
    (lambda h: h.__setitem__(slice(2, 4), b"\x00\x13"), DropReason.MALFORMED),  # total < IHL
    (lambda h: h.__setitem__(slice(2, 4), b"\xff\xff"), DropReason.MALFORMED),  # total > bytes
])
def test_parse_ipv4_rejects(mutate: object, reason: DropReason) -> None:
    pkt = bytearray(ipv4(udp(b"x")))
    mutate(pkt)  # type: ignore[operator]
    with pytest.raises(EspError) as err:
        ip.parse_ipv4(bytes(pkt))
    assert err.value.reason is reason


def test_packet_key_fields() -> None:
    tcp = ipv4(struct.pack("!HH", 40000, 443) + bytes(16), 6)
    key = ip.packet_key(tcp, ip.parse_ipv4(tcp))
    assert key.fields()[2:] == (6, 40000, 443)
    assert (key.protocol, key.sport, key.dport) == (6, 40000, 443)
    icmp = ipv4(bytes((8, 0, 0, 0)), 1)
    assert ip.packet_key(icmp, ip.parse_ipv4(icmp)).fields()[2:] == (1, 8, 0)
    later_fragment = ipv4(struct.pack("!HH", 1, 2) + bytes(4), 17, flags=0x0002)
    assert ip.packet_key(later_fragment, ip.parse_ipv4(later_fragment)).fields()[3:] == (None, None)
    short = ipv4(b"\x01", 17)
    assert ip.packet_key(short, ip.parse_ipv4(short)).fields()[3:] == (None, None)
    other = ipv4(bytes(8), 47)  # GRE: no ports
    assert ip.packet_key(other, ip.parse_ipv4(other)).fields()[3:] == (None, None)


def test_packet_key_and_header_are_values() -> None:
    """The flow caches key on PacketKey: equal fields, equal keys and hashes; any field
    differing, a different key. Headers compare by their fields too."""
    base = (0x0A000001, 0x0A000002, 6, 40000, 443)
    key = ip.PacketKey(*base)
    assert key == ip.PacketKey(*base) and hash(key) == hash(ip.PacketKey(*base))
    assert tuple(key) == base and key.fields() == base
    for i in range(5):
        other: list[int | None] = list(base)
        other[i] = None if i >= 3 else base[i] + 1
        assert key != ip.PacketKey(*other)  # type: ignore[arg-type]
    assert {key: 1}.get(ip.PacketKey(*base)) == 1 and {key: 1}.get(ip.PacketKey(*base[:3], 1, 2)) is None
    assert key != base  # a key is not a tuple
    assert "sport=40000" in repr(key)
    tcp = ipv4(struct.pack("!HH", 40000, 443) + bytes(16), 6)
    hdr = ip.parse_ipv4(tcp)
    assert hdr == ip.parse_ipv4(tcp) and hdr != ip.parse_ipv4(ipv4(bytes(8), 17))
    assert hdr.fields()[0] == 20 and hdr.protocol == 6
    assert "protocol=6" in repr(hdr)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=20, max_size=60).filter(lambda b: len(b) % 2 == 0))
def test_checksum_agrees_with_reference(data: bytes) -> None:
    assert ip.checksum(data) == checksum(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=59).filter(lambda b: len(b) % 2 == 1))
def test_checksum_odd_length(data: bytes) -> None:
    assert ip.checksum(data) == checksum(data)


def test_processor_outbound_bypass_and_discard_do_not_touch_packet() -> None:
    pols = [
        Policy("bypass", Selector(IPv4Network(f"{SRC}/32"), IPv4Network("10.9.0.0/16")), Action.BYPASS),
        Policy("discard", Selector(IPv4Network(f"{SRC}/32"), IPv4Network("10.8.0.0/16")), Action.DISCARD),
    ]
    proc = Processor(SPD(pols), [], 0.0)
    res = proc.outbound(ipv4(b"x", dst="10.9.1.1"), now=0.0)
    assert (res.verdict, res.packet) == (Verdict.ACCEPT, None)
    res = proc.outbound(ipv4(b"x", dst="10.8.1.1"), now=0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.POLICY_DISCARD)


@pytest.mark.parametrize("enc,key,mac,ikey,minimum", [
    ("aes-gcm-128", GCM_KEY, None, b"", 8 + 16),  # IV + ICV (RFC 4106)
    ("chacha20-poly1305", CHACHA_KEY, None, b"", 8 + 16),  # IV + ICV (RFC 7634)
    ("aes-cbc-128", CBC_KEY[:16], "hmac-sha256-128", IKEY, 16 + 16 + 16),  # IV + a block + ICV
    ("null", b"", "hmac-sha256-128", IKEY, 4 + 16),  # trailer aligned to 4 + ICV
])
def test_esp_body_too_short_for_the_suite_is_malformed(
    enc: str, key: bytes, mac: str | None, ikey: bytes, minimum: int,
) -> None:
    from nfq_ipsec.core.suites import make_suite
    suite = make_suite(enc, key, mac, ikey)
    header = struct.pack("!II", SPI, 1)
    for n in range(minimum):
        with pytest.raises(EspError) as err:
            suite.open(header, b"", bytes(n))
        assert err.value.reason is DropReason.MALFORMED, n
    with pytest.raises(EspError) as err:
        suite.open(header, b"", bytes(minimum))
    assert err.value.reason is DropReason.INTEGRITY  # long enough: now the ICV decides
