"""The IPv6 packet view (core/ipv6.py) against packets scapy builds: the extension-header walk,
selector keys, quoted keys of ICMPv6 errors, where transport-mode ESP goes, and the drops; and
hostile IPv6 through the processor (hypothesis, with the fuzz campaign's ``ipv6`` target and
seeds): never an exception, always a reason, nothing decrypted that the peer did not seal."""

from __future__ import annotations

import random
import re
import secrets
from functools import cache
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from repo import EXAMPLES, ROOT, fuzz_script
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6MLReport2,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet, Raw

from nfq_ipsec.config import Config, load_config
from nfq_ipsec.core import Verdict, ipv6
from nfq_ipsec.core.errors import DropReason, EspError
from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING
from nfq_ipsec.core.spd import Action

A, B = "2001:db8:1::10", "2001:db8:2::20"


def raw(pkt: Packet) -> bytes:
    return bytes(pkt)


def addr(text: str) -> int:
    return ipv6.V6 | int(IPv6Address(text))


def test_plain_udp_key_matches_scapy() -> None:
    data = raw(IPv6(src=A, dst=B, tc=0xB8, fl=0x12345, hlim=7) / UDP(sport=5353, dport=53) / b"x")
    hdr = ipv6.parse_ipv6(data)
    assert (hdr.tclass, hdr.flow, hdr.hop_limit) == (0xB8, 0x12345, 7)
    assert (hdr.protocol, hdr.offset, hdr.split, hdr.frag_offset) == (17, 40, 40, -1)
    assert hdr.total_length == len(data)
    key = ipv6.packet_key6(data, hdr)
    assert key.fields() == (addr(A), addr(B), 17, 5353, 53)


def test_walk_reaches_the_upper_layer_and_splits_after_routing() -> None:
    pkt = (IPv6(src=A, dst=B) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
           / IPv6ExtHdrRouting(addresses=[]) / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=443))
    data = raw(pkt)
    hdr = ipv6.parse_ipv6(data)
    assert hdr.protocol == 6
    assert hdr.offset == 40 + 4 * 8
    # ESP goes after hop-by-hop, the destination options before routing, and routing itself
    assert hdr.split == 40 + 3 * 8
    assert data[hdr.split_nh_at] == 60  # routing's next header: the destination options after it
    assert data[hdr.nh_at] == 6
    assert ipv6.packet_key6(data, hdr).fields()[2:] == (6, 1, 443)


def test_destination_options_alone_go_inside_esp() -> None:
    data = raw(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2))
    hdr = ipv6.parse_ipv6(data)
    assert (hdr.split, hdr.split_nh_at, hdr.offset) == (40, 6, 48)


def test_icmpv6_key_carries_type_and_code() -> None:
    data = raw(IPv6(src=A, dst=B) / ICMPv6EchoRequest(id=1, seq=2))
    key = ipv6.packet_key6(data, ipv6.parse_ipv6(data))
    assert key.fields()[2:] == (58, 128, 0)


def test_first_fragment_has_ports_later_ones_none() -> None:
    first = raw(IPv6(src=A, dst=B) / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=9)
                / UDP(sport=7, dport=8) / (b"a" * 16))
    hdr = ipv6.parse_ipv6(first)
    assert hdr.is_fragment and hdr.frag_offset == 0
    assert ipv6.packet_key6(first, hdr).fields()[2:] == (17, 7, 8)
    later = raw(IPv6(src=A, dst=B) / IPv6ExtHdrFragment(nh=17, offset=3, m=0, id=9) / (b"b" * 16))
    hdr = ipv6.parse_ipv6(later)
    assert hdr.is_fragment and hdr.frag_offset == 3
    assert ipv6.packet_key6(later, hdr).fields()[2:] == (17, None, None)


def test_esp_ends_the_walk() -> None:
    data = raw(IPv6(src=A, dst=B, nh=0) / IPv6ExtHdrHopByHop(nh=50) / Raw(b"\0\0\1\0" + bytes(20)))
    hdr = ipv6.parse_ipv6(data)
    assert (hdr.protocol, hdr.offset, hdr.nh_at) == (50, 48, 40)


def _with_payload_length(data: bytes, plen: int) -> bytes:
    return data[:4] + plen.to_bytes(2, "big") + data[6:]


@pytest.mark.parametrize(("build", "reason"), [
    (lambda: raw(IPv6(src=A, dst=B) / UDP())[:39], DropReason.MALFORMED),
    (lambda: _with_payload_length(raw(IPv6(src=A, dst=B) / UDP()), 9), DropReason.MALFORMED),
    (lambda: b"\x45" + raw(IPv6(src=A, dst=B) / UDP())[1:], DropReason.NOT_IPV4),
    # a destination options header claiming 16 bytes in an 8-byte payload
    (lambda: raw(IPv6(src=A, dst=B, nh=60) / Raw(bytes((17, 1)) + bytes(6))),
     DropReason.BAD_EXT_HEADER),
    # a chain cut inside its first 8 bytes
    (lambda: raw(IPv6(src=A, dst=B, nh=0) / Raw(bytes(4))), DropReason.BAD_EXT_HEADER),
    # hop-by-hop after another header
    (lambda: raw(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP()),
     DropReason.BAD_EXT_HEADER),
    (lambda: raw(IPv6(src=A, dst=B) / IPv6ExtHdrFragment(m=1) / IPv6ExtHdrFragment() / UDP()),
     DropReason.BAD_EXT_HEADER),
    (lambda: raw(IPv6(src=A, dst=B) / _dest_opts(ipv6.MAX_EXT_HEADERS + 1) / UDP()),
     DropReason.EXT_CHAIN_TOO_LONG),
])
def test_bad_chains_drop_with_their_reason(build: object, reason: DropReason) -> None:
    assert callable(build)
    with pytest.raises(EspError) as info:
        ipv6.parse_ipv6(build())
    assert info.value.reason is reason


def _dest_opts(n: int) -> Packet:
    chain: Packet = IPv6ExtHdrDestOpt()
    for _ in range(n - 1):
        chain = chain / IPv6ExtHdrDestOpt()
    return chain


def test_longest_allowed_chain_parses() -> None:
    data = raw(IPv6(src=A, dst=B) / _dest_opts(ipv6.MAX_EXT_HEADERS) / UDP(sport=1, dport=2))
    assert ipv6.parse_ipv6(data).protocol == 17


def test_quoted_key_of_an_icmpv6_error() -> None:
    about = IPv6(src=B, dst=A) / IPv6ExtHdrDestOpt() / UDP(sport=4000, dport=53) / (b"q" * 100)
    err = raw(IPv6(src=A, dst=B) / ICMPv6DestUnreach(code=4) / raw(about)[:60])
    key = ipv6.quoted_key6(err, ipv6.parse_ipv6(err))
    assert key is not None
    assert key.fields() == (addr(B), addr(A), 17, 4000, 53)
    echo = raw(IPv6(src=A, dst=B) / ICMPv6EchoRequest())
    assert ipv6.quoted_key6(echo, ipv6.parse_ipv6(echo)) is None


def test_neighbour_discovery_and_mld_are_link_messages() -> None:
    for pkt in (IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt="fe80::2"),
                IPv6(src="fe80::1", dst="ff02::16", hlim=1) / IPv6ExtHdrHopByHop() / ICMPv6MLReport2()):
        data = raw(pkt)
        assert ipv6.is_link_message(data, ipv6.parse_ipv6(data))
    echo = raw(IPv6(src=A, dst=B) / ICMPv6EchoRequest())
    assert not ipv6.is_link_message(echo, ipv6.parse_ipv6(echo))


def test_addr_str_is_rfc5952() -> None:
    rnd = random.Random(6)
    for _ in range(300):
        words = [rnd.choice([0, 0, 0, 1, 0xFFFF, rnd.randrange(65536)]) for _ in range(8)]
        value = int("".join(f"{w:04x}" for w in words), 16)
        assert ipv6.addr_str(ipv6.V6 | value) == str(IPv6Address(value))
    assert ipv6.addr_str(0x0A000001) == "10.0.0.1"


def test_build_header6_round_trips_through_scapy() -> None:
    head = ipv6.build_header6(0x2E, 0xABCDE, 8, 17, 9, addr(A), addr(B))
    pkt = IPv6(head + raw(UDP(sport=1, dport=2))[:8])
    assert (pkt.tc, pkt.fl, pkt.plen, pkt.nh, pkt.hlim, pkt.src, pkt.dst) == (
        0x2E, 0xABCDE, 8, 17, 9, A, B)


def test_the_readme_ipv6_pair_is_the_shipped_example(tmp_path: Path) -> None:
    """The README's IPv6 host example loads and says what ``examples/host6-a.toml`` says: the
    same protected selectors and the same SAs (SPI, direction, algorithm), keys from files."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"# host6-a\.toml[^\n]*\n.*?(?=```)", text, re.S)
    assert found, "the README's IPv6 example block is gone"
    for name in ("a-to-b", "b-to-a"):
        (tmp_path / f"{name}.key").write_text(secrets.token_hex(36) + "\n")
        (tmp_path / f"{name}.key").chmod(0o600)
    path = tmp_path / "readme6.toml"
    path.write_text(found.group(0))
    path.chmod(0o600)
    readme = load_config(path, online_cpus=[0])
    shipped = load_config(EXAMPLES / "host6-a.toml", online_cpus=[0])

    def protected(cfg: Config) -> list[tuple[object, ...]]:
        return [(p.selector, p.sa_names) for p in cfg.policies if p.action is Action.PROTECT]

    def sas(cfg: Config) -> list[tuple[object, ...]]:
        return sorted((sa.name, sa.spi, sa.direction, sa.encryption, sa.mode) for sa in cfg.sas)

    assert protected(readme) == protected(shipped) and protected(readme)
    assert sas(readme) == sas(shipped)
    assert all(p.selector.v6 for p in readme.policies)


# -- hostile input, as the fuzz campaign's ``ipv6`` target sees it --------------------------------
@cache
def ipv6_target() -> Any:
    return fuzz_script().ipv6_target()


@cache
def ipv6_seeds() -> list[bytes]:
    return list(fuzz_script().ipv6_seeds())


def test_the_ipv6_fuzz_target_takes_its_seeds() -> None:
    """Every genuine seed decrypts on a fresh host, every chain seed meets its fate, and the
    target's own check holds for all of them."""
    fuzz = fuzz_script()
    assert "ipv6" in fuzz.TARGETS
    results = []
    for seed in ipv6_seeds():
        proc, _ = fuzz._host6()
        where = (ARRIVING, LEAVING, FORWARDED, ARRIVING)[seed[0] & 3]
        results.append(proc.process(seed[1:], len(seed) - 1, where, 1.0))
        ipv6_target()(seed)
    names = [r.sa.name if r.sa and r.verdict in (Verdict.ACCEPT, Verdict.CROSS) else r.reason
             for r in results]  # CROSS: decrypted into the other family (the 4-in-6 SA)
    assert names[:12] == ["in0", "in0", "in1", "in2"] * 3
    assert names[12:21] == ["in0", "in0", "in0", DropReason.EXT_CHAIN_TOO_LONG,
                            DropReason.FRAGMENT, DropReason.BAD_EXT_HEADER,
                            DropReason.BAD_EXT_HEADER, DropReason.FRAGMENT, DropReason.FRAGMENT]
    assert [r.verdict for r in results[21:25]] == [Verdict.ACCEPT] * 4  # errors about our ESP
    assert names[25] is DropReason.CLEARTEXT_PROTECTED


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    """A seed with a few bytes changed, inserted or cut: most of it still genuine."""
    data = bytearray(draw(st.sampled_from(ipv6_seeds())))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(1, max(1, len(data) - 1)))
        if op == 0 and len(data) > 1:
            data[pos % len(data)] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def chains_in_front_of_esp(draw: st.DrawFn) -> bytes:
    """Genuine ESP (or its first bytes) behind a drawn chain of extension headers: kinds,
    lengths, fragment fields and the payload length all drawn, most of them wrong."""
    fuzz = fuzz_script()
    _, parts = fuzz.ipv6_genuine()
    esp = draw(st.sampled_from(parts))
    esp = esp[:draw(st.integers(0, len(esp)))] if draw(st.booleans()) else esp
    kinds = draw(st.lists(st.sampled_from([0, 43, 44, 60, 50, 59, 17, 253]), max_size=12))
    body = b""
    for i, kind in enumerate(kinds):
        nh = kinds[i + 1] if i + 1 < len(kinds) else 50
        if kind == 44:
            body += bytes((nh, 0)) + draw(st.binary(min_size=6, max_size=6))
        else:
            length = draw(st.integers(0, 3))
            body += bytes((nh, length)) + draw(st.binary(min_size=6 + 8 * length,
                                                           max_size=6 + 8 * length))
    data = bytearray(fuzz._v6(fuzz.B6, fuzz.A6, kinds[0] if kinds else 50, body + esp))
    if draw(st.booleans()):  # lie about the payload length: cut the packet short, or not
        plen = draw(st.one_of(st.integers(0, len(data) - 40), st.integers(0, 0xFFFF)))
        data[4:6] = plen.to_bytes(2, "big")
    return b"\x00" + bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300).map(lambda b: bytes([b[0] & 3 if b else 0, 0x60]) + b[1:]),
                 mutated_seeds(), chains_in_front_of_esp()))
def test_hostile_ipv6_never_raises_always_has_a_reason_and_forges_nothing(data: bytes) -> None:
    """Any input, on a host holding IPv6 SAs of every kind: a Result and never another
    exception; a drop always has a reason; a packet is decrypted only from genuine ESP (the
    target checks all three)."""
    ipv6_target()(data)
