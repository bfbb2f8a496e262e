"""The IKE Encrypted payload and key derivation: tshark (Wireshark's IKEv2 dissector, given the
keys through its ikev2_decryption_table) decrypts our messages and checks their ICVs; our
opener refuses every changed byte; and the key split follows RFC 7296 2.14 and 2.17."""

from __future__ import annotations

import hmac
import os
import re
import struct
import subprocess
from pathlib import Path

import gate
import pytest

from nfq_ipsec.ike import sk
from nfq_ipsec.ike.errors import IkeError, Notify
from nfq_ipsec.ike.keys import (
    Suite,
    child_keys,
    ike_keys,
    prf,
    prf_plus,
    psk_auth,
    signed_octets,
)
from nfq_ipsec.ike.message import (
    PT,
    AuthMethod,
    AuthPayload,
    EncryptedPayload,
    Exchange,
    Flag,
    Header,
    IdPayload,
    IdType,
    NotifyPayload,
    Payload,
    decode_message,
)
from nfq_ipsec.ike.proposal import Encr, Integ, Prf

SPI_I, SPI_R = bytes.fromhex("0102030405060708"), bytes.fromhex("a1a2a3a4a5a6a7a8")
SUITES = {  # name: (suite, tshark's encryption name, tshark's integrity name)
    "gcm128": (Suite(Encr.AES_GCM_16, 128, Integ.NONE, Prf.HMAC_SHA2_256),
               "AES-GCM-128 with 16 octet ICV [RFC5282]", "NONE [RFC4306]"),
    "gcm256": (Suite(Encr.AES_GCM_16, 256, Integ.NONE, Prf.HMAC_SHA2_384),
               "AES-GCM-256 with 16 octet ICV [RFC5282]", "NONE [RFC4306]"),
    "cbc128-sha256": (Suite(Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128, Prf.HMAC_SHA2_256),
                      "AES-CBC-128 [RFC3602]", "HMAC_SHA2_256_128 [RFC4868]"),
    "cbc256-sha384": (Suite(Encr.AES_CBC, 256, Integ.HMAC_SHA2_384_192, Prf.HMAC_SHA2_384),
                      "AES-CBC-256 [RFC3602]", "HMAC_SHA2_384_192 [RFC4868]"),
    "cbc192-sha512": (Suite(Encr.AES_CBC, 192, Integ.HMAC_SHA2_512_256, Prf.HMAC_SHA2_512),
                      "AES-CBC-192 [RFC3602]", "HMAC_SHA2_512_256 [RFC4868]"),
}
CHACHA = Suite(Encr.CHACHA20_POLY1305, None, Integ.NONE, Prf.HMAC_SHA2_256)
NI, NR, SHARED = bytes(range(32)), bytes(range(32, 64)), bytes(range(64, 96))


def auth_request(suite: Suite, fqdn: bytes, iv_byte: int = 7) -> tuple[bytes, bytes, bytes]:
    """An IKE_AUTH request sealed with keys derived for ``suite``: (message, SK_ei, SK_ai)."""
    keys = ike_keys(suite, prf(suite.prf, NI + NR, SHARED), NI, NR, SPI_I, SPI_R)
    header = Header(SPI_I, SPI_R, 0, Exchange.IKE_AUTH, Flag.INITIATOR, 1)
    inner: list[Payload] = [IdPayload(IdType.FQDN, fqdn, PT.IDI),
                            AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(32)),
                            NotifyPayload(Notify.INITIAL_CONTACT)]
    wire = sk.seal(header, [], inner, suite, keys.sk_ei, keys.sk_ai, bytes([iv_byte]) * sk.iv_size(suite))
    return wire, keys.sk_ei, keys.sk_ai


def open_request(wire: bytes, suite: Suite, ek: bytes, ak: bytes) -> tuple:  # type: ignore[type-arg]
    msg = decode_message(wire)
    enc = msg.payloads[-1]
    assert isinstance(enc, EncryptedPayload)
    return sk.open_message(wire, msg.header, enc, suite, ek, ak)


@pytest.mark.parametrize("name", [*SUITES, "chacha"])
def test_what_we_seal_we_open(name: str) -> None:
    suite = CHACHA if name == "chacha" else SUITES[name][0]
    wire, ek, ak = auth_request(suite, b"gw-a.example")
    inner = open_request(wire, suite, ek, ak)
    assert [p.type for p in inner] == [PT.IDI, PT.AUTH, PT.NOTIFY]
    assert isinstance(inner[0], IdPayload) and inner[0].data == b"gw-a.example"


@pytest.mark.parametrize("name", ["gcm128", "cbc128-sha256", "chacha"])
def test_every_changed_byte_is_refused(name: str) -> None:
    suite = CHACHA if name == "chacha" else SUITES[name][0]
    wire, ek, ak = auth_request(suite, b"gw-a.example")
    for at in range(len(wire)):
        bad = bytearray(wire)
        bad[at] ^= 0x01
        with pytest.raises(IkeError) as err:
            open_request(bytes(bad), suite, ek, ak)
        assert err.value.notify in (Notify.AUTHENTICATION_FAILED, Notify.INVALID_SYNTAX,
                                    Notify.INVALID_MAJOR_VERSION), at
    with pytest.raises(IkeError) as err:
        open_request(wire, suite, bytes(len(ek)), ak if not ak else bytes(len(ak)))
    assert err.value.notify is Notify.AUTHENTICATION_FAILED
    assert ek.hex() not in str(err.value)


def write_pcap(path: Path, messages: list[bytes]) -> None:
    """IKE messages in UDP port 500 between 192.0.2.1 and 192.0.2.2, LINKTYPE_RAW."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, msg in enumerate(messages):
            udp = struct.pack("!HHHH", 500, 500, 8 + len(msg), 0) + msg
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                             bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])) + udp
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(ip), len(ip)) + ip)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_tshark_decrypts_our_messages_and_finds_the_icv_correct(tmp_path: Path, name: str) -> None:
    tshark = gate.tool("tshark", "tshark")  # the IKEv2 decoder oracle
    suite, enc_name, integ_name = SUITES[name]
    fqdn = f"{name}.nfq-ipsec.test".encode()
    wire, ek, ak = auth_request(suite, fqdn)
    pcap = tmp_path / "ike.pcap"
    write_pcap(pcap, [wire])
    er, ar = bytes(len(ek)), bytes(len(ak))  # the responder's keys: unused by a request
    table = (f"uat:ikev2_decryption_table:{SPI_I.hex()},{SPI_R.hex()},{ek.hex()},{er.hex()},"
             f'"{enc_name}",{ak.hex()},{ar.hex()},"{integ_name}"')
    res = subprocess.run([tshark, "-n", "-r", str(pcap), "-o", table, "-V"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    assert res.returncode == 0, res.stderr
    assert f"ID_FQDN: {fqdn.decode()}" in res.stdout, res.stdout[-3000:]
    assert "INITIAL_CONTACT (16384)" in res.stdout
    assert re.search(r"Integrity Checksum Data: [0-9a-f]+ .*\[correct\]", res.stdout), res.stdout[-1500:]
    # and tshark tells a wrong key: the same table with SK_ei changed finds no FQDN
    bad = table.replace(ek.hex(), bytes(len(ek)).hex(), 1)
    res = subprocess.run([tshark, "-n", "-r", str(pcap), "-o", bad, "-V"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    assert f"ID_FQDN: {fqdn.decode()}" not in res.stdout


def test_prf_plus_is_the_chain_of_section_2_13() -> None:
    key, seed = b"k" * 32, b"seed"
    t1 = hmac.new(key, seed + b"\x01", "sha256").digest()
    t2 = hmac.new(key, t1 + seed + b"\x02", "sha256").digest()
    assert prf_plus(Prf.HMAC_SHA2_256, key, seed, 40) == (t1 + t2)[:40]
    with pytest.raises(IkeError, match="255 blocks"):
        prf_plus(Prf.HMAC_SHA2_256, key, seed, 256 * 32)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_ike_keys_are_cut_from_one_prf_plus_stream_in_the_rfc_order(name: str) -> None:
    suite = SUITES[name][0]
    seed = prf(suite.prf, NI + NR, SHARED)
    keys = ike_keys(suite, seed, NI, NR, SPI_I, SPI_R)
    stream = b"".join((keys.sk_d, keys.sk_ai, keys.sk_ar, keys.sk_ei, keys.sk_er, keys.sk_pi,
                       keys.sk_pr))
    assert stream == prf_plus(suite.prf, seed, NI + NR + SPI_I + SPI_R, len(stream))
    p = len(prf(suite.prf, b"", b""))
    assert (len(keys.sk_d), len(keys.sk_pi), len(keys.sk_pr)) == (p, p, p)
    assert len(keys.sk_ei) == suite.key_bits // 8 + (4 if suite.aead else 0)  # type: ignore[operator]
    assert len(keys.sk_ai) == (0 if suite.aead else {12: 32, 13: 48, 14: 64}[suite.integ])
    assert "sk_" not in repr(keys) and keys.sk_d.hex() not in repr(keys)


def test_child_keys_give_the_initiator_direction_first() -> None:
    child = Suite(Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128)
    km = prf_plus(Prf.HMAC_SHA2_256, b"d" * 32, NI + NR, 2 * (16 + 32))
    keys = child_keys(Prf.HMAC_SHA2_256, b"d" * 32, child, NI, NR)
    assert (keys.encr_i, keys.integ_i, keys.encr_r, keys.integ_r) == (
        km[:16], km[16:48], km[48:64], km[64:])
    pfs = child_keys(Prf.HMAC_SHA2_256, b"d" * 32, child, NI, NR, shared=SHARED)
    assert pfs.encr_i == prf_plus(Prf.HMAC_SHA2_256, b"d" * 32, SHARED + NI + NR, 16)


def test_psk_auth_is_the_keyed_prf_of_the_signed_octets() -> None:
    octets = signed_octets(b"first message", NR, Prf.HMAC_SHA2_256, b"p" * 32, b"\x02\0\0\0gw-a")
    assert octets == b"first message" + NR + hmac.new(b"p" * 32, b"\x02\0\0\0gw-a", "sha256").digest()
    inner = hmac.new(b"secret", b"Key Pad for IKEv2", "sha256").digest()
    assert psk_auth(Prf.HMAC_SHA2_256, b"secret", octets) == hmac.new(inner, octets, "sha256").digest()
