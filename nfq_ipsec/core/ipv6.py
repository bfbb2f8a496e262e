"""IPv6 header handling (RFC 8200): the fixed header, the extension-header walk, selector keys.

Addresses are plain ints like IPv4's, with one difference: an IPv6 address carries the marker
bit ``V6`` (bit 128) above its 128 bits. So no IPv6 address equals an IPv4 one, a selector
network of one family never matches an address of the other (its mask holds the marker too),
and a flow cache may hold keys of both families. ``addr_str`` prints either.

The walk follows the chain of extension headers from the fixed header to the first header that
is not one of hop-by-hop options, routing, fragment or destination options: the upper-layer
header, or ESP (which ends the chain for us: what follows is encrypted). It is strict: a chain
that runs past the packet, a hop-by-hop header anywhere but first, or more than
``MAX_EXT_HEADERS`` headers is dropped (BAD_EXT_HEADER, EXT_CHAIN_TOO_LONG). An IPv6 packet
is parsed once; the result says where transport-mode ESP goes (RFC 4303 section 3.1.1) and
which byte holds the next header to rewrite.
"""

from __future__ import annotations

from typing import Final

from .errors import DropReason, EspError
from .packet import PROTO_IPIP, PacketKey, ip_to_str

V6: Final = 1 << 128  # the marker bit of an IPv6 address as an int
ADDR_MASK: Final = V6 - 1
IPV6_HEADER: Final = 40
IPV6_MAX_PAYLOAD: Final = 65535  # no jumbograms (RFC 2675)
MIN_MTU: Final = 1280  # every IPv6 link carries 1280-byte packets (RFC 8200 section 5)
MAX_EXT_HEADERS: Final = 8  # more than this before the upper layer: dropped

NH_HOP_BY_HOP: Final = 0
NH_ROUTING: Final = 43
NH_FRAGMENT: Final = 44
NH_DEST_OPTS: Final = 60
NH_ICMPV6: Final = 58
NH_IPV6: Final = 41  # tunnel-mode next header for an inner IPv6 packet
NH_IPV4: Final = PROTO_IPIP
FRAGMENT_HEADER: Final = 8

# ICMPv6 error messages (RFC 4443): destination unreachable, packet too big, time exceeded,
# parameter problem. Each quotes as much of the packet it is about as fits.
ICMPV6_ERROR_TYPES: Final = frozenset((1, 2, 3, 4))
ICMPV6_PACKET_TOO_BIG: Final = 2
# Neighbour discovery (RFC 4861: router and neighbour solicitation and advertisement,
# redirect) and multicast listener discovery (RFC 2710, RFC 3810: query, report, done,
# version 2 report). Without them an IPv6 link does not work at all.
ND_TYPES: Final = frozenset((133, 134, 135, 136, 137))
MLD_TYPES: Final = frozenset((130, 131, 132, 143))
LINK_TYPES: Final = ND_TYPES | MLD_TYPES

_EXT_HEADERS: Final = frozenset((NH_HOP_BY_HOP, NH_ROUTING, NH_FRAGMENT, NH_DEST_OPTS))
_PORTS_PROTOCOLS: Final = frozenset((6, 17, 132))


class IPv6Header:
    """A parsed IPv6 packet: its fixed header and where its extension headers end (a plain
    class for the reason given at :class:`~nfq_ipsec.core.packet.PacketKey`).

    ``protocol`` is the last next header of the walk (the upper layer, or ESP), found at
    ``offset`` and named by the byte at ``nh_at``. ``split`` is where transport-mode ESP goes:
    after the hop-by-hop and routing headers (and the destination options before a routing
    header), the ones a router on the way reads; the byte at ``split_nh_at`` names what
    follows it. ``frag_offset`` is -1 without a fragment header."""

    __slots__ = ("dst", "flow", "frag_offset", "hop_limit", "more_fragments", "nh_at", "offset",
                 "payload_length", "protocol", "split", "split_nh_at", "src", "tclass")

    def __init__(self, tclass: int, flow: int, payload_length: int, hop_limit: int, src: int,
                 dst: int, protocol: int, offset: int, nh_at: int, split: int, split_nh_at: int,
                 frag_offset: int, more_fragments: bool) -> None:
        self.tclass = tclass
        self.flow = flow
        self.payload_length = payload_length
        self.hop_limit = hop_limit
        self.src = src  # with the marker bit V6
        self.dst = dst
        self.protocol = protocol
        self.offset = offset
        self.nh_at = nh_at
        self.split = split
        self.split_nh_at = split_nh_at
        self.frag_offset = frag_offset
        self.more_fragments = more_fragments

    @property
    def total_length(self) -> int:
        return IPV6_HEADER + self.payload_length

    @property
    def is_fragment(self) -> bool:
        return self.frag_offset > 0 or self.more_fragments

    def __repr__(self) -> str:
        return (f"IPv6Header(tclass={self.tclass}, flow={self.flow}, payload_length="
                f"{self.payload_length}, hop_limit={self.hop_limit}, src={addr_str(self.src)}, "
                f"dst={addr_str(self.dst)}, protocol={self.protocol}, offset={self.offset})")


def _addr(data: bytes, at: int) -> int:
    return V6 | int.from_bytes(data[at : at + 16], "big")


def parse_ipv6(data: bytes) -> IPv6Header:
    """Parse an IPv6 packet's headers up to the upper layer (or ESP). Raises EspError:
    MALFORMED (lengths), NOT_IPV4 (another version), BAD_EXT_HEADER, EXT_CHAIN_TOO_LONG."""
    n = len(data)
    if n < IPV6_HEADER:
        raise EspError(DropReason.MALFORMED, "shorter than an IPv6 header")
    if data[0] >> 4 != 6:
        raise EspError(DropReason.NOT_IPV4, f"IP version {data[0] >> 4}")
    plen = (data[4] << 8) | data[5]
    end = IPV6_HEADER + plen
    if end > n:
        raise EspError(DropReason.MALFORMED, "IPv6 payload length beyond the packet")
    nh = data[6]
    nh_at = 6
    off = IPV6_HEADER
    split = IPV6_HEADER
    split_nh_at = 6
    frag_offset = -1
    more = False
    count = 0
    while nh in _EXT_HEADERS:
        if count == MAX_EXT_HEADERS:
            raise EspError(DropReason.EXT_CHAIN_TOO_LONG, f"more than {MAX_EXT_HEADERS} headers")
        if nh == NH_HOP_BY_HOP and count:
            raise EspError(DropReason.BAD_EXT_HEADER, "hop-by-hop options not first")
        if off + 8 > end:
            raise EspError(DropReason.BAD_EXT_HEADER, f"header {nh} cut short")
        count += 1
        if nh == NH_FRAGMENT:
            if frag_offset >= 0:
                raise EspError(DropReason.BAD_EXT_HEADER, "two fragment headers")
            frag_offset = ((data[off + 2] << 8) | data[off + 3]) >> 3
            more = bool(data[off + 3] & 1)
            size = FRAGMENT_HEADER
        else:
            size = (data[off + 1] + 1) * 8
            if off + size > end:
                raise EspError(DropReason.BAD_EXT_HEADER, f"header {nh} cut short")
        if nh in (NH_HOP_BY_HOP, NH_ROUTING):
            split = off + size
            split_nh_at = off
        nh_at = off
        nh = data[off]
        off += size
        if frag_offset > 0:
            break  # a later fragment: what follows is the middle of the upper layer
    return IPv6Header(
        ((data[0] & 0x0F) << 4) | (data[1] >> 4), ((data[1] & 0x0F) << 16) | (data[2] << 8) | data[3],
        plen, data[7], _addr(data, 8), _addr(data, 24), nh, off, nh_at, split, split_nh_at,
        frag_offset, more,
    )


def packet_key6(data: bytes, hdr: IPv6Header) -> PacketKey:
    """Selector fields of an IPv6 packet: the last next header is the protocol; ports (or the
    ICMPv6 type and code) are None for later fragments and short packets."""
    sport: int | None = None
    dport: int | None = None
    proto = hdr.protocol
    off = hdr.offset
    end = hdr.total_length
    if hdr.frag_offset <= 0:
        if proto in _PORTS_PROTOCOLS and end >= off + 4:
            sport = (data[off] << 8) | data[off + 1]
            dport = (data[off + 2] << 8) | data[off + 3]
        elif proto == NH_ICMPV6 and end >= off + 2:
            sport = data[off]
            dport = data[off + 1]
    return PacketKey(hdr.src, hdr.dst, proto, sport, dport)


def is_link_message(data: bytes, hdr: IPv6Header) -> bool:
    """Neighbour discovery or MLD (``LINK_TYPES``): what an IPv6 link needs to work."""
    return (hdr.protocol == NH_ICMPV6 and hdr.frag_offset < 0
            and hdr.total_length > hdr.offset and data[hdr.offset] in LINK_TYPES)


def quoted_key6(data: bytes, hdr: IPv6Header) -> PacketKey | None:
    """For an ICMPv6 error: the selector fields of the packet it quotes (RFC 4301 section 6.2),
    or None for any other packet and for a quote too short or too odd to walk."""
    off = hdr.offset
    end = hdr.total_length
    if (hdr.protocol != NH_ICMPV6 or hdr.frag_offset >= 0 or end < off + 8
            or data[off] not in ICMPV6_ERROR_TYPES):
        return None
    q = off + 8
    try:  # the quote is cut wherever the error's size ran out: walk what there is
        quote = data[q:end]
        if len(quote) >= IPV6_HEADER and quote[0] >> 4 == 6:
            plen = len(quote) - IPV6_HEADER
            quote = quote[:4] + bytes((plen >> 8, plen & 0xFF)) + quote[6:]
        inner = parse_ipv6(quote)
    except EspError:
        return None
    return packet_key6(quote, inner)


def build_header6(tclass: int, flow: int, payload_length: int, next_header: int, hop_limit: int,
                  src: int, dst: int) -> bytes:
    """A fresh 40-byte IPv6 header (tunnel-mode outer header); addresses with or without V6."""
    first = (0x60000000 | (tclass << 20) | (flow & 0xFFFFF)).to_bytes(4, "big")
    return b"".join((first, payload_length.to_bytes(2, "big"), bytes((next_header, hop_limit)),
                     (src & ADDR_MASK).to_bytes(16, "big"), (dst & ADDR_MASK).to_bytes(16, "big")))


def rewrite6(head: bytes, nh_at: int, next_header: int, payload_length: int) -> bytes:
    """The headers ``head`` (fixed header and extension headers) with a new payload length and
    the next header at ``nh_at`` replaced. IPv6 has no header checksum to redo."""
    out = bytearray(head)
    out[4] = payload_length >> 8
    out[5] = payload_length & 0xFF
    out[nh_at] = next_header
    return bytes(out)


def with_tclass(data: bytes, tclass: int) -> bytes:
    """The packet with a new traffic class (the flow label kept)."""
    out = bytearray(data[:2])
    out[0] = 0x60 | (tclass >> 4)
    out[1] = ((tclass & 0x0F) << 4) | (data[1] & 0x0F)
    return bytes(out) + data[2:]


def addr_str(addr: int) -> str:
    """An address int of either family as text (IPv6 compressed as RFC 5952 says)."""
    if not addr & V6:
        return ip_to_str(addr)
    value = addr & ADDR_MASK
    groups = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_at, best_len, run_at, run_len = -1, 0, -1, 0
    for i, g in enumerate(groups):
        if g == 0:
            if run_len == 0:
                run_at = i
            run_len += 1
            if run_len > best_len:
                best_at, best_len = run_at, run_len
        else:
            run_len = 0
    if best_len < 2:
        return ":".join(f"{g:x}" for g in groups)
    head = ":".join(f"{g:x}" for g in groups[:best_at])
    tail = ":".join(f"{g:x}" for g in groups[best_at + best_len :])
    return f"{head}::{tail}"


def is_v6(addr: int | None) -> bool:
    return addr is not None and bool(addr & V6)


def fragment_packet(data: bytes, hdr: IPv6Header, mtu: int, ident: int) -> list[bytes]:
    """``data`` (parsed as ``hdr``) cut into fragments of at most ``mtu`` bytes, as its source
    may (RFC 8200 section 4.5): the headers before ``hdr.protocol`` (at ``hdr.offset``) are
    the unfragmentable part, repeated in every fragment with a fragment header after it;
    what follows is cut at multiples of 8 bytes. For an ESP packet (RFC 4303 section 3.3.4:
    ESP is fragmented after it is made)."""
    unfrag = bytearray(data[:hdr.offset])
    inner_nh = unfrag[hdr.nh_at]
    unfrag[hdr.nh_at] = NH_FRAGMENT
    body = data[hdr.offset:hdr.total_length]
    step = (mtu - len(unfrag) - FRAGMENT_HEADER) & ~7
    if step <= 0:
        raise EspError(DropReason.TOO_BIG, f"headers of {len(unfrag)} bytes leave no room in {mtu}")
    out = []
    for at in range(0, len(body), step):
        chunk = body[at:at + step]
        more = 1 if at + len(chunk) < len(body) else 0
        plen = len(unfrag) - IPV6_HEADER + FRAGMENT_HEADER + len(chunk)
        unfrag[4], unfrag[5] = plen >> 8, plen & 0xFF
        frag = bytes((inner_nh, 0, at >> 8, (at & 0xF8) | more)) + ident.to_bytes(4, "big")
        out.append(bytes(unfrag) + frag + chunk)
    return out
