"""Packets built by hand, independently of the core's own header code: the one builder the
tests share. Addresses are dotted strings; every IPv4 header gets a correct checksum."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

DF = 0x4000
MF = 0x2000


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, padded to an even length."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip4(addr: str) -> int:
    return int(IPv4Address(addr))


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, frag: int = DF,
         total: int | None = None, *, tos: int = 0, ttl: int = 64, options: bytes = b"") -> bytes:
    """An IPv4 packet; ``frag`` is the flags and fragment offset field, ``total`` overrides the
    total length (for lying headers)."""
    ihl = 5 + len(options) // 4
    length = total if total is not None else ihl * 4 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, length, ident, frag, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst)) + options
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """An IPv4 UDP datagram (UDP checksum 0: none)."""
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def icmp_echo_message(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request message (type 8), checksummed, without the IP header."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    return icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]


def fragments(packet: bytes, size: int = 8000) -> list[bytes]:
    """Split an IPv4 packet (20-byte header) into fragments of ``size`` payload bytes."""
    src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    proto, ident = packet[9], struct.unpack_from("!H", packet, 4)[0]
    body = packet[20:]
    out = []
    for off in range(0, len(body), size):
        more = MF if off + size < len(body) else 0
        out.append(ipv4(src, dst, proto, body[off:off + size], ident, more | (off // 8)))
    return out
