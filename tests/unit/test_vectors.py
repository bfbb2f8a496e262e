"""Published test vectors through the ESP core, each with its source in
nfq_ipsec/engines/vectors/ (the engines' known-answer tests run them too).

- RFC 7634 Appendix A: ChaCha20-Poly1305 tunnel-mode ESP packet, byte for byte both ways.
- draft-mcgrew-gcm-test-01 section 4: AES-GCM ESP packets (128/192/256-bit keys, 32-bit and
  extended sequence numbers), decapsulated and re-encapsulated byte for byte.
- RFC 4868 section 2.7.2: HMAC-SHA-256-128 / 384-192 / 512-256 through the suites' ICV.
- RFC 3602 section 4 cases 5 and 7: AES-CBC ESP packets (encryption only, see the file).

The vectors' IVs are not our IVs (we derive the IV from the sequence number), so the
byte-for-byte encapsulation tests swap in the vector's IV with test-only wrappers below;
everything else (SPI, sequence number, AAD, padding, trailer, key/salt split, headers) is the
production code path.

Every vector packet also goes through the parser checks every codec gets: the whole
packet, every truncated prefix (only a DROP result, never an exception) and trailing bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
import sas
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from packets import checksum, ipv4
from vectorfiles import Vector, load_vectors

from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
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
from nfq_ipsec.core.suites import AeadSuite, CbcHmacSuite, Suite, make_suite, suite_problems

# --------------------------------------------------------------------------------------------
# Independent IPv4 helpers (not the core's).


def ipv4_header(
    src: str, dst: str, proto: int, payload_len: int, *, tos: int = 0, ident: int = 0x1234,
    flags: int = 0, ttl: int = 64,
) -> bytes:
    return ipv4(src, dst, proto, b"", ident, flags, 20 + payload_len, tos=tos, ttl=ttl)


def patch_length(header: bytes, total: int) -> bytes:
    """The same IPv4 header with a new total length and a correct checksum."""
    hdr = bytearray(header)
    hdr[2:4] = total.to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr)


# --------------------------------------------------------------------------------------------
# Test-only IV overrides. Production derives IVs from the sequence number; vectors don't.


class FixedIvAead:
    """Test-only: an AEAD suite that sends the vector's IV instead of the sequence number.

    ``AeadSuite.seal`` uses its ``seq`` argument only as the explicit IV (the AAD comes from
    the ESP header, which ``esp.encapsulate`` builds from the real sequence number).
    """

    def __init__(self, inner: AeadSuite, iv: bytes) -> None:
        self.inner = inner
        self.iv = int.from_bytes(iv, "big")
        self.name = inner.name
        self.iv_size = inner.iv_size
        self.icv_size = inner.icv_size
        self.align = inner.align

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        return self.inner.seal(esp_header, seq_hi, self.iv, plaintext)

    def open(self, esp_header: bytes | memoryview, seq_hi: bytes, body: bytes | memoryview) -> bytes:
        return self.inner.open(esp_header, seq_hi, body)


class _FixedIvMaker:
    """Test-only stand-in for CbcHmacSuite's IV generator (AES_K(counter) in production)."""

    def __init__(self, iv: bytes) -> None:
        self.iv = iv

    def update(self, _counter: bytes) -> bytes:
        return self.iv


def transport_policy(local: str, remote: str, sa_name: str) -> Policy:
    return Policy(
        "p", Selector(IPv4Network(local), IPv4Network(remote)), Action.PROTECT, Direction.BOTH,
        (sa_name,),
    )


# ============================================================================================
# RFC 7634 Appendix A (ChaCha20-Poly1305)

RFC7634 = load_vectors("rfc7634-appendix-a.txt", "key")[0]
R7634_OUTER_SRC, R7634_OUTER_DST = "203.0.113.153", "192.0.2.1"  # ours: the RFC shows no outer header


def rfc7634_inbound() -> tuple[SecurityAssociation, Processor]:
    params = sas.params(
        "in", int(RFC7634["spi"], 16), SADirection.IN, "chacha20-poly1305",
        RFC7634.hex("key") + RFC7634.hex("salt"), mode=Mode.TUNNEL,
    )
    sa = SecurityAssociation(params, 0.0)
    # Inbound view: the source packet travels 198.51.100.5 -> 192.0.2.5.
    proc = Processor(SPD([transport_policy("192.0.2.5/32", "198.51.100.5/32", "in")]), [sa], 0.0)
    return sa, proc


def rfc7634_wire() -> bytes:
    packet = RFC7634.hex("packet")
    return ipv4_header(R7634_OUTER_SRC, R7634_OUTER_DST, 50, len(packet)) + packet


def test_rfc7634_transcription() -> None:
    packet = RFC7634.hex("packet")
    assert packet[:4] == RFC7634.hex("spi")
    assert packet[4:8] == RFC7634.hex("seq")
    assert packet[8:16] == RFC7634.hex("iv")
    assert RFC7634.hex("plaintext").startswith(RFC7634.hex("source"))


def test_rfc7634_suite_open_and_seal() -> None:
    suite = make_suite("chacha20-poly1305", RFC7634.hex("key") + RFC7634.hex("salt"), None, b"")
    packet = RFC7634.hex("packet")
    assert suite.open(packet[:8], b"", packet[8:]) == RFC7634.hex("plaintext")
    iv = int.from_bytes(RFC7634.hex("iv"), "big")
    assert suite.seal(packet[:8], b"", iv, RFC7634.hex("plaintext")) == packet[8:]


def test_rfc7634_decapsulate_full_packet() -> None:
    sa, proc = rfc7634_inbound()
    res = proc.inbound(rfc7634_wire(), now=0.0)
    assert res.verdict is Verdict.ACCEPT, res
    assert res.packet == RFC7634.hex("source")
    assert res.seq == 5 and res.sa is sa
    # The same packet again is a replay.
    again = proc.inbound(rfc7634_wire(), now=0.0)
    assert (again.verdict, again.reason) == (Verdict.DROP, DropReason.REPLAY)


def test_rfc7634_encapsulate_byte_for_byte() -> None:
    params = sas.params(
        "out", int(RFC7634["spi"], 16), SADirection.OUT, "chacha20-poly1305",
        RFC7634.hex("key") + RFC7634.hex("salt"), mode=Mode.TUNNEL,
        local=R7634_OUTER_SRC, remote=R7634_OUTER_DST,
    )
    real = make_suite("chacha20-poly1305", RFC7634.hex("key") + RFC7634.hex("salt"), None, b"")
    assert isinstance(real, AeadSuite)
    sa = SecurityAssociation(params, 0.0, next_seq=5, suite=FixedIvAead(real, RFC7634.hex("iv")))  # type: ignore[arg-type]
    source = RFC7634.hex("source")
    out = esp.encapsulate(sa, source, ip.parse_ipv4(source))
    assert out[20:] == RFC7634.hex("packet")
    outer = out[:20]
    assert outer[9] == 50 and int.from_bytes(outer[2:4], "big") == len(out)
    assert outer[12:16] == IPv4Address(R7634_OUTER_SRC).packed
    assert outer[16:20] == IPv4Address(R7634_OUTER_DST).packed
    assert checksum(outer) == 0


# ============================================================================================
# draft-mcgrew-gcm-test-01 (AES-GCM ESP)

MCGREW = load_vectors("draft-mcgrew-gcm-test-01.txt", "algorithm")
GCM_CASES = [(i + 1, v) for i, v in enumerate(MCGREW) if v["algorithm"] == "AES-GCM-ESP"]
MC_SRC, MC_DST = "192.0.2.10", "192.0.2.20"  # ours: the draft prints the ESP part only


def test_mcgrew_file_has_all_cases() -> None:
    assert len(MCGREW) == 17
    assert [v["algorithm"] for v in MCGREW].count("AES-GCM-ESP") == 16


def test_mcgrew_gmac_case_is_not_offered() -> None:
    # Case 15 is ENCR_NULL_AUTH_AES_GMAC (RFC 4543), which this data plane doesn't offer.
    assert MCGREW[14]["algorithm"] == "AES-GMAC-ESP"
    assert suite_problems("aes-gmac", None)


def gcm_suite(v: Vector) -> AeadSuite:
    keymat = v.hex("key") + v.hex("nonce")[:4]
    if len(v.hex("key")) == 24:
        # AES-192-GCM is not configurable here (RFC 8221 names 128 and 256); the framing
        # doesn't care, so the vector runs through AeadSuite with a 192-bit AESGCM.
        return AeadSuite("aes-gcm-192", AESGCM(v.hex("key")), v.hex("nonce")[:4])
    name = {16: "aes-gcm-128", 32: "aes-gcm-256"}[len(v.hex("key"))]
    suite = make_suite(name, keymat, None, b"")
    assert isinstance(suite, AeadSuite)
    return suite


def gcm_seq(v: Vector) -> tuple[int, bool]:
    seq = v.hex("seq")
    return int.from_bytes(seq, "big"), len(seq) == 8


def gcm_inbound_sa(v: Vector) -> SecurityAssociation:
    seq, esn = gcm_seq(v)
    params = sas.params("in", int(v["spi"], 16), SADirection.IN, "aes-gcm-128", bytes(20), esn=esn)
    sa = SecurityAssociation(params, 0.0, suite=gcm_suite(v))
    if seq > 1:
        # The receiver has seen the previous packet: with ESN this puts the window where
        # RFC 4303 Appendix A2.2 infers the vector's high-order bits.
        sa.replay.update(seq - 1)
    return sa


def gcm_payload(v: Vector) -> tuple[bytes, int]:
    """RestOfPayloadData and Next Header, taken apart by hand from the vector plaintext."""
    plaintext = v.hex("plaintext")
    padlen, next_header = plaintext[-2], plaintext[-1]
    assert plaintext[-2 - padlen : -2] == bytes(range(1, padlen + 1))
    return plaintext[: len(plaintext) - 2 - padlen], next_header


def gcm_wire(v: Vector) -> bytes:
    packet = v.hex("packet")
    return ipv4_header(MC_SRC, MC_DST, 50, len(packet)) + packet


def gcm_expected(v: Vector) -> bytes:
    payload, next_header = gcm_payload(v)
    return ipv4_header(MC_SRC, MC_DST, next_header, len(payload)) + payload


gcm_ids = [f"case{n:02d}-{len(v.hex('key')) * 8}-{'esn' if len(v.hex('seq')) == 8 else 'seq32'}"
           for n, v in GCM_CASES]


@pytest.mark.parametrize("v", [v for _, v in GCM_CASES], ids=gcm_ids)
def test_mcgrew_transcription(v: Vector) -> None:
    seq = v.hex("seq")
    assert v.hex("aad") == v.hex("spi") + seq
    assert v.hex("packet") == v.hex("spi") + seq[-4:] + v.hex("nonce")[4:] + v.hex("ctext+tag")


@pytest.mark.parametrize("v", [v for _, v in GCM_CASES], ids=gcm_ids)
def test_mcgrew_suite_open(v: Vector) -> None:
    seq, esn = gcm_seq(v)
    seq_hi = (seq >> 32).to_bytes(4, "big") if esn else b""
    packet = v.hex("packet")
    assert gcm_suite(v).open(packet[:8], seq_hi, packet[8:]) == v.hex("plaintext")
    # the suite takes any buffer (the worker passes bytes, the fast path; other callers may not)
    view = memoryview(packet)
    assert gcm_suite(v).open(view[:8], seq_hi, view[8:]) == v.hex("plaintext")
    assert gcm_suite(v).open(packet[:8], seq_hi, bytearray(packet[8:])) == v.hex("plaintext")


@pytest.mark.parametrize("v", [v for _, v in GCM_CASES], ids=gcm_ids)
def test_mcgrew_decapsulate(v: Vector) -> None:
    sa = gcm_inbound_sa(v)
    wire = gcm_wire(v)
    dec = esp.decapsulate(wire, ip.parse_ipv4(wire), {sa.spi: sa}.get, 0.0)
    assert dec.seq == gcm_seq(v)[0]
    assert dec.packet == gcm_expected(v)


@pytest.mark.parametrize("v", [v for _, v in GCM_CASES], ids=gcm_ids)
def test_mcgrew_encapsulate_byte_for_byte(v: Vector) -> None:
    seq, esn = gcm_seq(v)
    params = sas.params("out", int(v["spi"], 16), SADirection.OUT, "aes-gcm-128", bytes(20), esn=esn)
    sa = SecurityAssociation(params, 0.0, next_seq=seq,
                             suite=FixedIvAead(gcm_suite(v), v.hex("nonce")[4:]))  # type: ignore[arg-type]
    inner = gcm_expected(v)
    out = esp.encapsulate(sa, inner, ip.parse_ipv4(inner))
    assert out == gcm_wire(v)


# ============================================================================================
# RFC 4868 HMAC-SHA-2 authenticators through the suites' truncated ICV

RFC4868 = load_vectors("rfc4868-auth.txt", "case")
INTEGRITY = {"sha256": "hmac-sha256-128", "sha384": "hmac-sha384-192", "sha512": "hmac-sha512-256"}
hmac_ids = [v["case"] for v in RFC4868]


def test_rfc4868_file_has_all_cases() -> None:
    assert [v["case"] for v in RFC4868] == [f"AUTH{n}-{i}" for n in (256, 384, 512) for i in range(1, 5)]


@pytest.mark.parametrize("v", RFC4868, ids=hmac_ids)
def test_rfc4868_transcription(v: Vector) -> None:
    full = hmac.new(v.hex("key"), v.hex("data"), getattr(hashlib, v["digest"])).digest()
    assert full == v.hex("prf")
    assert full[: len(v.hex("auth"))] == v.hex("auth")


@pytest.mark.parametrize("v", RFC4868, ids=hmac_ids)
def test_rfc4868_icv_of_null_suite(v: Vector) -> None:
    # ENCR_NULL + HMAC: ICV = HMAC(header || payload || seq_hi) truncated (RFC 4303 2.8).
    suite = make_suite("null", b"", INTEGRITY[v["digest"]], v.hex("key"))
    data, auth = v.hex("data"), v.hex("auth")
    assert suite.icv_size == len(auth)
    assert suite.seal(data[:8], b"", 1, data[8:]) == data[8:] + auth
    if len(data) >= 12:
        # With ESN the high 32 bits go after the payload, outside the packet (RFC 4303 2.2.1).
        assert suite.seal(data[:8], data[-4:], 1, data[8:-4]) == data[8:-4] + auth
    if len(data) >= 12:
        assert suite.open(data[:8], b"", data[8:] + auth) == data[8:]
        for bit in range(len(auth) * 8):
            bad = bytearray(auth)
            bad[bit // 8] ^= 0x80 >> (bit % 8)
            with pytest.raises(EspError) as err:
                suite.open(data[:8], b"", data[8:] + bytes(bad))
            assert err.value.reason is DropReason.INTEGRITY


@pytest.mark.parametrize("v", [v for v in RFC4868 if len(v.hex("data")) == 50],
                         ids=[v["case"] for v in RFC4868 if len(v.hex("data")) == 50])
def test_rfc4868_icv_of_cbc_suite(v: Vector) -> None:
    # The CBC suite verifies the ICV before it looks at the ciphertext: with the vector's ICV
    # it gets past the check and stops at the block length (42 bytes is not IV + blocks);
    # with a wrong ICV it stops at the check.
    suite = make_suite("aes-cbc-128", bytes(16), INTEGRITY[v["digest"]], v.hex("key"))
    data, auth = v.hex("data"), v.hex("auth")
    with pytest.raises(EspError) as err:
        suite.open(data[:8], b"", data[8:] + auth)
    assert err.value.reason is DropReason.MALFORMED
    with pytest.raises(EspError) as err:
        suite.open(data[:8], b"", data[8:] + bytes(len(auth)))
    assert err.value.reason is DropReason.INTEGRITY


# ============================================================================================
# RFC 3602 AES-CBC ESP packets (cases 5 and 7)

RFC3602 = load_vectors("rfc3602-esp.txt", "case")
CBC_IKEY = bytes(range(0x40, 0x60))  # ours: RFC 3602 packets carry no ICV


def cbc_icv(esp_part: bytes) -> bytes:
    return hmac.new(CBC_IKEY, esp_part, hashlib.sha256).digest()[:16]


def cbc_mode(v: Vector) -> Mode:
    return Mode.TUNNEL if v["mode"] == "tunnel" else Mode.TRANSPORT


def cbc_sa(v: Vector, direction: SADirection, next_seq: int = 1) -> SecurityAssociation:
    outer = v.hex("outer")
    params = sas.params(
        "in" if direction is SADirection.IN else "out", int(v["spi"], 16), direction, "aes-cbc-128",
        v.hex("key"), "hmac-sha256-128", CBC_IKEY, mode=cbc_mode(v),
        local=str(IPv4Address(outer[12:16])), remote=str(IPv4Address(outer[16:20])),
    )
    return SecurityAssociation(params, 0.0, next_seq=next_seq)


def cbc_wire(v: Vector) -> bytes:
    esp_part = v.hex("esp")
    esp_part += cbc_icv(esp_part)
    return patch_length(v.hex("outer"), 20 + len(esp_part)) + esp_part


def cbc_processor(v: Vector) -> Processor:
    original = v.hex("original")
    src, dst = IPv4Address(original[12:16]), IPv4Address(original[16:20])
    pol = transport_policy(f"{dst}/32", f"{src}/32", "in")
    return Processor(SPD([pol]), [cbc_sa(v, SADirection.IN)], 0.0)


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_transcription(v: Vector) -> None:
    esp_part = v.hex("esp")
    assert esp_part[:4] == v.hex("spi") and esp_part[4:8] == v.hex("seq")
    assert esp_part[8:24] == v.hex("iv")
    assert int.from_bytes(v.hex("outer")[2:4], "big") == 20 + len(esp_part)
    payload = v.hex("original") if cbc_mode(v) is Mode.TUNNEL else v.hex("original")[20:]
    assert v.hex("plaintext").startswith(payload)


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_suite_decrypts_vector(v: Vector) -> None:
    suite = make_suite("aes-cbc-128", v.hex("key"), "hmac-sha256-128", CBC_IKEY)
    esp_part = v.hex("esp")
    assert suite.open(esp_part[:8], b"", esp_part[8:] + cbc_icv(esp_part)) == v.hex("plaintext")


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_decapsulate(v: Vector) -> None:
    res = cbc_processor(v).inbound(cbc_wire(v), now=0.0)
    assert res.verdict is Verdict.ACCEPT, res
    # Transport: the original packet, header rewritten back byte for byte; tunnel: the inner.
    assert res.packet == v.hex("original")


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_encapsulate_byte_for_byte(v: Vector) -> None:
    sa = cbc_sa(v, SADirection.OUT, next_seq=int(v["seq"], 16))
    assert isinstance(sa.suite, CbcHmacSuite)
    sa.suite._iv_maker = _FixedIvMaker(v.hex("iv"))  # type: ignore[assignment]  # test-only
    original = v.hex("original")
    out = esp.encapsulate(sa, original, ip.parse_ipv4(original))
    esp_part = v.hex("esp")
    assert out[20:-16] == esp_part
    assert out[-16:] == cbc_icv(esp_part)
    expected_outer = patch_length(v.hex("outer"), len(out))
    if cbc_mode(v) is Mode.TRANSPORT:
        assert out[:20] == expected_outer
    else:
        # Tunnel: our identification field is our own choice; everything else must match.
        assert out[:4] == expected_outer[:4] and out[6:10] == expected_outer[6:10]
        assert out[12:20] == expected_outer[12:20] and checksum(out[:20]) == 0


# ============================================================================================
# Parser checks on every vector packet: whole, every truncated prefix, trailing bytes.


@dataclass
class WireCase:
    name: str
    processor: Callable[[], Processor]
    wire: bytes
    expected: bytes


def _gcm_processor(v: Vector) -> Callable[[], Processor]:
    def make() -> Processor:
        pol = transport_policy(f"{MC_DST}/32", f"{MC_SRC}/32", "in")
        return Processor(SPD([pol]), [gcm_inbound_sa(v)], 0.0)
    return make


def _cbc_processor(v: Vector) -> Callable[[], Processor]:
    return lambda: cbc_processor(v)


WIRE_CASES = [
    WireCase("rfc7634", lambda: rfc7634_inbound()[1], rfc7634_wire(), RFC7634.hex("source")),
    *(WireCase(f"mcgrew-{name}", _gcm_processor(v), gcm_wire(v), gcm_expected(v))
      for name, (_, v) in zip(gcm_ids, GCM_CASES, strict=True)),
    *(WireCase(f"rfc3602-case{v['case']}", _cbc_processor(v), cbc_wire(v), v.hex("original"))
      for v in RFC3602),
]


@pytest.mark.parametrize("case", WIRE_CASES, ids=[c.name for c in WIRE_CASES])
def test_vector_packet_whole_prefixes_and_trailing_bytes(case: WireCase) -> None:
    proc = case.processor()
    # Every truncated prefix: a DROP result with a reason, never an exception. The IPv4 total
    # length now exceeds the bytes present, which the core must notice before anything else.
    for n in range(len(case.wire)):
        res = proc.inbound(case.wire[:n], now=0.0)
        assert res.verdict is Verdict.DROP and res.reason is not None, (n, res)
        assert res.reason in (DropReason.MALFORMED, DropReason.NOT_IPV4), (n, res)
    # Consistent prefixes (total length patched to match): the ESP part is short, so only
    # MALFORMED or INTEGRITY; esp.decapsulate raises nothing but EspError.
    sa = next(iter(proc.sad.all()))
    for n in range(20, len(case.wire)):
        cut = patch_length(case.wire[:20], n) + case.wire[20:n]
        res = proc.inbound(cut, now=0.0)
        assert res.verdict is Verdict.DROP, (n, res)
        assert res.reason in (DropReason.MALFORMED, DropReason.INTEGRITY), (n, res)
        with pytest.raises(EspError):
            esp.decapsulate(cut, ip.parse_ipv4(cut), {sa.spi: sa}.get, 0.0)
    # None of that moved the replay window: the whole packet is still accepted, once.
    res = proc.inbound(case.wire, now=0.0)
    assert res.verdict is Verdict.ACCEPT and res.packet == case.expected, res
    assert proc.inbound(case.wire, now=0.0).reason is DropReason.REPLAY
    # Trailing bytes after the IPv4 total length are ignored.
    for tail in (b"\0", b"\xff" * 7, bytes(range(64))):
        res = case.processor().inbound(case.wire + tail, now=0.0)
        assert res.verdict is Verdict.ACCEPT and res.packet == case.expected, (tail, res)


def test_suites_are_the_suite_protocol() -> None:
    # The wrappers above stand in for suites; keep them honest about the interface.
    wrapper: Suite = FixedIvAead(gcm_suite(GCM_CASES[0][1]), bytes(8))  # type: ignore[assignment]
    assert wrapper.iv_size == 8 and wrapper.icv_size == 16
