"""IPv4 header handling: the one place that knows the address family.

Parsing reads header fields by byte index into plain ints; nothing here allocates address objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from .errors import DropReason, EspError

IPV4_MIN_HEADER: Final = 20
IPV4_MAX_PACKET: Final = 65535
PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_SCTP: Final = 132
PROTO_ESP: Final = 50
PROTO_IPIP: Final = 4  # tunnel-mode next header for an inner IPv4 packet
PROTO_NONE: Final = 59  # "no next header": an ESP dummy packet

_HDR: Final = struct.Struct("!BBHHHBBHII")  # ver/ihl, tos, total, id, flags/frag, ttl, proto, csum, src, dst
_H: Final = struct.Struct("!H")

FLAG_DF: Final = 0x4000
FLAG_MF: Final = 0x2000
FRAG_OFFSET_MASK: Final = 0x1FFF


class PacketKey:
    """What SPD selectors look at. For ICMP, sport/dport carry type/code.

    A value: compared and hashed by its fields (the flow caches key on it), never changed
    after it is made. A plain class rather than a NamedTuple: one is made per packet, and a
    compiled plain class is built about five times faster (a NamedTuple's constructor is
    Python code even in the compiled core)."""

    __slots__ = ("dport", "dst", "protocol", "sport", "src")

    def __init__(self, src: int, dst: int, protocol: int, sport: int | None,
                 dport: int | None) -> None:
        self.src = src
        self.dst = dst
        self.protocol = protocol
        self.sport = sport
        self.dport = dport

    def fields(self) -> tuple[int, int, int, int | None, int | None]:
        return (self.src, self.dst, self.protocol, self.sport, self.dport)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PacketKey):
            return NotImplemented
        return (self.src == other.src and self.dst == other.dst and self.protocol == other.protocol
                and self.sport == other.sport and self.dport == other.dport)

    def __hash__(self) -> int:
        return hash(self.fields())

    def __iter__(self) -> Iterator[int | None]:
        return iter(self.fields())

    def __repr__(self) -> str:
        return (f"PacketKey(src={self.src}, dst={self.dst}, protocol={self.protocol}, "
                f"sport={self.sport}, dport={self.dport})")


class IPv4Header:
    """A parsed IPv4 header (a value, never changed after it is made; a plain class for the
    reason given at :class:`PacketKey`)."""

    __slots__ = (
        "dst",
        "flags_frag",
        "ident",
        "ihl",
        "protocol",
        "src",
        "tos",
        "total_length",
        "ttl",
    )

    def __init__(self, ihl: int, tos: int, total_length: int, ident: int, flags_frag: int,
                 ttl: int, protocol: int, src: int, dst: int) -> None:
        self.ihl = ihl  # header length in bytes
        self.tos = tos
        self.total_length = total_length
        self.ident = ident
        self.flags_frag = flags_frag
        self.ttl = ttl
        self.protocol = protocol
        self.src = src
        self.dst = dst

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (FLAG_MF | FRAG_OFFSET_MASK))

    def fields(self) -> tuple[int, int, int, int, int, int, int, int, int]:
        return (self.ihl, self.tos, self.total_length, self.ident, self.flags_frag, self.ttl,
                self.protocol, self.src, self.dst)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IPv4Header):
            return NotImplemented
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        return (f"IPv4Header(ihl={self.ihl}, tos={self.tos}, total_length={self.total_length}, "
                f"ident={self.ident}, flags_frag=0x{self.flags_frag:04x}, ttl={self.ttl}, "
                f"protocol={self.protocol}, src={ip_to_str(self.src)}, dst={ip_to_str(self.dst)})")


IPV6_HEADER: Final = 40


def declared_length(data: bytes) -> int:
    """The length a packet's own header claims (IPv4 total length, IPv6 payload length plus
    its fixed header), whatever the family; 0 when the header is too short to say or the
    version is neither. For telling a packet delivered whole from one cut short."""
    n = len(data)
    if n >= 4 and data[0] >> 4 == 4:
        return (data[2] << 8) | data[3]
    if n >= 6 and data[0] >> 4 == 6:
        return IPV6_HEADER + ((data[4] << 8) | data[5])
    return 0


def parse_ipv4(data: bytes) -> IPv4Header:
    """Parse and sanity-check an IPv4 header. Raises EspError(MALFORMED/NOT_IPV4).

    Reads the bytes by index: compiled, that is a few machine instructions per field, where a
    ``struct`` call boxes ten integers into a tuple first (about three times the time)."""
    n = len(data)
    if n < IPV4_MIN_HEADER:
        raise EspError(DropReason.MALFORMED, "shorter than an IPv4 header")
    vihl = data[0]
    if vihl >> 4 != 4:
        raise EspError(DropReason.NOT_IPV4, f"IP version {vihl >> 4}")
    ihl = (vihl & 0x0F) * 4
    total = (data[2] << 8) | data[3]
    if ihl < IPV4_MIN_HEADER or total < ihl or total > n:
        raise EspError(DropReason.MALFORMED, "inconsistent IPv4 lengths")
    return IPv4Header(
        ihl, data[1], total, (data[4] << 8) | data[5], (data[6] << 8) | data[7], data[8], data[9],
        (data[12] << 24) | (data[13] << 16) | (data[14] << 8) | data[15],
        (data[16] << 24) | (data[17] << 16) | (data[18] << 8) | data[19],
    )


def packet_key(data: bytes, hdr: IPv4Header) -> PacketKey:
    """Selector fields of a packet. Ports are None for non-first fragments and short packets."""
    sport: int | None = None
    dport: int | None = None
    if not hdr.flags_frag & FRAG_OFFSET_MASK:
        off = hdr.ihl
        proto = hdr.protocol
        if proto in (PROTO_TCP, PROTO_UDP, PROTO_SCTP) and hdr.total_length >= off + 4:
            sport = (data[off] << 8) | data[off + 1]
            dport = (data[off + 2] << 8) | data[off + 3]
        elif proto == PROTO_ICMP and hdr.total_length >= off + 2:
            sport = data[off]
            dport = data[off + 1]
    return PacketKey(hdr.src, hdr.dst, hdr.protocol, sport, dport)


# ICMP error messages (RFC 792): destination unreachable, source quench, redirect, time
# exceeded, parameter problem. Each quotes the IP header and at least 8 bytes of the packet it
# is about.
ICMP_ERROR_TYPES: Final = frozenset((3, 4, 5, 11, 12))
ICMP_HEADER: Final = 8


def quoted_key(data: bytes, hdr: IPv4Header) -> PacketKey | None:
    """For an ICMP error message: the selector fields of the packet it quotes, which RFC 4301
    section 6.2 matches against the SPD instead of the error's own header. None for any other
    packet, and for an error whose quote is too short to hold an IPv4 header."""
    off = hdr.ihl
    end = hdr.total_length
    if (hdr.protocol != PROTO_ICMP or hdr.flags_frag & FRAG_OFFSET_MASK or end < off + 1
            or data[off] not in ICMP_ERROR_TYPES):
        return None
    q = off + ICMP_HEADER
    if end < q + IPV4_MIN_HEADER or data[q] >> 4 != 4:
        return None
    qihl = (data[q] & 0x0F) * 4
    if qihl < IPV4_MIN_HEADER or end < q + qihl:
        return None
    proto = data[q + 9]
    src = (data[q + 12] << 24) | (data[q + 13] << 16) | (data[q + 14] << 8) | data[q + 15]
    dst = (data[q + 16] << 24) | (data[q + 17] << 16) | (data[q + 18] << 8) | data[q + 19]
    sport: int | None = None
    dport: int | None = None
    l4 = q + qihl
    if not ((data[q + 6] << 8) | data[q + 7]) & FRAG_OFFSET_MASK:
        if proto in (PROTO_TCP, PROTO_UDP, PROTO_SCTP) and end >= l4 + 4:
            sport = (data[l4] << 8) | data[l4 + 1]
            dport = (data[l4 + 2] << 8) | data[l4 + 3]
        elif proto == PROTO_ICMP and end >= l4 + 2:
            sport = data[l4]
            dport = data[l4 + 1]
    return PacketKey(src, dst, proto, sport, dport)


_WORDS: Final[dict[int, struct.Struct]] = {}


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
    data: bytes, hdr: IPv4Header, protocol: int, total_length: int
) -> bytes:
    """``rewrite_header(data[:hdr.ihl], protocol, total_length)``. A header without options (the
    per-packet case; ``hdr`` is its parse) gets the checksum computed from ``hdr``'s fields and
    the three changed fields patched in, without the byte-wise checksum pass."""
    if hdr.ihl != IPV4_MIN_HEADER:
        return rewrite_header(data[: hdr.ihl], protocol, total_length)
    csum = _header_checksum(hdr.tos, total_length, hdr.ident, hdr.flags_frag, hdr.ttl, protocol,
                            hdr.src, hdr.dst)
    out = bytearray(data[:IPV4_MIN_HEADER])
    out[2] = total_length >> 8
    out[3] = total_length & 0xFF
    out[9] = protocol
    out[10] = csum >> 8
    out[11] = csum & 0xFF
    return bytes(out)


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
