"""Interoperability with an independent ESP implementation: scapy's SecurityAssociation.

Both directions, every algorithm we offer, transport and tunnel mode, with and without
extended sequence numbers (scapy takes the ESN high half as a parameter), for each of our
implementations (``versions``: the core and the independent one, each on its own). scapy
uses random IVs and no replay window; it is an oracle for the wire format, not a model to
copy.
"""

from __future__ import annotations

import random
import zlib
from ipaddress import IPv4Network

import pytest
import sas
import versions
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.ipsec import ESP, IPSecIntegrityError
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.packet import Packet, Raw

from nfq_ipsec.core import (
    Action,
    Direction,
    Mode,
    Policy,
    SADirection,
    Selector,
)
from nfq_ipsec.core.suites import ENCRYPTION, HMACS

LOCAL, REMOTE = "10.1.0.1", "10.2.0.2"  # the inner hosts
GW_LOCAL, GW_REMOTE = "192.0.2.1", "198.51.100.2"  # tunnel endpoints
SPI_OUT, SPI_IN = 0x1001, 0x2002

SCAPY_CRYPT = {
    "aes-gcm-128": "AES-GCM", "aes-gcm-256": "AES-GCM", "chacha20-poly1305": "CHACHA20-POLY1305",
    "aes-cbc-128": "AES-CBC", "aes-cbc-256": "AES-CBC", "null": "NULL",
}
SCAPY_AUTH = {
    None: None, "hmac-sha256-128": "SHA2-256-128", "hmac-sha384-192": "SHA2-384-192",
    "hmac-sha512-256": "SHA2-512-256",
}
SUITES: list[tuple[str, str | None]] = [
    ("aes-gcm-128", None), ("aes-gcm-256", None), ("chacha20-poly1305", None),
    *((cbc, mac) for cbc in ("aes-cbc-128", "aes-cbc-256") for mac in HMACS),
    ("null", "hmac-sha256-128"), ("null", "hmac-sha512-256"),
]


def test_every_offered_algorithm_is_covered() -> None:
    assert {enc for enc, _ in SUITES} == set(ENCRYPTION)
    assert {mac for _, mac in SUITES if mac} == set(HMACS)


def keys(enc: str, mac: str | None, seed: int) -> tuple[bytes, bytes]:
    rnd = random.Random(seed)
    key = rnd.randbytes(ENCRYPTION[enc].keymat_size)
    ikey = rnd.randbytes(HMACS[mac].key_size) if mac else b""
    return key, ikey


def inner_packets(seed: int) -> list[Packet]:
    """Various inner packets; lengths 0..~300 to exercise every padding length."""
    rnd = random.Random(seed)
    out: list[Packet] = []
    for n in range(16):
        payload = rnd.randbytes(rnd.choice([0, 1, 2, 3, 5, 15, 16, 17, 31, 100, 255, 300]))
        l4 = [
            ICMP(id=n, seq=n) / Raw(payload),
            UDP(sport=1000 + n, dport=53) / Raw(payload),
            TCP(sport=2000 + n, dport=443, flags="PA", seq=n) / Raw(payload),
        ][n % 3]
        pkt = IP(src=LOCAL, dst=REMOTE, id=n, tos=rnd.choice([0, 0x28, 0xB8]), ttl=rnd.randint(2, 255)) / l4
        out.append(IP(bytes(pkt)))  # freeze checksums and lengths
    return out


VERSIONS = sorted(versions.VERSIONS)


def our_processor(
    enc: str, mac: str | None, mode: Mode, esn: bool, key: bytes, ikey: bytes, next_seq: int,
    version: str = "core",
) -> versions.Runner:
    """One of our implementations with an outbound SA "out" and an inbound SA "in"."""
    ends = {"local": GW_LOCAL, "remote": GW_REMOTE} if mode is Mode.TUNNEL else {}
    out_p = sas.params("out", SPI_OUT, SADirection.OUT, enc, key, mac, ikey, mode=mode, esn=esn, **ends)
    in_p = sas.params("in", SPI_IN, SADirection.IN, enc, key, mac, ikey, mode=mode, esn=esn, **ends)
    pol = Policy("p", Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network(f"{REMOTE}/32")),
                 Action.PROTECT, Direction.BOTH, ("out", "in"))
    ours = versions.build(version, [pol], [out_p, in_p])
    ours.start_at("out", next_seq)
    if next_seq > 1:
        ours.seen_up_to("in", next_seq - 1)  # the receiver is where the sender is
    return ours


def scapy_sa(
    spi: int, enc: str, mac: str | None, mode: Mode, esn_hi: int | None, key: bytes, ikey: bytes,
    *, receiving: bool,
) -> ScapySA:
    tunnel = None
    if mode is Mode.TUNNEL:
        # scapy's tunnel header is what it sends; when it receives, it is unused.
        tunnel = IP(src=GW_REMOTE, dst=GW_LOCAL) if not receiving else IP(src=GW_LOCAL, dst=GW_REMOTE)
    return ScapySA(
        ESP, spi=spi, crypt_algo=SCAPY_CRYPT[enc], crypt_key=key, auth_algo=SCAPY_AUTH[mac],
        auth_key=ikey or None, tunnel_header=tunnel, esn_en=esn_hi is not None, esn=esn_hi or 0,
    )


MODES = [Mode.TRANSPORT, Mode.TUNNEL]
# (ESN enabled, first sequence number): 32-bit from 1; ESN in the first subspace; ESN with
# the high half non-zero and the low half about to wrap (scapy gets the high half fixed, so
# the test stays inside one subspace per case).
SEQ_CASES = [(False, 1), (True, 1), (True, (7 << 32) | 0xFFFFFFE0)]


def _ids(suite: tuple[str, str | None]) -> str:
    return suite[0] + (f"+{suite[1]}" if suite[1] else "")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("esn,first", SEQ_CASES, ids=["seq32", "esn-low", "esn-high"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("suite", SUITES, ids=_ids)
def test_ours_to_scapy(suite: tuple[str, str | None], mode: Mode, esn: bool, first: int,
                       version: str) -> None:
    enc, mac = suite
    key, ikey = keys(enc, mac, zlib.crc32(f"{enc}{mac}{mode.value}{esn}".encode()))
    proc = our_processor(enc, mac, mode, esn, key, ikey, first, version)
    peer = scapy_sa(SPI_OUT, enc, mac, mode, (first >> 32) if esn else None, key, ikey, receiving=True)
    for n, pkt in enumerate(inner_packets(first ^ n_seed(enc))):
        original = bytes(pkt)
        res = proc.outbound(original, now=0.0)
        assert res.verdict == "accept" and res.packet is not None, res
        wire = IP(res.packet)
        assert wire.proto == 50 and wire[ESP].spi == SPI_OUT
        assert wire[ESP].seq == (first + n) & 0xFFFFFFFF
        if mode is Mode.TUNNEL:
            assert (wire.src, wire.dst) == (GW_LOCAL, GW_REMOTE)
        else:
            assert (wire.src, wire.dst) == (LOCAL, REMOTE)
        plain = peer.decrypt(wire)  # verifies the ICV (AEAD tag or HMAC) and removes ESP
        assert bytes(plain) == original, (n, plain.show(dump=True))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("esn,first", SEQ_CASES, ids=["seq32", "esn-low", "esn-high"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("suite", SUITES, ids=_ids)
def test_scapy_to_ours(suite: tuple[str, str | None], mode: Mode, esn: bool, first: int,
                       version: str) -> None:
    enc, mac = suite
    key, ikey = keys(enc, mac, zlib.crc32(f"in{enc}{mac}{mode.value}{esn}".encode()))
    proc = our_processor(enc, mac, mode, esn, key, ikey, first, version)
    peer = scapy_sa(SPI_IN, enc, mac, mode, (first >> 32) if esn else None, key, ikey, receiving=False)
    for n, pkt in enumerate(inner_packets(first ^ n_seed(enc) ^ 1)):
        # The peer sends from REMOTE to LOCAL.
        reply = IP(bytes(pkt))
        reply.src, reply.dst = REMOTE, LOCAL
        del reply.chksum
        original = bytes(reply)
        seq = first + n
        wire = peer.encrypt(IP(original), seq_num=seq & 0xFFFFFFFF)
        res = proc.inbound(bytes(wire), now=0.0)
        assert res.verdict == "accept", (n, res)
        assert res.packet == original
        assert res.seq == seq and res.sa == "in"
    assert proc.window_top("in") == seq
    # scapy leaves replay protection to us: the last packet again is a replay.
    again = proc.inbound(bytes(wire), now=0.0)
    assert (again.verdict, again.reason) == ("drop", "replay")


def n_seed(name: str) -> int:
    return sum(name.encode())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("suite", SUITES, ids=_ids)
def test_scapy_rejects_our_packet_with_wrong_key(suite: tuple[str, str | None], version: str) -> None:
    # Negative control for the oracle: a wrong key must make scapy fail.
    enc, mac = suite
    key, ikey = keys(enc, mac, 7)
    proc = our_processor(enc, mac, Mode.TRANSPORT, False, key, ikey, 1, version)
    wrong_key, wrong_ikey = keys(enc, mac, 8)
    if mac is not None:
        key, ikey = key, wrong_ikey  # integrity is what must catch it
    else:
        key = wrong_key
    peer = scapy_sa(SPI_OUT, enc, mac, Mode.TRANSPORT, None, key, ikey, receiving=True)
    res = proc.outbound(bytes(inner_packets(1)[0]), now=0.0)
    assert res.packet is not None
    with pytest.raises(IPSecIntegrityError):
        peer.decrypt(IP(res.packet))
