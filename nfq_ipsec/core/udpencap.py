"""ESP in UDP (RFC 3948): NAT traversal, for SAs with ``encapsulation = "udp"``.

Outbound, a UDP header (checksum 0, RFC 3948 2.1) goes between the IP header and ESP. Inbound,
UDP to the port of one of a processor's UDP SAs is told apart by its first bytes (2.2):

- one byte 0xFF: a NAT-keepalive (2.3), dropped (NAT_KEEPALIVE), its job done on the way;
- four zero bytes: the non-ESP marker (IKE), passed on untouched to the host's IKE socket;
- anything else shorter than an ESP header: UDP_RUNT; a UDP length that is not the packet's:
  UDP_MALFORMED;
- else ESP, whose SPI is the first four bytes: the UDP header comes off and the ESP packet is
  opened like plain ESP.

Transport mode behind a NAT (3.1.2): the inner TCP or UDP checksum was made over the
addresses the sender knew, which the NAT changed on the way; after ESP has proved the payload
whole, the checksum is computed again over the addresses the packet now carries.

No I/O; the processor decides what happens to the results.
"""

from __future__ import annotations

import struct
from typing import Final

from . import packet as ip
from .errors import DropReason, EspError

UDP_HEADER: Final = 8
ESP_HEADER: Final = 8  # SPI and sequence number: the least that can be ESP
KEEPALIVE_BYTE: Final = 0xFF
MARKER: Final = b"\0\0\0\0"  # the non-ESP marker: an SPI of 0 is never ESP (RFC 4303 2.1)
ESP_PACKET: Final = 0  # what ``classify`` says
MARKER_PACKET: Final = 1
KEEPALIVE_TTL: Final = 64
_UDP: Final = struct.Struct("!HHHH")
_FRAGMENT_BITS: Final = ip.FLAG_MF | ip.FRAG_OFFSET_MASK
_TCP_CHECKSUM: Final = 16  # offsets of the checksum in the TCP and UDP headers
_UDP_CHECKSUM: Final = 6
_TCP_MIN: Final = 20


class UdpEndpoint:
    """The UDP side of one SA: its ports, the peer's address and what it has done.

    ``peer_addr``/``peer_port``: where the SA's peer is. Outbound, where packets go (tunnel
    mode: the outer destination; transport mode: the packet's own destination, recorded for
    the keepalives); inbound, where packets are expected from (0: any address, transport mode,
    whose policy checks it). ``follow``: an inbound SA takes an authenticated new source as
    the peer's (NAT rebinding) instead of dropping it. A plain class: compiled core."""

    __slots__ = ("follow", "keepalive", "keepalives_sent", "last_sent", "local_addr",
                 "local_port", "peer_addr", "peer_changes", "peer_port")

    def __init__(self, local_port: int, peer_port: int, peer_addr: int, local_addr: int,
                 follow: bool, keepalive: float) -> None:
        self.local_port = local_port
        self.peer_port = peer_port
        self.peer_addr = peer_addr
        self.local_addr = local_addr
        self.follow = follow
        self.keepalive = keepalive  # outbound: idle seconds before a NAT-keepalive; 0: none
        self.last_sent = 0.0  # outbound: when the SA last sent a packet (keepalives too)
        self.keepalives_sent = 0
        self.peer_changes = 0  # inbound: new sources followed


def wrap(u: UdpEndpoint, packet: bytes, tunnel: bool, now: float) -> bytes:
    """An ESP packet (IPv4 header, then ESP) inside UDP: IPv4 header, UDP header, ESP."""
    ihl = (packet[0] & 0x0F) * 4
    total = len(packet) + UDP_HEADER
    if total > ip.IPV4_MAX_PACKET:
        raise EspError(DropReason.TOO_BIG, f"{total} bytes in UDP")
    head = bytearray(packet[:ihl])
    head[2] = total >> 8
    head[3] = total & 0xFF
    head[9] = ip.PROTO_UDP
    if tunnel:
        dst = u.peer_addr
        head[16] = dst >> 24
        head[17] = (dst >> 16) & 0xFF
        head[18] = (dst >> 8) & 0xFF
        head[19] = dst & 0xFF
    else:  # the packet's own addresses: where a keepalive goes
        u.local_addr = (head[12] << 24) | (head[13] << 16) | (head[14] << 8) | head[15]
        u.peer_addr = (head[16] << 24) | (head[17] << 16) | (head[18] << 8) | head[19]
    head[10] = head[11] = 0
    csum = ip.checksum(head)
    head[10] = csum >> 8
    head[11] = csum & 0xFF
    u.last_sent = now
    return b"".join((head, _UDP.pack(u.local_port, u.peer_port, total - ihl, 0), packet[ihl:]))


def local_port(data: bytes, hdr: ip.IPv4Header) -> int:
    """The destination port of a UDP datagram, -1 where there is none to read (a non-first
    fragment, a packet too short)."""
    o = hdr.ihl
    if hdr.flags_frag & ip.FRAG_OFFSET_MASK or hdr.total_length < o + 4:
        return -1
    return (data[o + 2] << 8) | data[o + 3]


def classify(data: bytes, hdr: ip.IPv4Header) -> int:
    """ESP_PACKET or MARKER_PACKET for a datagram to an ESP-in-UDP port; raises EspError
    with the reason for everything else (keepalive, runt, malformed, fragment)."""
    if hdr.flags_frag & _FRAGMENT_BITS:
        raise EspError(DropReason.FRAGMENT, "ESP in UDP fragment (reassemble before ESP)")
    o = hdr.ihl
    size = hdr.total_length - o
    if size < UDP_HEADER:
        raise EspError(DropReason.UDP_MALFORMED, f"{size} bytes: shorter than a UDP header")
    declared = (data[o + 4] << 8) | data[o + 5]
    if declared != size:
        raise EspError(DropReason.UDP_MALFORMED, f"UDP length {declared}, datagram {size}")
    n = size - UDP_HEADER
    p = o + UDP_HEADER
    if n == 1 and data[p] == KEEPALIVE_BYTE:
        raise EspError(DropReason.NAT_KEEPALIVE)
    if n >= 4 and data[p : p + 4] == MARKER:
        return MARKER_PACKET
    if n < ESP_HEADER:
        raise EspError(DropReason.UDP_RUNT, f"{n} bytes after the UDP header")
    return ESP_PACKET


def source_port(data: bytes, hdr: ip.IPv4Header) -> int:
    o = hdr.ihl
    return (data[o] << 8) | data[o + 1]


def spi_of(data: bytes, hdr: ip.IPv4Header) -> int:
    """The SPI of a ``classify``-d ESP_PACKET: the first four bytes after the UDP header."""
    p = hdr.ihl + UDP_HEADER
    return (data[p] << 24) | (data[p + 1] << 16) | (data[p + 2] << 8) | data[p + 3]


def strip(data: bytes, hdr: ip.IPv4Header) -> tuple[bytes, ip.IPv4Header]:
    """The ESP packet a ``classify``-d ESP_PACKET carries: its IPv4 header with protocol ESP
    and the UDP header removed, and that header parsed."""
    o = hdr.ihl
    total = hdr.total_length - UDP_HEADER
    head = ip.replace_header(data, hdr, ip.PROTO_ESP, total)
    return (head + data[o + UDP_HEADER : hdr.total_length],
            ip.IPv4Header(o, hdr.tos, total, hdr.ident, hdr.flags_frag, hdr.ttl, ip.PROTO_ESP,
                          hdr.src, hdr.dst))


def fix_checksum(packet: bytes, hdr: ip.IPv4Header) -> bytes:
    """RFC 3948 3.1.2, transport mode: the TCP or UDP checksum of a decapsulated packet
    computed again over its addresses as received (a NAT on the way changed them). A UDP
    checksum of 0 (none) stays 0; other protocols, and a segment too short for its own
    header, are left as they are (the kernel judges those)."""
    proto = hdr.protocol
    o = hdr.ihl
    end = hdr.total_length
    if proto == ip.PROTO_TCP:
        at = _TCP_CHECKSUM
        if end - o < _TCP_MIN:
            return packet
    elif proto == ip.PROTO_UDP:
        at = _UDP_CHECKSUM
        if end - o < UDP_HEADER or (packet[o + at] == 0 and packet[o + at + 1] == 0):
            return packet
    else:
        return packet
    seg = bytearray(packet[o:end])
    seg[at] = seg[at + 1] = 0
    csum = l4_checksum(hdr.src, hdr.dst, proto, seg)
    if csum == 0 and proto == ip.PROTO_UDP:
        csum = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    seg[at] = csum >> 8
    seg[at + 1] = csum & 0xFF
    return packet[:o] + bytes(seg)


def l4_checksum(src: int, dst: int, proto: int, segment: bytes | bytearray) -> int:
    """The RFC 1071 checksum of a TCP or UDP segment (its checksum field zeroed) with the IPv4
    pseudo header. Sums the segment as one big integer: 2**16 is 1 modulo 0xFFFF, so the
    one's complement sum of the 16-bit words is that integer modulo 0xFFFF (0 read as 0xFFFF
    unless every word is 0); no per-word loop in Python."""
    n = len(segment)
    value = int.from_bytes(segment, "big")
    if n & 1:
        value <<= 8
    value += (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + proto + n
    folded = value % 0xFFFF
    if folded == 0 and value:
        folded = 0xFFFF
    return 0xFFFF - folded


def keepalive(u: UdpEndpoint) -> bytes | None:
    """A NAT-keepalive (RFC 3948 2.3: one byte 0xFF, UDP checksum 0) from the SA's address and
    port to its peer's; None while either address is unknown (transport mode before its first
    packet)."""
    if not u.peer_addr or not u.local_addr:
        return None
    total = ip.IPV4_MIN_HEADER + UDP_HEADER + 1
    return b"".join((
        ip.build_header(tos=0, total_length=total, ident=0, df=False, ttl=KEEPALIVE_TTL,
                        protocol=ip.PROTO_UDP, src=u.local_addr, dst=u.peer_addr),
        _UDP.pack(u.local_port, u.peer_port, UDP_HEADER + 1, 0),
        bytes((KEEPALIVE_BYTE,)),
    ))
