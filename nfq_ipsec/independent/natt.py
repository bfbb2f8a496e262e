"""ESP in UDP (RFC 3948), IPv4.

- 2.1: outbound, a UDP header with checksum 0 between the IP header and ESP;
- 2.2: inbound, what a datagram to an ESP-in-UDP port is: a NAT-keepalive (one 0xFF byte,
  2.3), the non-ESP marker (four zero bytes: IKE, for the host), or ESP;
- 3.1.2: transport mode behind a NAT: the inner TCP/UDP checksum computed again over the
  addresses the packet carries now.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from .ipwire import ESP, TCP, UDP, V4, Refused, internet_checksum, new_v4_header, v4_header
from .state import UdpPeer

UDP_HEADER = 8
KEEPALIVE = b"\xff"
MARKER = b"\0\0\0\0"


def encapsulate(peer: UdpPeer, esp_packet: bytes, tunnel: bool, now: float) -> bytes:
    """An IPv4 ESP packet put inside UDP. In tunnel mode the outer destination is where the
    peer is now (it may have moved behind its NAT); in transport mode the packet's own
    addresses are noted for the keepalives."""
    hlen = (esp_packet[0] & 0x0F) * 4
    total = len(esp_packet) + UDP_HEADER
    if total > 65535:
        raise Refused("too_big", f"{total} bytes in UDP")
    header = esp_packet[:hlen]
    if tunnel:
        assert isinstance(peer.peer, IPv4Address)
        header = v4_header(header, protocol=UDP, total=total, dst=peer.peer)
    else:
        peer.local = IPv4Address(header[12:16])
        peer.peer = IPv4Address(header[16:20])
        header = v4_header(header, protocol=UDP, total=total)
    peer.last_sent = now
    udp = (peer.port.to_bytes(2, "big") + peer.peer_port.to_bytes(2, "big")
           + (total - hlen).to_bytes(2, "big") + b"\0\0")
    return header + udp + esp_packet[hlen:]


def destination_port(packet: V4) -> int | None:
    if packet.later_fragment or len(packet.payload) < 4:
        return None
    return int.from_bytes(packet.payload[2:4], "big")


@dataclass(frozen=True)
class Datagram:
    """What came to an ESP-in-UDP port: ``esp`` is the ESP packet (None: the non-ESP marker)."""

    source_port: int
    esp: bytes | None


def classify(packet: V4) -> Datagram:
    if packet.fragment:
        raise Refused("fragment", "ESP in UDP fragment (reassemble before ESP)")
    udp = packet.payload
    if len(udp) < UDP_HEADER:
        raise Refused("udp_malformed", f"{len(udp)} bytes: shorter than a UDP header")
    if int.from_bytes(udp[4:6], "big") != len(udp):
        raise Refused("udp_malformed", "UDP length is not the datagram's")
    body = udp[UDP_HEADER:]
    source = int.from_bytes(udp[0:2], "big")
    if body == KEEPALIVE:
        raise Refused("nat_keepalive")
    if body[:4] == MARKER and len(body) >= 4:
        return Datagram(source, None)
    if len(body) < 8:
        raise Refused("udp_runt", f"{len(body)} bytes after the UDP header")
    return Datagram(source, body)


def as_plain_esp(packet: V4, esp: bytes) -> V4:
    """The datagram as the ESP packet it carries: protocol 50, the UDP header gone."""
    total = len(packet.header) + len(esp)
    header = v4_header(packet.header, protocol=ESP, total=total)
    return V4(header, packet.tos, total, packet.ident, packet.flags, packet.ttl, ESP,
              packet.src, packet.dst, esp)


def transport_checksum(packet: bytes, inner: V4) -> bytes:
    """RFC 3948 3.1.2: the TCP or UDP checksum over the addresses as received. A UDP
    checksum of 0 stays 0; anything else, or a segment too short for its header, stays."""
    segment = bytearray(inner.payload)
    if inner.protocol == TCP and len(segment) >= 20:
        at = 16
    elif inner.protocol == UDP and len(segment) >= 8 and segment[6:8] != b"\0\0":
        at = 6
    else:
        return packet
    segment[at : at + 2] = b"\0\0"
    pseudo = (inner.src.packed + inner.dst.packed + bytes((0, inner.protocol))
              + len(segment).to_bytes(2, "big"))
    value = internet_checksum(pseudo + bytes(segment))
    if value == 0 and inner.protocol == UDP:
        value = 0xFFFF
    segment[at : at + 2] = value.to_bytes(2, "big")
    return inner.header + bytes(segment)


def keepalive(peer: UdpPeer) -> bytes | None:
    """RFC 3948 2.3: one byte 0xFF from the SA's address and port to its peer's."""
    if not isinstance(peer.local, IPv4Address) or not isinstance(peer.peer, IPv4Address):
        return None
    if int(peer.local) == 0 or int(peer.peer) == 0:
        return None
    total = 20 + UDP_HEADER + 1
    return (new_v4_header(0, total, 0, False, 64, UDP, peer.local, peer.peer)
            + peer.port.to_bytes(2, "big") + peer.peer_port.to_bytes(2, "big")
            + (UDP_HEADER + 1).to_bytes(2, "big") + b"\0\0" + KEEPALIVE)
