"""The published vectors through the independent ESP implementation (``nfq_ipsec.independent``)
alone, as tests/unit/test_vectors.py puts them through the core:

- RFC 7634 Appendix A (ChaCha20-Poly1305): the cipher both ways, the tunnel packet opened,
  and sealed byte for byte;
- draft-mcgrew-gcm-test-01 (AES-GCM, 32-bit and extended sequence numbers): every case
  opened by the cipher, and those of a configurable key size (128, 256) opened and sealed
  byte for byte by the engine;
- RFC 4868: the truncated HMAC-SHA-2 ICVs;
- RFC 3602 cases 5 and 7 (AES-CBC, transport and tunnel): opened, and sealed byte for byte.

Vectors carry IVs of their own, where this data plane derives them from the sequence number:
the byte-for-byte tests replace the SA's IV choice (``Transform.iv_for``) with the vector's,
test-only; everything else is the engine's path. Every vector packet is also cut at every
length and given trailing bytes, as the core's are.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest
import sas
from packets import checksum, ipv4
from vectorfiles import Vector, load_vectors

from nfq_ipsec.core import Action, Direction, Mode, Policy, SADirection, SAParams, Selector
from nfq_ipsec.independent import ARRIVING, LEAVING, Engine, crypto

RFC7634 = load_vectors("rfc7634-appendix-a.txt", "key")[0]
MCGREW = [v for v in load_vectors("draft-mcgrew-gcm-test-01.txt", "algorithm")
          if v["algorithm"] == "AES-GCM-ESP"]
RFC4868 = load_vectors("rfc4868-auth.txt", "case")
RFC3602 = load_vectors("rfc3602-esp.txt", "case")
OUTER_SRC, OUTER_DST = "203.0.113.153", "192.0.2.1"  # ours: RFC 7634 prints no outer header
MC_SRC, MC_DST = "192.0.2.10", "192.0.2.20"  # ours: the draft prints the ESP part only
CBC_IKEY = bytes(range(0x40, 0x60))  # ours: RFC 3602 packets carry no ICV


def policy(local: str, remote: str, *names: str) -> Policy:
    return Policy("p", Selector(IPv4Network(local), IPv4Network(remote)), Action.PROTECT,
                  Direction.BOTH, names)


def header(src: str, dst: str, proto: int, payload_len: int) -> bytes:
    return ipv4(src, dst, proto, b"", 0x1234, 0, 20 + payload_len)


def patch_length(head: bytes, total: int) -> bytes:
    out = bytearray(head)
    out[2:4] = total.to_bytes(2, "big")
    out[10:12] = b"\0\0"
    out[10:12] = checksum(bytes(out)).to_bytes(2, "big")
    return bytes(out)


def fixed_iv(engine: Engine, name: str, iv: bytes) -> None:
    """Test-only: the SA sends the vector's IV instead of the one it derives."""
    engine.sa(name).transform.iv_for = lambda seq: iv  # type: ignore[method-assign]


# -- RFC 7634 -------------------------------------------------------------------------------


def test_rfc7634_cipher_both_ways() -> None:
    key, salt, packet = RFC7634.hex("key"), RFC7634.hex("salt"), RFC7634.hex("packet")
    aad = crypto.aead_aad(packet[:8], b"")
    assert crypto.aead_open("chacha20-poly1305", key, salt, aad, packet[8:]) == RFC7634.hex("plaintext")
    assert crypto.aead_seal("chacha20-poly1305", key, salt, RFC7634.hex("iv"), aad,
                            RFC7634.hex("plaintext")) == packet[8:]
    bad = bytearray(packet)
    bad[-1] ^= 1
    with pytest.raises(crypto.IntegrityFailure):
        crypto.aead_open("chacha20-poly1305", key, salt, aad, bytes(bad[8:]))


def rfc7634_sa(direction: SADirection) -> SAParams:
    return sas.params("in" if direction is SADirection.IN else "out", int(RFC7634["spi"], 16),
                      direction, "chacha20-poly1305", RFC7634.hex("key") + RFC7634.hex("salt"),
                      local=OUTER_SRC, remote=OUTER_DST)


def rfc7634_engine() -> Engine:
    return Engine([policy("192.0.2.5/32", "198.51.100.5/32", "in")],
                  [rfc7634_sa(SADirection.IN)], 0.0)


def rfc7634_wire() -> bytes:
    packet = RFC7634.hex("packet")
    return header(OUTER_SRC, OUTER_DST, 50, len(packet)) + packet


def test_rfc7634_tunnel_packet_opened_once() -> None:
    engine = rfc7634_engine()
    out = engine.process(rfc7634_wire(), len(rfc7634_wire()), ARRIVING, 0.0)
    assert (out.verdict, out.packet, out.seq, out.sa_name) == (
        "accept", RFC7634.hex("source"), 5, "in")
    again = engine.process(rfc7634_wire(), len(rfc7634_wire()), ARRIVING, 0.0)
    assert (again.verdict, again.reason) == ("drop", "replay")


def test_rfc7634_sealed_byte_for_byte() -> None:
    source = RFC7634.hex("source")
    engine = Engine([policy("198.51.100.5/32", "192.0.2.5/32", "out")],
                    [rfc7634_sa(SADirection.OUT)], 0.0)
    engine.sa("out").next_seq = 5
    fixed_iv(engine, "out", RFC7634.hex("iv"))
    out = engine.process(source, len(source), LEAVING, 0.0)
    assert out.verdict == "accept" and out.packet is not None, out
    assert out.packet[20:] == RFC7634.hex("packet")
    assert out.packet[12:16] == IPv4Address(OUTER_SRC).packed
    assert out.packet[16:20] == IPv4Address(OUTER_DST).packed
    assert checksum(out.packet[:20]) == 0


# -- draft-mcgrew-gcm-test-01 ---------------------------------------------------------------


def mc_ids(v: Vector) -> str:
    return f"{len(v.hex('key')) * 8}-{'esn' if len(v.hex('seq')) == 8 else 'seq32'}-{v['spi']}"


def mc_seq(v: Vector) -> tuple[int, bool]:
    return int.from_bytes(v.hex("seq"), "big"), len(v.hex("seq")) == 8


def mc_payload(v: Vector) -> tuple[bytes, int]:
    plaintext = v.hex("plaintext")
    pad_len, next_header = plaintext[-2], plaintext[-1]
    return plaintext[: len(plaintext) - 2 - pad_len], next_header


def mc_inner(v: Vector) -> bytes:
    payload, next_header = mc_payload(v)
    return header(MC_SRC, MC_DST, next_header, len(payload)) + payload


def mc_wire(v: Vector) -> bytes:
    return header(MC_SRC, MC_DST, 50, len(v.hex("packet"))) + v.hex("packet")


CONFIGURABLE = [v for v in MCGREW if len(v.hex("key")) in (16, 32)]


def mc_sa(v: Vector, direction: SADirection) -> SAParams:
    name = {16: "aes-gcm-128", 32: "aes-gcm-256"}[len(v.hex("key"))]
    return sas.params("in" if direction is SADirection.IN else "out", int(v["spi"], 16),
                      direction, name, v.hex("key") + v.hex("nonce")[:4], esn=mc_seq(v)[1])


def mc_engine(v: Vector) -> Engine:
    engine = Engine([policy(f"{MC_DST}/32", f"{MC_SRC}/32", "in")],
                    [mc_sa(v, SADirection.IN)], 0.0)
    seq = mc_seq(v)[0]
    if seq > 1:
        engine.sa("in").window.record(seq - 1)  # where RFC 4303 A2.2 infers the high bits
    return engine


def test_mcgrew_cases_present() -> None:
    assert len(MCGREW) == 16 and len(CONFIGURABLE) < 16  # the 192-bit ones: the cipher only


@pytest.mark.parametrize("v", MCGREW, ids=mc_ids)
def test_mcgrew_cipher_opens(v: Vector) -> None:
    seq, esn = mc_seq(v)
    packet = v.hex("packet")
    aad = crypto.aead_aad(packet[:8], (seq >> 32).to_bytes(4, "big") if esn else b"")
    assert aad == v.hex("aad")
    assert crypto.aead_open("aes-gcm", v.hex("key"), v.hex("nonce")[:4], aad,
                            packet[8:]) == v.hex("plaintext")


@pytest.mark.parametrize("v", CONFIGURABLE, ids=mc_ids)
def test_mcgrew_engine_opens(v: Vector) -> None:
    out = mc_engine(v).process(mc_wire(v), len(mc_wire(v)), ARRIVING, 0.0)
    assert (out.verdict, out.packet, out.seq) == ("accept", mc_inner(v), mc_seq(v)[0]), out


@pytest.mark.parametrize("v", CONFIGURABLE, ids=mc_ids)
def test_mcgrew_engine_seals_byte_for_byte(v: Vector) -> None:
    engine = Engine([policy(f"{MC_SRC}/32", f"{MC_DST}/32", "out")],
                    [mc_sa(v, SADirection.OUT)], 0.0)
    engine.sa("out").next_seq = mc_seq(v)[0]
    fixed_iv(engine, "out", v.hex("nonce")[4:])
    inner = mc_inner(v)
    out = engine.process(inner, len(inner), LEAVING, 0.0)
    assert out.packet == mc_wire(v), out


# -- RFC 4868 -------------------------------------------------------------------------------


@pytest.mark.parametrize("v", RFC4868, ids=[v["case"] for v in RFC4868])
def test_rfc4868_icv(v: Vector) -> None:
    mac = crypto.INTEGRITY[{"sha256": "hmac-sha256-128", "sha384": "hmac-sha384-192",
                            "sha512": "hmac-sha512-256"}[v["digest"]]]
    data, auth = v.hex("data"), v.hex("auth")
    assert crypto.hmac_icv(mac, v.hex("key"), data) == auth
    assert crypto.hmac_icv(mac, v.hex("key"), data[:8], data[8:]) == auth  # parts, as ESP gives them
    assert crypto.null_seal(mac, v.hex("key"), data[:8], b"", data[8:]) == data[8:] + auth
    if len(data) >= 12:
        assert crypto.null_open(mac, v.hex("key"), data[:8], b"", data[8:] + auth) == data[8:]
        with pytest.raises(crypto.IntegrityFailure):
            crypto.null_open(mac, v.hex("key"), data[:8], b"", data[8:] + bytes(len(auth)))


# -- RFC 3602 -------------------------------------------------------------------------------


def cbc_icv(esp_part: bytes) -> bytes:
    return hmac.new(CBC_IKEY, esp_part, hashlib.sha256).digest()[:16]


def cbc_sa(v: Vector, direction: SADirection) -> SAParams:
    outer = v.hex("outer")
    return sas.params("in" if direction is SADirection.IN else "out", int(v["spi"], 16),
                      direction, "aes-cbc-128", v.hex("key"), "hmac-sha256-128", CBC_IKEY,
                      mode=Mode.TUNNEL if v["mode"] == "tunnel" else Mode.TRANSPORT,
                      local=str(IPv4Address(outer[12:16])), remote=str(IPv4Address(outer[16:20])))


def cbc_wire(v: Vector) -> bytes:
    esp_part = v.hex("esp") + cbc_icv(v.hex("esp"))
    return patch_length(v.hex("outer"), 20 + len(esp_part)) + esp_part


def cbc_engine(v: Vector) -> Engine:
    original = v.hex("original")
    src, dst = IPv4Address(original[12:16]), IPv4Address(original[16:20])
    return Engine([policy(f"{dst}/32", f"{src}/32", "in")], [cbc_sa(v, SADirection.IN)], 0.0)


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_cipher_decrypts(v: Vector) -> None:
    mac = crypto.INTEGRITY["hmac-sha256-128"]
    esp_part = v.hex("esp")
    assert crypto.cbc_open(v.hex("key"), mac, CBC_IKEY, esp_part[:8], b"",
                           esp_part[8:] + cbc_icv(esp_part)) == v.hex("plaintext")


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_engine_opens(v: Vector) -> None:
    out = cbc_engine(v).process(cbc_wire(v), len(cbc_wire(v)), ARRIVING, 0.0)
    assert (out.verdict, out.packet) == ("accept", v.hex("original")), out


@pytest.mark.parametrize("v", RFC3602, ids=[f"case{v['case']}" for v in RFC3602])
def test_rfc3602_engine_seals_byte_for_byte(v: Vector) -> None:
    original = v.hex("original")
    src, dst = IPv4Address(original[12:16]), IPv4Address(original[16:20])
    engine = Engine([policy(f"{src}/32", f"{dst}/32", "out")], [cbc_sa(v, SADirection.OUT)], 0.0)
    engine.sa("out").next_seq = int(v["seq"], 16)
    fixed_iv(engine, "out", v.hex("iv"))
    out = engine.process(original, len(original), LEAVING, 0.0)
    assert out.packet is not None, out
    assert out.packet[20:-16] == v.hex("esp")
    assert out.packet[-16:] == cbc_icv(v.hex("esp"))
    expected = patch_length(v.hex("outer"), len(out.packet))
    if v["mode"] == "transport":
        assert out.packet[:20] == expected
    else:  # the identification is ours to choose; the rest must match
        assert out.packet[:4] == expected[:4] and out.packet[6:10] == expected[6:10]
        assert out.packet[12:20] == expected[12:20] and checksum(out.packet[:20]) == 0


# -- every vector packet whole, cut short, and with bytes after it --------------------------


@dataclass
class WireCase:
    name: str
    engine: Callable[[], Engine]
    wire: bytes
    expected: bytes


def _mc(v: Vector) -> Callable[[], Engine]:
    return lambda: mc_engine(v)


def _cbc(v: Vector) -> Callable[[], Engine]:
    return lambda: cbc_engine(v)


WIRE_CASES = [
    WireCase("rfc7634", rfc7634_engine, rfc7634_wire(), RFC7634.hex("source")),
    *(WireCase(f"mcgrew-{mc_ids(v)}", _mc(v), mc_wire(v), mc_inner(v)) for v in CONFIGURABLE),
    *(WireCase(f"rfc3602-case{v['case']}", _cbc(v), cbc_wire(v), v.hex("original"))
      for v in RFC3602),
]


@pytest.mark.parametrize("case", WIRE_CASES, ids=[c.name for c in WIRE_CASES])
def test_vector_packet_whole_prefixes_and_trailing_bytes(case: WireCase) -> None:
    engine = case.engine()
    for n in range(len(case.wire)):  # the header says more than there is
        out = engine.process(case.wire[:n], n, ARRIVING, 0.0)
        assert out.verdict == "drop" and out.reason in ("malformed", "not_ipv4", "truncated"), (n, out)
    for n in range(20, len(case.wire)):  # consistent, but the ESP part is short
        cut = patch_length(case.wire[:20], n) + case.wire[20:n]
        out = engine.process(cut, n, ARRIVING, 0.0)
        assert out.verdict == "drop" and out.reason in ("malformed", "integrity"), (n, out)
    out = engine.process(case.wire, len(case.wire), ARRIVING, 0.0)  # the window never moved
    assert (out.verdict, out.packet) == ("accept", case.expected), out
    assert engine.process(case.wire, len(case.wire), ARRIVING, 0.0).reason == "replay"
    for tail in (b"\0", b"\xff" * 7, bytes(range(64))):
        wire = case.wire + tail
        out = case.engine().process(wire, len(wire), ARRIVING, 0.0)
        assert (out.verdict, out.packet) == ("accept", case.expected), (tail, out)
