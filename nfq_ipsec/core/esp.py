"""ESP framing (RFC 4303) for IPv4, transport and tunnel mode; the parts IPv6 shares.

An IPv4 packet is framed here; an IPv6 one in ``esp6``, with the same sealing, opening and
trailer. A tunnel's outer family (its endpoints') is independent of the inner packet's: an
IPv4 packet in an IPv6 tunnel gets an IPv6 outer header, and ``unwrap_tunnel`` takes out an
inner packet of either family (next header 4 or 41).

Outbound: build the ESP header and trailer around an inner packet and seal it with the SA's
suite. Inbound: the checks run in the order that keeps the replay window honest: lengths,
SPI lookup, replay check (no state change), ICV, replay update, trailer, inner packet.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from . import ipv6
from . import packet as ip
from .errors import DropReason, EspError
from .sa import DfPolicy, Encapsulation, Mode, SAParams, SecurityAssociation
from .suites import ENCRYPTION, HMACS
from .udpencap import UDP_HEADER

ESP_HEADER: Final = 8
_ESP: Final = struct.Struct("!II")
_SEQ_HI: Final = struct.Struct("!I")
_PADS: Final = tuple(bytes(range(1, n + 1)) for n in range(256))  # RFC 4303 2.4: 1, 2, 3, ... per pad length
_ECN_MASK: Final = 0x03
_CE: Final = 0x03
_NOT_ECT: Final = 0x00
_ECT1: Final = 0x01


def pad_length(payload_len: int, align: int) -> int:
    """Padding so that payload + padding + 2 trailer bytes is a multiple of ``align``."""
    return -(payload_len + 2) % align


def overhead(sa: SecurityAssociation) -> int:
    """The most bytes ESP adds to a packet on this SA (for MSS clamping and MTU)."""
    return sa.max_overhead


def outer_header_size(params: SAParams) -> int:
    """The tunnel-mode outer header: IPv6 (40 bytes) between IPv6 endpoints, else IPv4."""
    return ipv6.IPV6_HEADER if ipv6.is_v6(params.tunnel_remote) else ip.IPV4_MIN_HEADER


def overhead_for(params: SAParams) -> int:
    """``overhead`` from configuration alone, without building the SA's cipher objects."""
    enc = ENCRYPTION[params.encryption]
    if enc.aead:
        iv, icv, align = 8, 16, 4
    else:
        iv = 16 if params.encryption != "null" else 0
        icv = HMACS[params.integrity or ""].icv_size
        align = 16 if iv else 4
    extra = ESP_HEADER + iv + icv + 2 + align - 1
    if params.mode is Mode.TUNNEL:
        extra += outer_header_size(params)
    if params.encapsulation is Encapsulation.UDP:
        extra += UDP_HEADER
    return extra


def trailer(padlen: int, next_header: int) -> bytes:
    """Padding 1, 2, 3, ... (RFC 4303 section 2.4), pad length and next header."""
    key = (padlen << 8) | next_header
    tail = _TRAILERS.get(key)
    if tail is None:
        tail = _TRAILERS[key] = _PADS[padlen] + bytes((padlen, next_header))
    return tail


_TRAILERS: Final[dict[int, bytes]] = {}  # at most 256 pad lengths x 256 next headers
_FRAGMENT_BITS: Final = ip.FLAG_MF | ip.FRAG_OFFSET_MASK


def encapsulate(sa: SecurityAssociation, data: bytes, hdr: ip.IPv4Header) -> bytes:
    """Protect one IPv4 packet (``hdr`` is its parsed header) on outbound SA ``sa``."""
    total_in = hdr.total_length
    if sa.tunnel:
        inner = data if total_in == len(data) else data[:total_in]
        next_header = ip.PROTO_IPIP
    else:
        if hdr.flags_frag & _FRAGMENT_BITS:
            raise EspError(DropReason.FRAGMENT, "transport mode takes whole datagrams", sa.spi)
        inner = data[hdr.ihl : total_in]
        next_header = hdr.protocol
    seq = sa.take_seq()
    suite = sa.suite
    plaintext = inner + trailer(pad_length(len(inner), suite.align), next_header)
    esp_header = _ESP.pack(sa.spi, seq & 0xFFFFFFFF)
    body = suite.seal(esp_header, _SEQ_HI.pack(seq >> 32) if sa.esn else b"", seq, plaintext)
    if sa.tunnel:
        if sa.outer_v6:  # 4-in-6
            return b"".join((outer_header6(sa, hdr.tos, 0, ESP_HEADER + len(body)), esp_header,
                             body))
        total = ip.IPV4_MIN_HEADER + ESP_HEADER + len(body)
        if total > ip.IPV4_MAX_PACKET:
            raise EspError(DropReason.TOO_BIG, f"{total} bytes", sa.spi)
        df = sa.params.df
        outer = ip.build_header(
            tos=hdr.tos,  # DSCP copied (RFC 4301 5.1.2.1), ECN copied (RFC 6040 normal mode)
            total_length=total,
            ident=seq & 0xFFFF,
            df=df is DfPolicy.SET or (df is DfPolicy.COPY and bool(hdr.flags_frag & ip.FLAG_DF)),
            ttl=sa.params.ttl,
            protocol=ip.PROTO_ESP,
            src=sa.params.tunnel_local or 0,
            dst=sa.params.tunnel_remote or 0,
        )
    else:
        total = hdr.ihl + ESP_HEADER + len(body)
        if total > ip.IPV4_MAX_PACKET:
            raise EspError(DropReason.TOO_BIG, f"{total} bytes", sa.spi)
        outer = ip.replace_header(data, hdr, ip.PROTO_ESP, total)
    return b"".join((outer, esp_header, body))


def seal(sa: SecurityAssociation, inner: bytes, next_header: int) -> tuple[bytes, bytes]:
    """The ESP header and the sealed rest of one packet on outbound SA ``sa``."""
    seq = sa.take_seq()
    suite = sa.suite
    plaintext = inner + trailer(pad_length(len(inner), suite.align), next_header)
    esp_header = _ESP.pack(sa.spi, seq & 0xFFFFFFFF)
    return esp_header, suite.seal(esp_header, _SEQ_HI.pack(seq >> 32) if sa.esn else b"", seq,
                                  plaintext)


def outer_header6(sa: SecurityAssociation, tclass: int, flow: int, payload_length: int) -> bytes:
    """The IPv6 outer header of a tunnel SA with IPv6 endpoints. The traffic class is copied
    (DSCP, RFC 4301 5.1.2.1; ECN, RFC 6040 normal mode), the flow label copied (0 for an IPv4
    inner packet), the hop limit is the SA's ``ttl``."""
    if payload_length > ipv6.IPV6_MAX_PAYLOAD:
        raise EspError(DropReason.TOO_BIG, f"{payload_length} bytes of payload", sa.spi)
    return ipv6.build_header6(tclass, flow, payload_length, ip.PROTO_ESP, sa.params.ttl,
                              sa.params.tunnel_local or 0, sa.params.tunnel_remote or 0)


class Decapsulated:
    """What ``decapsulate`` gives back (a plain class: one is made per packet). Exactly one of
    ``header`` (an IPv4 packet) and ``header6`` (an IPv6 one) is set."""

    __slots__ = ("header", "header6", "packet", "sa", "seq")

    def __init__(self, sa: SecurityAssociation, seq: int, packet: bytes,
                 header: ip.IPv4Header | None, header6: ipv6.IPv6Header | None = None) -> None:
        self.sa = sa
        self.seq = seq
        self.packet = packet  # the packet to pass on
        self.header = header  # its parsed header, IPv4
        self.header6 = header6  # or IPv6


SaLookup = Callable[[int], "SecurityAssociation | None"]


def parse_esp_header(data: bytes, hdr: ip.IPv4Header) -> tuple[int, int]:
    """SPI and 32-bit sequence number of an ESP packet. Raises EspError(MALFORMED)."""
    o = hdr.ihl
    if hdr.total_length < o + ESP_HEADER:
        raise EspError(DropReason.MALFORMED, "shorter than an ESP header")
    spi = (data[o] << 24) | (data[o + 1] << 16) | (data[o + 2] << 8) | data[o + 3]
    seq_lo = (data[o + 4] << 24) | (data[o + 5] << 16) | (data[o + 6] << 8) | data[o + 7]
    return spi, seq_lo


def decapsulate(
    data: bytes, hdr: ip.IPv4Header, lookup: SaLookup, now: float
) -> Decapsulated:
    """Verify and remove ESP from one IPv4 packet. Raises EspError with the drop reason."""
    if hdr.flags_frag & _FRAGMENT_BITS:
        raise EspError(DropReason.FRAGMENT, "ESP fragment (reassemble before ESP)")
    spi, seq_lo = parse_esp_header(data, hdr)
    sa, seq, plaintext = open_esp(data, hdr.ihl, hdr.total_length, spi, seq_lo, lookup, now)
    try:
        end, next_header = strip_trailer(plaintext, seq)
        if sa.tunnel:
            packet, inner, inner6 = unwrap_tunnel(plaintext, end, next_header, hdr.tos & _ECN_MASK)
        else:
            packet, inner = _unwrap_transport(data, hdr, plaintext, end, next_header)
            inner6 = None
    except EspError as err:
        err.spi = spi
        raise
    sa.account(len(packet))
    return Decapsulated(sa, seq, packet, inner, inner6)


def open_esp(
    data: bytes, at: int, end: int, spi: int, seq_lo: int, lookup: SaLookup, now: float,
) -> tuple[SecurityAssociation, int, bytes]:
    """The SA, sequence number and plaintext of the ESP packet at ``data[at:end]``: SPI
    lookup, lifetime, replay check (no state change), ICV, replay update, in that order."""
    sa = lookup(spi)
    if sa is None or sa.outbound:
        raise EspError(DropReason.UNKNOWN_SPI, f"SPI 0x{spi:08x}", spi)
    try:
        sa.check_lifetime(now)
        replay = sa.replay
        seq = replay.infer(seq_lo) if sa.esn else seq_lo
        if not replay.check(seq):
            raise EspError(DropReason.REPLAY, f"seq {seq}", spi)
        esp_header = data[at : at + ESP_HEADER]
        body = data[at + ESP_HEADER : end]
        plaintext = sa.suite.open(esp_header, _SEQ_HI.pack(seq >> 32) if sa.esn else b"", body)
        if seq > sa.replay_limit:  # persist the new floor before the window (and verdict) moves
            sa.allow_top(seq)
        replay.update(seq)
    except EspError as err:
        err.spi = spi
        raise
    return sa, seq, plaintext


def strip_trailer(plaintext: bytes, seq: int) -> tuple[int, int]:
    """Check the ESP trailer: the payload's end in ``plaintext`` and its next header."""
    n = len(plaintext)
    if n < 2:
        raise EspError(DropReason.MALFORMED, "no ESP trailer")
    padlen = plaintext[-2]
    next_header = plaintext[-1]
    end = n - 2 - padlen
    if end < 0:
        raise EspError(DropReason.BAD_PADDING, "pad length beyond payload")
    if padlen and plaintext[end : end + padlen] != _PADS[padlen]:
        raise EspError(DropReason.BAD_PADDING, f"seq {seq}")
    if next_header == ip.PROTO_NONE:
        raise EspError(DropReason.DUMMY, f"seq {seq}")
    return end, next_header


def unwrap_tunnel(
    plaintext: bytes, end: int, next_header: int, outer_ecn: int,
) -> tuple[bytes, ip.IPv4Header | None, ipv6.IPv6Header | None]:
    """The inner packet of a tunnel SA, IPv4 (next header 4) or IPv6 (41), and its parsed
    header; its ECN field merged with the outer one's (RFC 6040)."""
    if next_header == ipv6.NH_IPV6:
        return _unwrap_inner6(plaintext[:end], outer_ecn)
    if next_header != ip.PROTO_IPIP:
        raise EspError(DropReason.BAD_NEXT_HEADER, f"tunnel SA carries next header {next_header}")
    payload = plaintext[:end]
    inner_hdr = ip.parse_ipv4(payload)
    if inner_hdr.total_length < len(payload):  # TFC padding after the inner packet
        payload = payload[: inner_hdr.total_length]
    inner_ecn = inner_hdr.tos & _ECN_MASK
    new_ecn = decap_ecn(inner_ecn, outer_ecn)
    if new_ecn != inner_ecn:
        tos = (inner_hdr.tos & ~_ECN_MASK) | new_ecn
        head = bytearray(payload[: inner_hdr.ihl])
        head[1] = tos
        head[10:12] = b"\0\0"
        head[10:12] = ip.checksum(head).to_bytes(2, "big")
        payload = bytes(head) + payload[inner_hdr.ihl :]
        h = inner_hdr
        inner_hdr = ip.IPv4Header(h.ihl, tos, h.total_length, h.ident, h.flags_frag, h.ttl,
                                  h.protocol, h.src, h.dst)
    return payload, inner_hdr, None


def _unwrap_inner6(
    payload: bytes, outer_ecn: int,
) -> tuple[bytes, ip.IPv4Header | None, ipv6.IPv6Header | None]:
    inner = ipv6.parse_ipv6(payload)
    if inner.total_length < len(payload):  # TFC padding after the inner packet
        payload = payload[: inner.total_length]
    inner_ecn = inner.tclass & _ECN_MASK
    new_ecn = decap_ecn(inner_ecn, outer_ecn)
    if new_ecn != inner_ecn:
        inner.tclass = (inner.tclass & ~_ECN_MASK) | new_ecn
        payload = ipv6.with_tclass(payload, inner.tclass)
    return payload, None, inner


def _unwrap_transport(
    data: bytes, hdr: ip.IPv4Header, plaintext: bytes, end: int, next_header: int,
) -> tuple[bytes, ip.IPv4Header]:
    if next_header == ip.PROTO_IPIP or next_header == ipv6.NH_IPV6:
        raise EspError(DropReason.BAD_NEXT_HEADER, "transport SA carries an IP packet")
    ihl = hdr.ihl
    total = ihl + end
    out = ip.replace_header(data, hdr, next_header, total) + plaintext[:end]
    return out, ip.IPv4Header(ihl, hdr.tos, total, hdr.ident, hdr.flags_frag, hdr.ttl, next_header,
                              hdr.src, hdr.dst)


def decap_ecn(inner: int, outer: int) -> int:
    """RFC 6040 section 4.2: the inner ECN field after decapsulation. CE on Not-ECT drops."""
    if inner == _NOT_ECT:
        if outer == _CE:
            raise EspError(DropReason.MALFORMED, "CE on a Not-ECT inner packet (RFC 6040)")
        return _NOT_ECT
    if outer == _CE:
        return _CE
    if inner == _CE:
        return _CE
    if outer == _ECT1:
        return _ECT1
    return inner
