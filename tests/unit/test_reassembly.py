"""Reassembly of captured IP fragments (nfq_ipsec/reassembly.py), IPv4 and IPv6, checked against
scapy's own fragmentation: any order, several datagrams at once, and fail closed on overlap or
overflow."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.packet import Raw

from nfq_ipsec.core import packet as ip
from nfq_ipsec.reassembly import (
    Overlap,
    Reassembler,
    ipv4_fragment,
    ipv4_whole,
    ipv6_fragment,
    ipv6_whole,
)


def fragments(ident: int, size: int = 4000) -> tuple[bytes, list[bytes]]:
    pkt = IP(src="10.0.0.1", dst="10.0.0.2", id=ident, flags=0) / UDP(sport=1, dport=2) / Raw(
        bytes(i & 0xFF for i in range(size)))
    whole = bytes(pkt)
    frags = fragment(IP(whole), fragsize=1480)  # type: ignore[no-untyped-call]
    return whole, [bytes(f) for f in frags]


def feed(r: Reassembler, data: bytes) -> bytes | None:
    hdr = ip.parse_ipv4(data)
    got = r.add(ipv4_fragment(data, hdr))
    if got is None:
        return None
    header, payload, _count = got
    return ipv4_whole(header, len(payload)) + payload


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_any_order_gives_the_datagram_back(order: tuple[int, int, int]) -> None:
    whole, frags = fragments(7)
    assert len(frags) == 3
    r = Reassembler()
    results = [feed(r, frags[i]) for i in order]
    assert results[:2] == [None, None]
    assert results[2] == whole  # byte for byte, header checksum included


def test_datagrams_are_kept_apart() -> None:
    (w1, f1), (w2, f2) = fragments(1), fragments(2, 2000)
    assert len(f2) == 2
    r = Reassembler()
    out = [feed(r, f) for f in (f1[0], f2[0], f1[1], f2[1], f1[2])]
    assert out[3] == w2 and out[4] == w1


def test_overlap_and_overflow_drop_the_datagram() -> None:
    _whole, frags = fragments(3)
    r = Reassembler()
    assert feed(r, frags[0]) is None
    with pytest.raises(Overlap):
        feed(r, frags[0])  # a duplicate overlaps too: never decided by which copy came first
    assert feed(r, frags[1]) is None and feed(r, frags[2]) is None  # the first is gone: incomplete
    too_far = IP(frags[2])
    too_far.frag = 8189  # ends past 65,535 bytes
    with pytest.raises(Overlap):
        feed(Reassembler(), bytes(too_far))


def fragments6(ident: int, size: int = 4000) -> tuple[bytes, list[bytes]]:
    """An IPv6 UDP datagram behind hop-by-hop options, and scapy's fragments of it (the
    hop-by-hop header in front of each fragment header, as RFC 8200 has it)."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6

    head = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop()
    body = UDP(sport=1, dport=2) / Raw(bytes(i & 0xFF for i in range(size)))
    whole = bytes(head / body)
    frags = fragment6(head / IPv6ExtHdrFragment(id=ident) / body, 1280)  # type: ignore[no-untyped-call]
    return whole, [bytes(f) for f in frags]


def feed6(r: Reassembler, data: bytes) -> bytes | None:
    frag = ipv6_fragment(data)
    assert frag is not None
    got = r.add(frag)
    if got is None:
        return None
    header, payload, _count = got
    return ipv6_whole(header, len(payload)) + payload


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_ipv6_fragments_in_any_order_give_the_datagram_back(order: tuple[int, ...]) -> None:
    whole, frags = fragments6(0x1234)
    assert len(frags) == 4
    r = Reassembler()
    results = [feed6(r, frags[i]) for i in order]
    assert results[:3] == [None, None, None]
    assert results[3] == whole  # hop-by-hop kept, fragment header gone, payload length redone


def test_ipv6_keys_and_limits() -> None:
    """Datagrams are told apart by identification (and addresses); overlapping fragments and
    a datagram past 65,535 bytes of payload drop the datagram; an atomic fragment is whole."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment

    (w1, f1), (w2, f2) = fragments6(1), fragments6(2, 2000)
    assert len(f2) == 2
    r = Reassembler()
    out = [feed6(r, f) for f in (f1[0], f2[0], f1[1], f1[2], f2[1], f1[3])]
    assert out[4] == w2 and out[5] == w1 and out[:4] == [None] * 4
    r = Reassembler()
    assert feed6(r, f1[1]) is None
    with pytest.raises(Overlap):
        feed6(r, f1[1])  # a copy overlaps: the datagram is dropped, whichever copy is right
    too_far = IPv6(f1[3])
    too_far[IPv6ExtHdrFragment].offset = 8190  # ends past 65,535 bytes of payload
    with pytest.raises(Overlap):
        feed6(Reassembler(), bytes(too_far))
    atomic = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(id=9)
                   / UDP(sport=1, dport=2) / Raw(b"atomic"))
    assert feed6(Reassembler(), atomic) == bytes(
        IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1, dport=2) / Raw(b"atomic"))


def test_ipv6_fragment_is_found_as_the_kernel_finds_it() -> None:
    """The fragment header behind hop-by-hop and destination options, whatever follows it (a
    first fragment cut inside the rest of the chain); no fragment header, a chain running past
    the packet or an upper layer first: not a fragment."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

    base = IPv6(src="2001:db8::1", dst="2001:db8::2")
    cut = bytes(base / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrFragment(id=5, m=1, nh=60) / Raw(bytes((60, 0, 1, 4, 0, 0, 0, 0))))
    frag = ipv6_fragment(cut)
    assert frag is not None and frag.more and frag.offset == 0 and frag.key[-1] == 5
    assert frag.payload == bytes((60, 0, 1, 4, 0, 0, 0, 0))
    assert IPv6(frag.header)[IPv6ExtHdrDestOpt].nh == 60  # names what the fragment header named
    assert ipv6_fragment(bytes(base / UDP() / Raw(b"whole"))) is None
    assert ipv6_fragment(bytes(base / UDP() / IPv6ExtHdrFragment())) is None  # not in the chain
    past = bytearray(bytes(base / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment() / Raw(b"x" * 8)))
    past[41] = 9  # the options header runs past the packet
    assert ipv6_fragment(bytes(past)) is None
