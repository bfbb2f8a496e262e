"""Reassembly of captured IP fragments (nfq_ipsec/reassembly.py), checked against scapy's own
fragmentation: any order, several datagrams at once, and fail closed on overlap or overflow."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.packet import Raw

from nfq_ipsec.core import packet as ip
from nfq_ipsec.reassembly import Overlap, Reassembler, ipv4_fragment, ipv4_whole


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
