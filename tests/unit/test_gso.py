"""The core's TCP segmentation of GSO superpackets (``core/gso.py``) and the processor's path
for a GSO queue's packets (``Processor.process_offloaded``), checked by scapy: it parses every
segment, recomputes its checksums itself and reassembles the byte stream; the kernel's own
segmentation is the lab test's reference (``tests/lab/test_gso.py``)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest
import sas
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.sctp import SCTP

from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
    DropReason,
    EspError,
    Policy,
    Processor,
    SADirection,
    Selector,
    Verdict,
    gso,
    ipv6,
)
from nfq_ipsec.core import packet as ip
from nfq_ipsec.core.processor import ARRIVING, DEFAULT_MSS4, DEFAULT_MSS6, LEAVING

A4, B4 = "10.0.0.1", "10.0.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
DATA = bytes((i * 7 + 3) & 0xFF for i in range(9999))
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1234, 5678))]


def superpacket(v6: bool, payload: bytes = DATA, flags: str = "PA", seq: int = 4000) -> bytes:
    """A local superpacket as the queue hands it over: its TCP checksum the pseudo-header sum
    only (a wrong value for the whole), the IPv4 header checksum right."""
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=77, flags=flags, window=501, options=TS,
              chksum=0x1234)
    if v6:
        return bytes(IPv6(src=A6, dst=B6, tc=0x20, fl=0x12345, hlim=63) / tcp / payload)
    return bytes(IP(src=A4, dst=B4, id=0xFFFE, flags="DF", tos=0x20, ttl=63) / tcp / payload)


def parsed(seg: bytes, v6: bool) -> IP | IPv6:
    return IPv6(seg) if v6 else IP(seg)


def recomputed(pkt: IP | IPv6) -> bytes:
    """The packet with every checksum recomputed by scapy."""
    again = pkt.copy()
    del again[TCP].chksum
    if not isinstance(again, IPv6):
        del again.chksum
    return bytes(again.__class__(bytes(again)))


def cut(data: bytes, size: int) -> list[bytes]:
    if data[0] >> 4 == 6:
        return gso.segment6(data, ipv6.parse_ipv6(data), size)
    return gso.segment4(data, ip.parse_ipv4(data), size)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(("size", "flags"), [(1000, "PA"), (1448, "FPAUCE"), (1001, "A"),
                                             (9999, "PA"), (20000, "FA")])
def test_segments_are_what_tcp_segmentation_makes(v6: bool, size: int, flags: str) -> None:
    sp = superpacket(v6, flags=flags)
    orig = parsed(sp, v6)
    segs = cut(sp, size)
    assert len(segs) == -(-len(DATA) // size)
    stream = b""
    for i, seg in enumerate(segs):
        p = parsed(seg, v6)
        assert bytes(seg) == recomputed(p), f"segment {i}: a checksum is wrong"
        tcp = p[TCP]
        first, last = i == 0, i == len(segs) - 1
        assert tcp.seq == orig[TCP].seq + i * size
        assert (tcp.sport, tcp.dport, tcp.ack, tcp.window, tcp.urgptr) == (
            40000, 5201, 77, 501, orig[TCP].urgptr)
        assert tcp.options == orig[TCP].options
        want = int(orig[TCP].flags)
        if not first:
            want &= ~0x80  # CWR on the first only
        if not last:
            want &= ~0x09  # FIN and PSH on the last only
        assert int(tcp.flags) == want, (i, tcp.flags)
        body = bytes(tcp.payload)
        assert len(body) == (size if not last else len(DATA) - i * size)
        stream += body
        if v6:
            assert (p.tc, p.fl, p.hlim, p.plen) == (0x20, 0x12345, 63, len(seg) - 40)
        else:
            assert (p.id, p.flags, p.tos, p.ttl, p.len) == ((0xFFFE + i) & 0xFFFF, orig.flags,
                                                            0x20, 63, len(seg))
    assert stream == DATA


def test_sequence_numbers_wrap() -> None:
    segs = cut(superpacket(False, seq=0xFFFFFF00), 1000)
    assert [IP(s)[TCP].seq for s in segs[:3]] == [0xFFFFFF00, (0xFFFFFF00 + 1000) & 0xFFFFFFFF,
                                                  (0xFFFFFF00 + 2000) & 0xFFFFFFFF]


@pytest.mark.parametrize("packet", [
    bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / DATA),  # UDP GSO
    bytes(IP(src=A4, dst=B4, options=[b"\x01\x01\x01\x00"]) / TCP() / DATA),  # IPv4 options
    bytes(IP(src=A4, dst=B4, flags="MF") / TCP() / DATA),  # a fragment
    bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / TCP() / DATA),  # an extension header
    bytes(IP(src=A4, dst=B4) / TCP(dataofs=15) / (b"x" * 20)),  # a TCP header past the end
], ids=["udp", "ip-options", "fragment", "ext-header", "tcp-header"])
def test_what_is_not_cut_as_the_kernel_would_is_refused(packet: bytes) -> None:
    with pytest.raises(EspError) as err:
        cut(packet, 1000)
    assert err.value.reason is DropReason.GSO_UNSUPPORTED


def test_a_segment_size_too_small_is_refused() -> None:
    with pytest.raises(EspError) as err:
        cut(superpacket(False), gso.MIN_SEGMENT - 1)
    assert err.value.reason is DropReason.GSO_UNSUPPORTED


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_partial_checksum_is_completed(v6: bool, proto: str) -> None:
    l4 = TCP(sport=1, dport=2, chksum=0xBEEF) if proto == "tcp" else UDP(sport=1, dport=2,
                                                                          chksum=0xBEEF)
    data = bytes((IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)) / l4 / DATA[:777])
    done = (gso.complete6(data, ipv6.parse_ipv6(data)) if v6
            else gso.complete4(data, ip.parse_ipv4(data)))
    p = parsed(done, v6)
    layer = TCP if proto == "tcp" else UDP
    again = p.copy()
    del again[layer].chksum
    assert done == bytes(again.__class__(bytes(again)))
    assert done != data


def test_a_partial_checksum_of_another_protocol_is_refused() -> None:
    data = bytes(IP(src=A4, dst=B4) / SCTP(sport=1, dport=2) / DATA[:40])
    with pytest.raises(EspError) as err:
        gso.complete4(data, ip.parse_ipv4(data))
    assert err.value.reason is DropReason.CHECKSUM_PARTIAL


def test_syn_mss() -> None:
    def header(**kw: object) -> bytes:
        return bytes(TCP(**kw))  # type: ignore[arg-type]

    syn = header(flags="SA", options=[("NOP", None), ("MSS", 1360), ("SAckOK", b"")])
    assert gso.syn_mss(syn, 0, len(syn)) == 1360
    no_syn = header(flags="A", options=[("MSS", 1360)])
    assert gso.syn_mss(no_syn, 0, len(no_syn)) == 0
    none = header(flags="S", options=[("SAckOK", b"")])
    assert gso.syn_mss(none, 0, len(none)) == 0
    bad = bytearray(header(flags="S", options=[("MSS", 1360)]))
    bad[21] = 9  # an option length past the header
    assert gso.syn_mss(bytes(bad), 0, len(bad)) == 0


# -- the processor ------------------------------------------------------------------------------
def pair(v6: bool, protect: bool = True, mtu: int = 1500) -> tuple[Processor, Processor]:
    """Host A (the superpackets' sender) and host B, one transport SA each way."""
    net = IPv6Network if v6 else IPv4Network
    a, b = (A6, B6) if v6 else (A4, B4)
    action = Action.PROTECT if protect else Action.BYPASS

    def host(me: str, peer: str, out_spi: int, in_spi: int) -> Processor:
        sel = Selector(net(f"{me}/{128 if v6 else 32}"), net(f"{peer}/{128 if v6 else 32}"))
        return Processor(SPD([Policy("p", sel, action, Direction.BOTH,
                                     ("out", "in") if protect else ())]),
                         [sas.params("out", out_spi, SADirection.OUT),
                          sas.params("in", in_spi, SADirection.IN)] if protect else [],
                         0.0, mtu=mtu)

    pa, pb = host(a, b, 0x100, 0x200), host(b, a, 0x200, 0x100)
    pa.learn_mss = pb.learn_mss = True
    return pa, pb


def fits(mtu: int, ip_header: int, tcp_header: int) -> int:
    """The most TCP payload behind these IP and TCP headers whose AES-GCM transport
    ESP packet fits ``mtu`` (RFC 4303, RFC 4106: 8 header, 8 IV, the ciphertext of payload,
    padding and 2 trailer bytes aligned to 4, a 16-byte ICV)."""
    payload = mtu
    while ip_header + 8 + 8 + -(-(tcp_header + payload + 2) // 4) * 4 + 16 > mtu:
        payload -= 1
    return payload


def syn_ack(v6: bool, mss: int) -> bytes:
    tcp = TCP(sport=5201, dport=40000, flags="SA", options=[("MSS", mss)])
    return bytes((IPv6(src=B6, dst=A6) if v6 else IP(src=B4, dst=A4)) / tcp)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mss", [None, 1000, 9000])
def test_a_superpacket_is_cut_sealed_in_order_and_opened_by_the_peer(
        v6: bool, mss: int | None) -> None:
    pa, pb = pair(v6)
    if mss is not None:  # B's SYN-ACK, through B's SA, teaches A the MSS B announced
        res = pb.process(syn_ack(v6, mss), 0, LEAVING, 1.0)
        assert res.packet is not None
        assert pa.process(res.packet, len(res.packet), ARRIVING, 1.0).verdict is Verdict.ACCEPT
    sp = superpacket(v6)
    res = pa.process_offloaded(sp, len(sp), LEAVING, 2.0, True)
    assert res.verdict is Verdict.REPLACE and res.packets is not None
    options = 12
    size = min(fits(1500, 40 if v6 else 20, 20 + options),
               (mss or (DEFAULT_MSS6 if v6 else DEFAULT_MSS4)) - options)
    want = cut(sp, size)
    assert len(res.packets) == len(want) == pa.segments and pa.superpackets == 1
    seqs = []
    for packet, seg in zip(res.packets, want, strict=True):
        assert len(packet) <= 1500
        opened = pb.process(packet, len(packet), ARRIVING, 2.0)
        assert opened.verdict is Verdict.ACCEPT, opened
        assert opened.packet == seg  # the kernel would take it as it is: checksums right
        seqs.append(opened.seq)
    assert seqs == list(range(1, len(want) + 1))
    out = pa.sad.by_name("out")
    assert out is not None and out.packets == len(want)


def test_the_path_mtu_bounds_the_segments() -> None:
    pa, pb = pair(False, mtu=1200)
    res = pb.process(syn_ack(False, 1460), 0, LEAVING, 1.0)
    assert res.packet is not None
    pa.process(res.packet, len(res.packet), ARRIVING, 1.0)
    sp = superpacket(False)
    res = pa.process_offloaded(sp, len(sp), LEAVING, 2.0, True)
    assert res.packets is not None
    assert len(res.packets) == -(-len(DATA) // fits(1200, 20, 32))
    assert max(len(p) for p in res.packets) <= 1200


def test_bypassed_superpackets_and_partial_checksums_go_to_the_kernel_unchanged() -> None:
    pa, _ = pair(False, protect=False)
    sctp = bytes(IP(src=A4, dst=B4) / SCTP(sport=1, dport=2) / DATA[:40])
    for packet, superpacket_ in ((superpacket(False), True), (superpacket(False, DATA[:100]), False),
                                 (sctp, False)):
        res = pa.process_offloaded(packet, len(packet), LEAVING, 1.0, superpacket_)
        assert res.verdict is Verdict.ACCEPT and res.packet is None
    assert not pa.drops


def test_a_protected_partial_checksum_of_another_protocol_is_dropped() -> None:
    pa, _ = pair(False)
    sctp = bytes(IP(src=A4, dst=B4) / SCTP(sport=1, dport=2) / DATA[:40])
    res = pa.process_offloaded(sctp, len(sctp), LEAVING, 1.0, False)
    assert res.verdict is Verdict.DROP and res.reason is DropReason.CHECKSUM_PARTIAL
    assert pa.drops[DropReason.CHECKSUM_PARTIAL] == 1


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_single_packet_with_a_partial_checksum_is_completed_then_sealed(v6: bool) -> None:
    pa, pb = pair(v6)
    sp = superpacket(v6, payload=DATA[:500])
    res = pa.process_offloaded(sp, len(sp), LEAVING, 1.0, False)
    assert res.verdict is Verdict.ACCEPT and res.packet is not None
    opened = pb.process(res.packet, len(res.packet), ARRIVING, 1.0)
    assert opened.packet is not None
    assert opened.packet == recomputed(parsed(sp, v6))


def test_what_cant_be_cut_is_dropped_and_counted() -> None:
    pa, _ = pair(False)
    packet = bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / DATA)
    res = pa.process_offloaded(packet, len(packet), LEAVING, 1.0, True)
    assert res.verdict is Verdict.DROP and res.reason is DropReason.GSO_UNSUPPORTED
    assert pa.drops[DropReason.GSO_UNSUPPORTED] == 1
    out = pa.sad.by_name("out")
    assert out is not None and out.drops[DropReason.GSO_UNSUPPORTED] == 1 and out.packets == 0


def test_a_truncated_superpacket_is_dropped() -> None:
    pa, _ = pair(False)
    sp = superpacket(False)
    res = pa.process_offloaded(sp[:-10], len(sp), LEAVING, 1.0, True)
    assert res.reason is DropReason.TRUNCATED
