"""Property tests (hypothesis) for the processor and ESP framing.

- Round trip: any inner IPv4 packet, any suite, both modes, with and without ESN, comes out
  of the peer exactly as it went in.
- Any single flipped bit in the ESP part is rejected: SPI bits as an unknown SPI, sequence
  number bits as a replay or an integrity failure, every other bit as an integrity failure;
  and a rejected packet leaves the replay window as it was.
- Random bytes, structured garbage and truncations only ever give a DROP result: the
  processor never raises.
"""

from __future__ import annotations

import struct
from functools import cache

import sas
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from packets import checksum, ip4

from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
    DropReason,
    Mode,
    Policy,
    Processor,
    Result,
    SADirection,
    SAParams,
    SecurityAssociation,
    Selector,
    Verdict,
)
from nfq_ipsec.core.suites import ENCRYPTION, HMACS

SUITES: list[tuple[str, str | None]] = [
    ("aes-gcm-128", None), ("aes-gcm-256", None), ("chacha20-poly1305", None),
    ("aes-cbc-128", "hmac-sha256-128"), ("aes-cbc-256", "hmac-sha384-192"),
    ("aes-cbc-128", "hmac-sha512-256"), ("null", "hmac-sha256-128"), ("null", "hmac-sha512-256"),
]
A, B = "10.0.0.1", "10.0.0.2"
GW_A, GW_B = "192.0.2.1", "192.0.2.2"
SPI_AB, SPI_BA = 0x0A0B, 0x0B0A
PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def inner_packets(draw: st.DrawFn, src: str = A, dst: str = B) -> bytes:
    proto = draw(st.sampled_from([1, 6, 17, 47, 132, 58, 255]))
    payload = draw(st.binary(max_size=300))
    options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00" * 2]))
    tos = draw(st.integers(0, 255))
    ttl = draw(st.integers(1, 255))
    ident = draw(st.integers(0, 0xFFFF))
    df = draw(st.booleans())
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack(
        "!BBHHHBBHII", 0x40 | ihl, tos, ihl * 4 + len(payload), ident, 0x4000 if df else 0, ttl,
        proto, 0, ip4(src), ip4(dst),
    ) + options)
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


def _keys(enc: str, mac: str | None) -> tuple[bytes, bytes]:
    key = bytes((i * 31 + 7) & 0xFF for i in range(ENCRYPTION[enc].keymat_size))
    ikey = bytes((i * 17 + 1) & 0xFF for i in range(HMACS[mac].key_size)) if mac else b""
    return key, ikey


def pair(enc: str, mac: str | None, mode: Mode, esn: bool, first: int = 1) -> tuple[Processor, Processor]:
    """Host A and host B with mirrored SAs (A->B on SPI_AB, B->A on SPI_BA)."""
    key, ikey = _keys(enc, mac)

    def params(name: str, spi: int, direction: SADirection, local: str, remote: str) -> SAParams:
        return sas.params(name, spi, direction, enc, key, mac, ikey, mode=mode, esn=esn, local=local,
                          remote=remote)

    def host(me: str, peer: str, gw_me: str, gw_peer: str, out_spi: int, in_spi: int) -> Processor:
        out_params = params("out", out_spi, SADirection.OUT, gw_me, gw_peer)
        out = SecurityAssociation(out_params, 0.0, next_seq=first)
        inn = SecurityAssociation(params("in", in_spi, SADirection.IN, gw_me, gw_peer), 0.0)
        if first > 1:
            inn.replay.update(first - 1)
        pol = Policy("p", Selector(), Action.PROTECT, Direction.BOTH, ("out", "in"))
        return Processor(SPD([pol]), [out, inn], 0.0)

    return host(A, B, GW_A, GW_B, SPI_AB, SPI_BA), host(B, A, GW_B, GW_A, SPI_BA, SPI_AB)


suite_cases = st.tuples(
    st.sampled_from(SUITES), st.sampled_from(list(Mode)), st.booleans(),
    st.sampled_from([1, 1000, 0xFFFFFFF0, (1 << 32) - 1, (9 << 32) | 0xFFFFFFFE]),
)


@PROPS
@given(suite_cases, st.lists(inner_packets(), min_size=1, max_size=4))
def test_round_trip(case: tuple[tuple[str, str | None], Mode, bool, int], packets: list[bytes]) -> None:
    (enc, mac), mode, esn, first = case
    assume(esn or first + len(packets) <= 0xFFFFFFFF + 1)
    a, b = pair(enc, mac, mode, esn, first)
    for n, pkt in enumerate(packets):
        sent = a.outbound(pkt, now=0.0)
        assert sent.verdict is Verdict.ACCEPT and sent.packet is not None, sent
        assert sent.seq == first + n
        got = b.inbound(sent.packet, now=0.0)
        assert got.verdict is Verdict.ACCEPT, got
        assert got.packet == pkt
        assert got.seq == first + n


@PROPS
@given(suite_cases, inner_packets(), st.data())
def test_any_flipped_bit_is_rejected(
    case: tuple[tuple[str, str | None], Mode, bool, int], pkt: bytes, data: st.DataObject,
) -> None:
    (enc, mac), mode, esn, first = case
    assume(esn or first <= 0xFFFFFFFF)
    a, b = pair(enc, mac, mode, esn, first)
    wire = a.outbound(pkt, now=0.0).packet
    assert wire is not None
    ihl = (wire[0] & 0x0F) * 4
    bits = data.draw(st.lists(st.integers(ihl * 8, len(wire) * 8 - 1), min_size=1, max_size=8, unique=True))
    for bit in bits:
        bad = bytearray(wire)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        res = b.inbound(bytes(bad), now=0.0)
        assert res.verdict is Verdict.DROP, (bit, res)
        offset = bit // 8 - ihl
        if offset < 4:
            assert res.reason is DropReason.UNKNOWN_SPI, (bit, res)
        elif offset < 8:
            assert res.reason in (DropReason.REPLAY, DropReason.INTEGRITY), (bit, res)
        else:
            assert res.reason is DropReason.INTEGRITY, (bit, res)
    # Nothing rejected moved the window: the genuine packet still goes through.
    res = b.inbound(wire, now=0.0)
    assert res.verdict is Verdict.ACCEPT and res.packet == pkt, res


def _never_raises(result: object) -> Result:
    assert isinstance(result, Result)
    if result.verdict is Verdict.DROP:
        assert result.reason is not None and result.packet is None
    return result


@cache
def fuzz_target() -> Processor:
    return pair("aes-gcm-128", None, Mode.TUNNEL, False)[1]


@PROPS
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    proc = fuzz_target()
    inbound = _never_raises(proc.inbound(data, now=0.0))
    assert inbound.verdict is Verdict.DROP  # nothing random is a valid ESP packet or cleartext
    _never_raises(proc.outbound(data, now=0.0))


@st.composite
def esp_garbage(draw: st.DrawFn) -> bytes:
    """A well-formed IPv4 header, protocol ESP, a known or unknown SPI, random rest."""
    spi = draw(st.sampled_from([SPI_AB, SPI_BA, 0, 1, 0xFFFFFFFF]))
    seq = draw(st.integers(0, 0xFFFFFFFF))
    body = draw(st.binary(max_size=120))
    esp_part = struct.pack("!II", spi, seq) + body
    cut = draw(st.integers(0, len(esp_part)))
    esp_part = esp_part[:cut]
    flags = draw(st.sampled_from([0, 0x4000, 0x2000, 0x0003]))
    hdr = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(esp_part), 1, flags, 64, 50, 0,
                                ip4(GW_A), ip4(GW_B)))
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + esp_part


@PROPS
@given(esp_garbage())
def test_structured_esp_garbage_is_dropped(wire: bytes) -> None:
    res = _never_raises(fuzz_target().inbound(wire, now=0.0))
    assert res.verdict is Verdict.DROP
    assert res.reason in (
        DropReason.MALFORMED, DropReason.INTEGRITY, DropReason.REPLAY, DropReason.UNKNOWN_SPI,
        DropReason.FRAGMENT,
    ), res


@PROPS
@given(st.sampled_from(SUITES), st.sampled_from(list(Mode)), inner_packets(), st.data())
def test_truncated_esp_is_dropped(
    suite: tuple[str, str | None], mode: Mode, pkt: bytes, data: st.DataObject,
) -> None:
    enc, mac = suite
    a, b = pair(enc, mac, mode, False)
    wire = a.outbound(pkt, now=0.0).packet
    assert wire is not None
    n = data.draw(st.integers(0, len(wire) - 1))
    assert _never_raises(b.inbound(wire[:n], now=0.0)).verdict is Verdict.DROP
    if n >= 20:  # the same cut with the IPv4 length made consistent
        hdr = bytearray(wire[:20])
        hdr[2:4] = n.to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
        res = _never_raises(b.inbound(bytes(hdr) + wire[20:n], now=0.0))
        assert res.reason in (DropReason.MALFORMED, DropReason.INTEGRITY), res
    assert b.inbound(wire, now=0.0).packet == pkt


@PROPS
@given(inner_packets(src=B, dst=A), st.sampled_from(list(Mode)))
def test_cleartext_from_a_protected_peer_is_dropped(pkt: bytes, mode: Mode) -> None:
    b_side = pair("aes-gcm-128", None, mode, False)[0]  # host A receiving cleartext from B
    res = _never_raises(b_side.inbound(pkt, now=0.0))
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.CLEARTEXT_PROTECTED)
