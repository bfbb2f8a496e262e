"""IP headers as the wire has them (RFC 791, RFC 8200), and what an SPD looks at.

Addresses are ``ipaddress`` objects here (clarity over speed); a packet's selector view is a
``Flow``. Every refusal raises ``Refused`` with the drop reason's name, the same names the
data plane counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

ICMP: Final = 1
IPIP: Final = 4
TCP: Final = 6
UDP: Final = 17
IPV6_IN: Final = 41  # tunnel-mode next header of an inner IPv6 packet
ESP: Final = 50
ICMPV6: Final = 58
NO_NEXT: Final = 59
SCTP: Final = 132
PORT_PROTOCOLS: Final = (TCP, UDP, SCTP)

HOP_BY_HOP: Final = 0
ROUTING: Final = 43
FRAGMENT: Final = 44
DEST_OPTS: Final = 60
EXTENSIONS: Final = (HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS)
MAX_EXTENSIONS: Final = 8

DF: Final = 0x4000
MF: Final = 0x2000
OFFSET: Final = 0x1FFF

ICMP_ERRORS: Final = (3, 4, 5, 11, 12)  # RFC 792
ICMPV6_ERRORS: Final = (1, 2, 3, 4)  # RFC 4443
LINK_LOCAL_TYPES: Final = (130, 131, 132, 143, 133, 134, 135, 136, 137)  # MLD, ND

Address = IPv4Address | IPv6Address


class Refused(Exception):
    """A packet this implementation drops; ``reason`` is the drop reason's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Flow:
    """The selector fields of a packet (RFC 4301 4.4.1.1): ports, or ICMP type and code in
    their place; None where a packet has none to read."""

    src: Address
    dst: Address
    protocol: int
    sport: int | None
    dport: int | None


def internet_checksum(data: bytes) -> int:
    """RFC 1071."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def _ports(protocol: int, l4: bytes) -> tuple[int | None, int | None]:
    if protocol in PORT_PROTOCOLS and len(l4) >= 4:
        return int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big")
    if protocol in (ICMP, ICMPV6) and len(l4) >= 2:
        return l4[0], l4[1]
    return None, None


# -- IPv4 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class V4:
    """An IPv4 packet: its header fields, its header bytes (options kept) and its payload
    (the bytes up to the total length; trailing bytes are not part of it)."""

    header: bytes
    tos: int
    total: int
    ident: int
    flags: int  # the 16-bit flags and fragment offset field
    ttl: int
    protocol: int
    src: IPv4Address
    dst: IPv4Address
    payload: bytes

    @property
    def fragment(self) -> bool:
        return bool(self.flags & (MF | OFFSET))

    @property
    def later_fragment(self) -> bool:
        return bool(self.flags & OFFSET)

    @property
    def df(self) -> bool:
        return bool(self.flags & DF)

    def flow(self) -> Flow:
        sport, dport = (None, None) if self.later_fragment else _ports(self.protocol, self.payload)
        return Flow(self.src, self.dst, self.protocol, sport, dport)

    def quoted_flow(self) -> Flow | None:
        """For an ICMP error: the flow of the packet it quotes (RFC 4301 6.2), else None."""
        p = self.payload
        if self.protocol != ICMP or self.later_fragment or not p or p[0] not in ICMP_ERRORS:
            return None
        quote = p[8:]
        if len(quote) < 20 or quote[0] >> 4 != 4:
            return None
        qlen = (quote[0] & 0x0F) * 4
        if qlen < 20 or len(quote) < qlen:
            return None
        protocol = quote[9]
        later = int.from_bytes(quote[6:8], "big") & OFFSET
        sport, dport = (None, None) if later else _ports(protocol, quote[qlen:])
        return Flow(IPv4Address(quote[12:16]), IPv4Address(quote[16:20]), protocol, sport, dport)


def parse_v4(data: bytes) -> V4:
    if len(data) < 20:
        raise Refused("malformed", "shorter than an IPv4 header")
    if data[0] >> 4 != 4:
        raise Refused("not_ipv4", f"IP version {data[0] >> 4}")
    hlen = (data[0] & 0x0F) * 4
    total = int.from_bytes(data[2:4], "big")
    if hlen < 20 or total < hlen or total > len(data):
        raise Refused("malformed", "inconsistent IPv4 lengths")
    return V4(bytes(data[:hlen]), data[1], total, int.from_bytes(data[4:6], "big"),
              int.from_bytes(data[6:8], "big"), data[8], data[9], IPv4Address(data[12:16]),
              IPv4Address(data[16:20]), bytes(data[hlen:total]))


def v4_header(header: bytes, *, protocol: int | None = None, total: int | None = None,
              tos: int | None = None, dst: IPv4Address | None = None,
              flags: int | None = None) -> bytes:
    """``header`` with the fields given changed and its checksum computed again."""
    out = bytearray(header)
    if protocol is not None:
        out[9] = protocol
    if total is not None:
        out[2:4] = total.to_bytes(2, "big")
    if tos is not None:
        out[1] = tos
    if dst is not None:
        out[16:20] = dst.packed
    if flags is not None:
        out[6:8] = flags.to_bytes(2, "big")
    out[10:12] = b"\0\0"
    out[10:12] = internet_checksum(bytes(out)).to_bytes(2, "big")
    return bytes(out)


def new_v4_header(tos: int, total: int, ident: int, df: bool, ttl: int, protocol: int,
                  src: IPv4Address, dst: IPv4Address) -> bytes:
    """A 20-byte IPv4 header without options (a tunnel's outer header, a keepalive)."""
    head = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, DF if df else 0, ttl,
                       protocol, 0, src.packed, dst.packed)
    return v4_header(head)


# -- IPv6 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class V6:
    """An IPv6 packet walked to its upper layer (or ESP): ``upper`` is that header's
    protocol, found at ``upper_at`` and named by the byte at ``upper_named_at``. Transport ESP
    goes in at ``esp_at``, after the headers routers read (hop-by-hop, routing, and the
    destination options before a routing header, RFC 4303 3.1.1), the byte at
    ``esp_named_at`` naming what follows. ``fragment_offset`` is None without a fragment
    header."""

    data: bytes  # the packet up to its payload length
    tclass: int
    flow_label: int
    src: IPv6Address
    dst: IPv6Address
    upper: int
    upper_at: int
    upper_named_at: int
    esp_at: int
    esp_named_at: int
    fragment_offset: int | None
    more_fragments: bool

    @property
    def total(self) -> int:
        return len(self.data)

    def flow(self) -> Flow:
        sport: int | None = None
        dport: int | None = None
        if not self.fragment_offset:
            sport, dport = _ports(self.upper, self.data[self.upper_at :])
        return Flow(self.src, self.dst, self.upper, sport, dport)

    def is_link_message(self) -> bool:
        """Neighbour discovery and MLD: what an IPv6 link needs, never protected."""
        return (self.upper == ICMPV6 and self.fragment_offset is None
                and self.total > self.upper_at and self.data[self.upper_at] in LINK_LOCAL_TYPES)

    def quoted_flow(self) -> Flow | None:
        """For an ICMPv6 error: the flow of the packet it quotes, else None."""
        at = self.upper_at
        if (self.upper != ICMPV6 or self.fragment_offset is not None or self.total < at + 8
                or self.data[at] not in ICMPV6_ERRORS):
            return None
        quote = self.data[at + 8 :]
        if len(quote) >= 40 and quote[0] >> 4 == 6:  # the quote is cut: walk what there is
            quote = quote[:4] + (len(quote) - 40).to_bytes(2, "big") + quote[6:]
        try:
            return parse_v6(quote).flow()
        except Refused:
            return None


def parse_v6(data: bytes) -> V6:
    """Walk the extension headers (strictly: hop-by-hop only first, at most eight, none cut
    short, one fragment header) up to the first header that is none of them."""
    if len(data) < 40:
        raise Refused("malformed", "shorter than an IPv6 header")
    if data[0] >> 4 != 6:
        raise Refused("not_ipv4", f"IP version {data[0] >> 4}")
    end = 40 + int.from_bytes(data[4:6], "big")
    if end > len(data):
        raise Refused("malformed", "IPv6 payload length beyond the packet")
    nh, nh_at, at = data[6], 6, 40
    esp_at, esp_named_at = 40, 6
    frag_offset: int | None = None
    more = False
    seen = 0
    while nh in EXTENSIONS:
        if seen == MAX_EXTENSIONS:
            raise Refused("ext_chain_too_long", f"more than {MAX_EXTENSIONS} headers")
        if nh == HOP_BY_HOP and seen:
            raise Refused("bad_ext_header", "hop-by-hop options not first")
        if at + 8 > end:
            raise Refused("bad_ext_header", f"header {nh} cut short")
        seen += 1
        if nh == FRAGMENT:
            if frag_offset is not None:
                raise Refused("bad_ext_header", "two fragment headers")
            field = int.from_bytes(data[at + 2 : at + 4], "big")
            frag_offset, more = field >> 3, bool(field & 1)
            size = 8
        else:
            size = (data[at + 1] + 1) * 8
            if at + size > end:
                raise Refused("bad_ext_header", f"header {nh} cut short")
        if nh in (HOP_BY_HOP, ROUTING):
            esp_at, esp_named_at = at + size, at
        nh, nh_at, at = data[at], at, at + size
        if frag_offset:
            break  # a later fragment: the rest is the middle of the upper layer
    return V6(bytes(data[:end]), ((data[0] & 0x0F) << 4) | (data[1] >> 4),
              int.from_bytes(data[1:4], "big") & 0xFFFFF, IPv6Address(data[8:24]),
              IPv6Address(data[24:40]), nh, at, nh_at, esp_at, esp_named_at, frag_offset, more)


def v6_headers(head: bytes, named_at: int, next_header: int, payload_length: int) -> bytes:
    """The headers ``head`` with a new payload length and next header at ``named_at``."""
    out = bytearray(head)
    out[4:6] = payload_length.to_bytes(2, "big")
    out[named_at] = next_header
    return bytes(out)


def new_v6_header(tclass: int, flow_label: int, payload_length: int, next_header: int,
                  hop_limit: int, src: IPv6Address, dst: IPv6Address) -> bytes:
    first = (6 << 28) | (tclass << 20) | flow_label
    return (first.to_bytes(4, "big") + payload_length.to_bytes(2, "big")
            + bytes((next_header, hop_limit)) + src.packed + dst.packed)


def with_tclass(packet: bytes, tclass: int) -> bytes:
    return bytes((0x60 | (tclass >> 4), ((tclass & 0x0F) << 4) | (packet[1] & 0x0F))) + packet[2:]


def declared_length(data: bytes) -> int:
    """What a packet's header says its length is; 0 if it can't say."""
    if len(data) >= 4 and data[0] >> 4 == 4:
        return int.from_bytes(data[2:4], "big")
    if len(data) >= 6 and data[0] >> 4 == 6:
        return 40 + int.from_bytes(data[4:6], "big")
    return 0

