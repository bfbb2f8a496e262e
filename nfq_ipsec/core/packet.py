"""IPv4 header handling: the one place that knows the address family.

Parsing uses precompiled structs and returns plain ints; nothing here allocates address objects.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import DropReason, EspError

IPV4_MIN_HEADER = 20
IPV4_MAX_PACKET = 65535
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ESP = 50
PROTO_IPIP = 4  # tunnel-mode next header for an inner IPv4 packet
PROTO_NONE = 59  # "no next header": an ESP dummy packet

_HDR = struct.Struct("!BBHHHBBHII")  # ver/ihl, tos, total, id, flags/frag, ttl, proto, csum, src, dst
_PORTS = struct.Struct("!HH")
_ICMP_TC = struct.Struct("!BB")
_H = struct.Struct("!H")

FLAG_DF = 0x4000
FLAG_MF = 0x2000
FRAG_OFFSET_MASK = 0x1FFF


class PacketKey(NamedTuple):
    """What SPD selectors look at. For ICMP, sport/dport carry type/code."""

    src: int
    dst: int
    protocol: int
    sport: int | None
    dport: int | None


class IPv4Header(NamedTuple):
    ihl: int  # header length in bytes
    tos: int
    total_length: int
    ident: int
    flags_frag: int
    ttl: int
    protocol: int
    src: int
    dst: int

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (FLAG_MF | FRAG_OFFSET_MASK))


def parse_ipv4(data: bytes | bytearray | memoryview) -> IPv4Header:
    """Parse and sanity-check an IPv4 header. Raises EspError(MALFORMED/NOT_IPV4)."""
    if len(data) < IPV4_MIN_HEADER:
        raise EspError(DropReason.MALFORMED, "shorter than an IPv4 header")
    vihl, tos, total, ident, flags_frag, ttl, proto, _csum, src, dst = _HDR.unpack_from(data)
    if vihl >> 4 != 4:
        raise EspError(DropReason.NOT_IPV4, f"IP version {vihl >> 4}")
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER or total < ihl or total > len(data):
        raise EspError(DropReason.MALFORMED, "inconsistent IPv4 lengths")
    return IPv4Header(ihl, tos, total, ident, flags_frag, ttl, proto, src, dst)


def packet_key(data: bytes | bytearray | memoryview, hdr: IPv4Header) -> PacketKey:
    """Selector fields of a packet. Ports are None for non-first fragments and short packets."""
    sport: int | None = None
    dport: int | None = None
    if not hdr.flags_frag & FRAG_OFFSET_MASK:
        off = hdr.ihl
        if hdr.protocol in (PROTO_TCP, PROTO_UDP, 132) and hdr.total_length >= off + 4:
            sport, dport = _PORTS.unpack_from(data, off)
        elif hdr.protocol == PROTO_ICMP and hdr.total_length >= off + 2:
            sport, dport = _ICMP_TC.unpack_from(data, off)
    return PacketKey(hdr.src, hdr.dst, hdr.protocol, sport, dport)


_WORDS: dict[int, struct.Struct] = {}


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum (header-sized inputs; no per-byte loop)."""
    n = len(data)
    if n % 2:
        data = bytes(data) + b"\0"
        n += 1
    words = _WORDS.get(n)
    if words is None:
        words = _WORDS[n] = struct.Struct(f"!{n // 2}H")
    total: int = sum(words.unpack(data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _header_checksum(
    tos: int, total_length: int, ident: int, flags_frag: int, ttl: int, protocol: int, src: int,
    dst: int,
) -> int:
    """RFC 1071 checksum of a 20-byte header (no options) from its fields, without packing it."""
    s = (0x4500 | tos) + total_length + ident + flags_frag + ((ttl << 8) | protocol) \
        + (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def replace_header(
    data: bytes | bytearray | memoryview, hdr: IPv4Header, protocol: int, total_length: int
) -> bytes:
    """``rewrite_header(data[:hdr.ihl], protocol, total_length)``; a header without options is
    packed from ``hdr``'s fields in one step (the per-packet case)."""
    if hdr.ihl != IPV4_MIN_HEADER:
        return rewrite_header(data[: hdr.ihl], protocol, total_length)
    tos, ident, ff, ttl, src, dst = hdr.tos, hdr.ident, hdr.flags_frag, hdr.ttl, hdr.src, hdr.dst
    return _HDR.pack(0x45, tos, total_length, ident, ff, ttl, protocol,
                     _header_checksum(tos, total_length, ident, ff, ttl, protocol, src, dst), src, dst)


def rewrite_header(
    header: bytes | bytearray | memoryview, protocol: int, total_length: int
) -> bytes:
    """The same IPv4 header (options kept) with a new protocol and length, checksum redone."""
    hdr = bytearray(header)
    _H.pack_into(hdr, 2, total_length)
    hdr[9] = protocol
    hdr[10:12] = b"\0\0"
    _H.pack_into(hdr, 10, checksum(hdr))
    return bytes(hdr)


def build_header(
    *, tos: int, total_length: int, ident: int, df: bool, ttl: int, protocol: int,
    src: int, dst: int,
) -> bytes:
    """A fresh 20-byte IPv4 header (tunnel-mode outer header)."""
    ff = FLAG_DF if df else 0
    return _HDR.pack(0x45, tos, total_length, ident, ff, ttl, protocol,
                     _header_checksum(tos, total_length, ident, ff, ttl, protocol, src, dst), src, dst)


def ip_to_str(addr: int) -> str:
    return ".".join(str((addr >> s) & 0xFF) for s in (24, 16, 8, 0))
